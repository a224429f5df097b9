"""The published evaluation: standard / sliding windows, sliding evaluation, score-first TTT (legality, freezing, LR
schedule, multi-process equivalence). In-process tests use a tiny model whose weights are perturbed so that
attention and every parameter matter (the zero-initialised projections would otherwise hide context bugs)."""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from conftest import TINY, final_line, run_script, tg, tiny_hp, tiny_model

T = 128  # TINY's TRAIN_SEQ_LEN


# ------------------------------------------------------------------------------------------------ helpers

def live_model(seed: int = 0, **overrides) -> "tg.GPT":
    """A tiny model with every parameter perturbed (nothing zero, attention/projections active)."""
    model = tiny_model(seed, **overrides)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def runtime(model) -> "tg.Runtime":
    rt = tg.Runtime()
    rt.compiled = model
    return rt


@pytest.fixture(scope="module")
def tables(corpus):
    hp = tiny_hp()
    return tg.byte_tables(tg.load_tokenizer(hp), hp.vocab_size)


@pytest.fixture(scope="module")
def val_tokens(corpus):
    return tg.load_validation(tiny_hp(val_max_tokens=2000))


def scored_targets(starts, offs, n_targets: int, seq_len: int) -> list[int]:
    """Target indices scored by the plan, by the rule: position j of the window at `start` scores target
    start + j for j in [off, seq_len) with start + j < n_targets."""
    out = []
    for s, o in zip(starts.tolist(), offs.tolist()):
        out.extend(s + j for j in range(o, seq_len) if s + j < n_targets)
    return out


def reference_eval(model, val: torch.Tensor, tables, seq_len: int, stride: int) -> tuple[float, float]:
    """Straightforward evaluation, independent of plan_windows/score_windows: for every target i find
    the window that scores it (standard: the disjoint window holding it, tail dropped; sliding: window 0 for
    i < seq_len, else the window starting at k*stride whose last `stride` positions hold i), run that whole
    window (zero-padded to seq_len) through a full forward and take the loss at i's position."""
    base, space, boundary = tables
    n_targets = len(val) - 1
    padded = torch.cat([val, torch.zeros(seq_len + 1, dtype=val.dtype)])
    by_window: dict[int, list[int]] = {}
    for i in range(n_targets):
        if stride == 0 or stride >= seq_len:
            if i >= (n_targets // seq_len) * seq_len:
                continue
            s = (i // seq_len) * seq_len
        elif i < seq_len:
            s = 0
        else:
            s = ((i - seq_len) // stride + 1) * stride
        assert s <= i < s + seq_len
        by_window.setdefault(s, []).append(i)
    loss_sum, n_tok, n_bytes = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for s, targets in by_window.items():
            w = padded[s:s + seq_len + 1]
            losses = model(w[None, :-1], w[None, 1:])[0]
            for i in targets:
                x, y = int(val[i]), int(val[i + 1])
                loss_sum += float(losses[i - s])
                n_tok += 1
                n_bytes += int(base[y]) + int(bool(space[y]) and not bool(boundary[x]))
    model.train()
    val_loss = loss_sum / n_tok
    return val_loss, val_loss / math.log(2.0) * n_tok / n_bytes


# ------------------------------------------------------------------------------------------------ windows

def test_plan_windows_standard_keeps_full_windows_and_drops_only_the_tail():
    for n_targets in (1, 5, T - 1, T, T + 1, 2 * T - 1, 2 * T, 2 * T + 1, 7 * T + 33):
        for stride in (0, T, T + 1, 3 * T):
            starts, offs = tg.plan_windows(n_targets + 1, T, stride)
            k = n_targets // T
            assert starts.tolist() == [i * T for i in range(k)], (n_targets, stride)
            assert offs.tolist() == [0] * k
            assert scored_targets(starts, offs, n_targets, T) == list(range(k * T))


def test_plan_windows_stride_equal_seq_len_is_standard():
    for k in (1, 2, 5):
        n_tokens = k * T + 1  # (n_tokens - 1) a multiple of seq_len: nothing dropped
        s_std, o_std = tg.plan_windows(n_tokens, T, 0)
        s_sl, o_sl = tg.plan_windows(n_tokens, T, T)
        assert torch.equal(s_std, s_sl) and torch.equal(o_std, o_sl)
        assert scored_targets(s_sl, o_sl, n_tokens - 1, T) == list(range(n_tokens - 1))


@pytest.mark.parametrize("stride", [1, 7, 32, 64, 100, T - 1])
def test_plan_windows_sliding_scores_every_target_exactly_once(stride):
    lengths = {1, 2, 3, T - 1, T, T + 1, 2 * T, 2 * T + 1, 997}
    for m in (3, 5, 9):
        lengths |= {T + m * stride - 1, T + m * stride, T + m * stride + 1}
    for n_targets in sorted(lengths):
        starts, offs = tg.plan_windows(n_targets + 1, T, stride)
        got = scored_targets(starts, offs, n_targets, T)
        assert sorted(got) == list(range(n_targets)), (stride, n_targets)  # each target exactly once
        # Windows start at multiples of the stride, the first scores all its targets, the others their last
        # `stride` positions; consecutive windows, none of them scoring nothing.
        assert starts.tolist() == [k * stride for k in range(len(starts))], (stride, n_targets)
        assert offs[0] == 0 and all(o == T - stride for o in offs[1:].tolist()), (stride, n_targets)
        assert all(s + o < n_targets for s, o in zip(starts.tolist(), offs.tolist())), (stride, n_targets)


# ------------------------------------------------------------------------------------------------ evaluation

@pytest.mark.parametrize("n_tokens,stride,batch", [(1000, 32, 8), (1000, 50, 3), (700, 0, 2), (100, 32, 8)])
def test_evaluate_matches_straightforward_reference(val_tokens, tables, n_tokens, stride, batch):
    model = live_model(1)
    hp = tiny_hp(eval_batch_seqs=batch)
    val = val_tokens[:n_tokens]
    got = tg.evaluate(hp, runtime(model), model, val, tables, stride)
    want = reference_eval(model, val, tables, T, stride)
    assert got[0] == pytest.approx(want[0], rel=1e-9, abs=0)
    assert got[1] == pytest.approx(want[1], rel=1e-9, abs=0)
    assert model.training  # evaluate puts the model back in training mode


def test_sliding_with_stride_seq_len_equals_standard(val_tokens, tables):
    model = live_model(2)
    hp = tiny_hp()
    val = val_tokens[:5 * T + 1]
    std = tg.evaluate(hp, runtime(model), model, val, tables, 0)
    assert tg.evaluate(hp, runtime(model), model, val, tables, T) == std
    # and a real sliding evaluation differs (more context per target), so the comparison is not vacuous
    assert tg.evaluate(hp, runtime(model), model, val, tables, 32)[0] != pytest.approx(std[0], rel=1e-6)


def test_sliding_evaluation_reports_progress_with_rate_and_eta(val_tokens, tables, monkeypatch):
    model, lines = live_model(3), []
    rt = runtime(model)
    monkeypatch.setattr(rt, "log", lines.append)
    hp = tiny_hp(eval_batch_seqs=2)
    n_batches = -(-len(tg.plan_windows(len(val_tokens), T, 32)[0]) // 2)
    tg.evaluate(hp, rt, model, val_tokens, tables, 32)
    assert n_batches > 20 and 10 <= len(lines) <= 20, (n_batches, lines)  # a line every ceil(n/20) batches
    done = [int(re.fullmatch(rf"sliding_eval_batch:(\d+)/{n_batches} batches_per_s:[\d.]+ eta:\d+s", l)[1]) for l in lines]
    assert done == sorted(set(done)) and done[-1] > n_batches - -(-n_batches // 20), done
    lines.clear()
    tg.evaluate(hp, rt, model, val_tokens, tables, 0)  # standard evaluation is short: silent
    assert lines == []


def test_ttt_without_epochs_is_sliding_evaluation(val_tokens, tables):
    model = live_model(3)
    hp = tiny_hp(ttt_epochs=0, eval_stride=32, ttt_chunk_tokens=256, eval_batch_seqs=3)
    val = val_tokens[:1000]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sliding = tg.evaluate(hp, runtime(model), model, val, tables, 32)
    ttt = tg.ttt_evaluate(hp, runtime(model), model, val, tables)
    assert ttt[0] == pytest.approx(sliding[0], rel=1e-12, abs=0)
    assert ttt[1] == pytest.approx(sliding[1], rel=1e-12, abs=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------ TTT legality

OFFSET = 5  # token id = OFFSET + position, so every id names its position (0 = padding, never a real token)


def test_ttt_trains_only_on_already_scored_targets(tables, monkeypatch):
    n_tokens = 1000  # ids OFFSET..OFFSET+999 < vocab 1024: unique
    C, stride = 256, 32
    val = torch.arange(n_tokens, dtype=torch.int64) + OFFSET
    n_targets = n_tokens - 1
    model = live_model(4)
    hp = tiny_hp(ttt_epochs=2, eval_stride=stride, ttt_chunk_tokens=C, ttt_batch_seqs=1, eval_batch_seqs=5)
    events = []  # ("score", set of target indices) / ("train", set of target indices)

    def to_targets(tgt_ids: torch.Tensor) -> set[int]:
        pos = tgt_ids.flatten() - OFFSET
        assert (pos >= 1).all() and (pos < n_tokens).all(), "a padding/unknown token used as a target"
        return set((pos - 1).tolist())  # target index i predicts token position i + 1

    orig_add = tg.BpbMeter.add

    def add(self, losses, prev, tgt, mask):
        assert not torch.is_grad_enabled() and not losses.requires_grad
        events.append(("score", to_targets(tgt[mask.bool()])))
        return orig_add(self, losses, prev, tgt, mask)

    monkeypatch.setattr(tg.BpbMeter, "add", add)

    def recorder(ids, targets, score_from=0):
        if torch.is_grad_enabled():
            assert score_from == 0
            events.append(("train", to_targets(targets)))
        return model(ids, targets, score_from)

    tg.ttt_evaluate(hp, runtime(recorder), model, val, tables)

    train_events = [e for e in events if e[0] == "train"]
    assert len(train_events) >= 4, "TTT never trained: the legality check would be vacuous"
    scored: list[int] = []
    seen: set[int] = set()
    for kind, targets in events:
        if kind == "score":
            scored.extend(targets)
            seen |= targets
        else:
            unscored = targets - seen
            assert not unscored, f"TTT trained on targets not yet scored: {sorted(unscored)[:10]}"
    assert sorted(scored) == list(range(n_targets))  # every target scored exactly once
    # the first chunk is fully scored before the first training step
    first_train = next(i for i, e in enumerate(events) if e[0] == "train")
    assert set(range(C)) <= set().union(*(e[1] for e in events[:first_train] if e[0] == "score"))
    # the last chunk (chunk of the last window's first scored target) is never trained on
    starts, offs = tg.plan_windows(n_tokens, T, stride)
    last_chunk = int(starts[-1] + offs[-1]) // C
    trained = set().union(*(e[1] for e in train_events))
    assert not {i for i in trained if i >= last_chunk * C}
    # and training uses every earlier chunk's full sequences (x = tokens[s:s+T], y = tokens[s+1:s+T+1])
    want = {c * C + j for c in range(last_chunk) for j in range((C // T) * T)}
    assert trained == want


def test_ttt_freezes_first_blocks_and_trains_the_rest(val_tokens, tables):
    # A high LR: the value-embedding path carries ~1e-3 of this tiny model's signal, so its per-layer scales get
    # gradients ~1e-5; at 0.01 their momentum updates (some of opposite sign) can sum to below one float32 step.
    model = live_model(5)
    with torch.no_grad():  # a VE path as strong as the others, so its layer scales' steps exceed an ulp
        model.ve_shared.scale.fill_(1.0)
    hp = tiny_hp(ttt_freeze_blocks=2, ttt_epochs=1, eval_stride=32, ttt_chunk_tokens=512, ttt_batch_seqs=2,
                 ttt_lr=0.3)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    tg.ttt_evaluate(hp, runtime(model), model, val_tokens[:1600], tables)
    frozen = [k for k in before if k.startswith(("blocks.0.", "blocks.1."))]
    others = [k for k in before if k not in frozen]
    assert frozen and any(k.startswith("blocks.3.") for k in others) and "tok_emb.weight" in others
    for k, p in model.named_parameters():
        if k in frozen:
            assert torch.equal(p, before[k]), f"frozen parameter {k} changed"
        else:
            assert not torch.equal(p, before[k]), f"trainable parameter {k} did not change"
        assert p.requires_grad, f"requires_grad of {k} not restored"


# ------------------------------------------------------------------------------------------------ TTT LR

def spec_ttt_lr(ci: int, n: int) -> float:
    W = max(n // 20, 1)
    if ci < W:
        return (ci + 1) / W
    return 0.5 * (1 + math.cos(math.pi * (ci - W) / max(n - 1 - W, 1)))


def test_ttt_lr_multiplier_matches_spec():
    n = 1893  # the full split: W = 94
    cases = {0: 1 / 94, 1: 2 / 94, 93: 1.0, 94: 1.0, 1892: 0.0}
    for ci, want in cases.items():
        assert tg.ttt_lr_multiplier(ci, n) == pytest.approx(want, abs=1e-12), ci
    mid = 94 + (1892 - 94) // 2  # halfway through the cosine
    assert tg.ttt_lr_multiplier(mid, n) == pytest.approx(0.5, abs=1e-12)
    for ci in (2, 50, 95, 500, 1000, 1500, 1800, 1891):
        assert tg.ttt_lr_multiplier(ci, n) == pytest.approx(spec_ttt_lr(ci, n), abs=1e-12), ci
    for n in (1, 2, 3, 5, 19, 20, 21, 39, 40, 41):
        for ci in range(n):
            assert tg.ttt_lr_multiplier(ci, n) == pytest.approx(spec_ttt_lr(ci, n), abs=1e-12), (ci, n)


def test_ttt_training_matches_hand_written_sgd(tables):
    """TTT's training, written out independently: for each chunk but the last, TTT_EPOCHS passes over its
    full sequences in batches of TTT_BATCH_SEQS (here 2 then 1), each an SGD step on the mean loss over the batch's
    tokens, its gradient clipped to TTT_GRAD_CLIP over all trainable parameters, momentum buffers kept across
    chunks, LR = TTT_LR x the schedule of that chunk (6 chunks: 1, 1, 0.85, 0.5, 0.15; the last is not trained);
    blocks before TTT_FREEZE_BLOCKS untouched. Every chunk's update must equal TTT's."""
    C, n_chunks, lr, mom, clip = 3 * T, 6, 0.05, 0.9, 1.0
    val = tg.load_validation(tiny_hp(val_max_tokens=n_chunks * C + 1))
    hp = tiny_hp(ttt_epochs=2, eval_stride=32, ttt_chunk_tokens=C, ttt_batch_seqs=2, ttt_lr=lr, ttt_momentum=mom,
                 ttt_grad_clip=clip, ttt_freeze_blocks=1)
    model = live_model(7)
    ref = {k: v.detach().clone() for k, v in model.named_parameters()}
    names = [k for k in ref if not k.startswith("blocks.0.")]
    bufs, clipped, steps = {}, 0, 0
    for ci in range(n_chunks - 1):
        chunk_lr = lr * spec_ttt_lr(ci, n_chunks)
        seqs = torch.stack([val[ci * C + j * T: ci * C + (j + 1) * T + 1] for j in range(C // T)])
        for _ in range(2):
            for b in (0, 2):
                batch = seqs[b:b + 2]
                params = {k: v.clone().requires_grad_(k in names) for k, v in ref.items()}
                loss = torch.func.functional_call(model, params, (batch[:, :-1], batch[:, 1:])).mean()
                grads = dict(zip(names, torch.autograd.grad(loss, [params[k] for k in names])))
                norm = math.sqrt(sum(float(g.square().sum()) for g in grads.values()))
                clipped, steps = clipped + (norm > clip), steps + 1
                for k, g in grads.items():
                    g = g * min(1.0, clip / (norm + 1e-6))
                    bufs[k] = mom * bufs[k] + g if k in bufs else g
                    ref[k] = ref[k] - chunk_lr * bufs[k]
    assert steps == 20 and 0 < clipped < steps, clipped  # the clip acts on some steps, not on all
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    tg.ttt_evaluate(hp, runtime(model), model, val, tables)
    for k, p in model.named_parameters():
        err, moved = float((p.detach() - ref[k]).norm()), float((ref[k] - start[k]).norm())
        assert (moved == 0) == k.startswith("blocks.0."), k
        assert err <= 1e-3 * moved + 1e-9, (k, err, moved)  # float32 roundoff: <= 5e-5 here; mutants: > 10


def test_ttt_window_belongs_to_the_chunk_of_its_first_scored_target(tables):
    """Score-first TTT written from its definition, without the product's window or chunk planning: target i is
    scored by window 0 if i < T, else by the window starting at ((i - T) // stride + 1) * stride; a window belongs to
    chunk (its first scored target) // C; chunk by chunk, its windows are scored with the current weights, then
    (unless last) SGD trains on the chunk's full sequences. Stride 48 < T and C = 369 (not a multiple of 48): chunk
    boundaries fall inside windows (one window scores target C - 1 first), so assigning a window by its start,
    its end or one target off changes the result."""
    stride, C, lr, mom, clip, batch = 48, 369, 0.05, 0.9, 1.0, 2
    hp = tiny_hp(val_max_tokens=2000, eval_stride=stride, ttt_chunk_tokens=C, ttt_epochs=1, ttt_batch_seqs=batch,
                 ttt_lr=lr, ttt_momentum=mom, ttt_grad_clip=clip, ttt_freeze_blocks=1)
    val = tg.load_validation(hp)
    n = len(val) - 1
    padded = torch.cat([val, torch.zeros(T + 1, dtype=val.dtype)])
    windows: dict[int, list[int]] = {}  # window start -> the targets it scores
    for i in range(n):
        windows.setdefault(0 if i < T else ((i - T) // stride + 1) * stride, []).append(i)
    chunks: dict[int, list[int]] = {}
    for s, targets in windows.items():
        chunks.setdefault(targets[0] // C, []).append(s)
    n_chunks = max(chunks) + 1
    assert sorted(chunks) == list(range(n_chunks)) and n_chunks == 6
    assert any(s // C != ci or (s + T - 1) // C != ci for ci, starts in chunks.items() for s in starts)
    assert any(targets[0] % C == C - 1 for targets in windows.values())

    model = live_model(3)
    ours = copy.deepcopy(model)
    base, space, boundary = tables
    trainable = [p for name, p in model.named_parameters() if not name.startswith("blocks.0.")]
    opt = torch.optim.SGD(trainable, lr=lr, momentum=mom)
    loss_sum, n_scored, n_bytes = 0.0, 0, 0
    for ci in range(n_chunks):
        model.eval()
        with torch.no_grad():
            for s in chunks[ci]:
                losses = model(padded[None, s:s + T], padded[None, s + 1:s + T + 1])[0]
                for i in windows[s]:
                    prev, tgt = int(val[i]), int(val[i + 1])
                    loss_sum += float(losses[i - s])
                    n_scored += 1
                    n_bytes += int(base[tgt]) + int(space[tgt] and not boundary[prev])
        if ci == n_chunks - 1:
            break
        model.train()
        c0, n_seq = ci * C, (min((ci + 1) * C, n) - ci * C) // T
        for g in opt.param_groups:
            g["lr"] = lr * spec_ttt_lr(ci, n_chunks)
        for b in range(0, n_seq, batch):
            seqs = torch.stack([val[c0 + j * T:c0 + j * T + T + 1] for j in range(b, min(b + batch, n_seq))])
            model(seqs[:, :-1], seqs[:, 1:]).mean().backward()
            torch.nn.utils.clip_grad_norm_(trainable, clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert n_scored == n
    want_loss = loss_sum / n_scored
    want_bpb = want_loss / math.log(2) * n_scored / n_bytes
    loss, bpb = tg.ttt_evaluate(hp, runtime(ours), ours, val, tables)
    assert abs(loss - want_loss) <= 1e-6 and abs(bpb - want_bpb) <= 1e-6, (loss, want_loss, bpb, want_bpb)
    sliding = tg.evaluate(hp, runtime(live_model(3)), live_model(3), val, tables, stride)
    assert abs(sliding[1] - bpb) > 1e-3, (sliding, bpb)  # TTT's training really moved the score


# ------------------------------------------------------------------------------------------------ 2 processes

def test_ttt_two_processes_match_one(tmp_path, corpus):
    model = live_model(6)
    obj, _ = tg.quantize_state_dict(model.state_dict())
    art = tmp_path / "model.int6.ptz"
    art.write_bytes(tg.serialize_artifact(obj))
    env = {**TINY, "RUNS_DIR": str(tmp_path / "runs"), "EVAL_ONLY": "1", "ARTIFACT": str(art), "VAL_MAX_TOKENS": "3000",
           "TTT_ENABLED": "1", "TTT_EPOCHS": "1", "TTT_CHUNK_TOKENS": "512", "EVAL_STRIDE": "32",
           "TTT_BATCH_SEQS": "3", "EVAL_BATCH_SEQS": "4", "TTT_LR": "0.01"}
    one = run_script({**env, "RUN_ID": "one"})
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_script({**env, "RUN_ID": "two"}, torchrun=2)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert "world_size:2" in two.stdout

    def nums(out):
        m = re.search(r"val_loss:(\S+) val_bpb:(\S+)", final_line(out))
        return float(m.group(1)), float(m.group(2))

    def pre(out):
        return float(re.search(r"pre_ttt_eval mode:standard val_loss:\S+ val_bpb:(\S+)", out).group(1))

    l1, b1 = nums(one.stdout)
    l2, b2 = nums(two.stdout)
    assert b2 == pytest.approx(b1, rel=1e-6) and l2 == pytest.approx(l1, rel=1e-6)
    # TTT really changed the score (otherwise this only compares two sliding evaluations)
    assert abs(b1 - pre(one.stdout)) > 1e-4
