"""COMPAT_PR644=1: the published script's training numerics, each accident on its own: the
bigram scale's never-cleared gradient, bf16 master values and tok_emb, the bf16 Muon update, the published
schedule and its refused combinations, and an exact resume."""
from __future__ import annotations

import copy
import io

import pytest
import torch

from conftest import tg
from test_optim import _assert_same, make_trainer


def compat_trainer(seed=0, **kw):
    # TINY sets WARMUP_STEPS=2; BigramHash 64 wide: its projection is orthogonal, so the scale gets a gradient
    return make_trainer(seed, compat_pr644=1, warmup_steps=0, bigram_embed_dim=64, **kw)


def clip_spy(monkeypatch) -> list:
    """Record, for each gradient clip, {param id: its gradient before the clip} and the norm the clip used."""
    seen, real = [], torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        params = list(params)
        pre = {id(p): p.grad.clone() for p in params if p.grad is not None}
        norm = real(params, max_norm)
        seen.append((pre, norm))
        return norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    return seen


# ----------------------------------------------------------------------------------------------
# d. the published schedule, and what COMPAT_PR644=1 refuses
# ----------------------------------------------------------------------------------------------

def test_published_schedule_values():
    """No LR warm-up; (ITERATIONS - step) / WARMDOWN_ITERS over the last WARMDOWN_ITERS steps, to the bit; with a
    wall-clock cap remaining_ms / (WARMDOWN_ITERS x average step ms) once that is below 1."""
    hp = tg.Hyperparameters.from_env({"COMPAT_PR644": "1", "ITERATIONS": "100", "WARMDOWN_ITERS": "30"})
    assert (hp.warmup_steps, hp.warmdown_shape) == (0, "linear")
    assert [tg.lr_multiplier(hp, s) for s in range(101)] == [1.0] * 70 + [(100 - s) / 30 for s in range(70, 101)]
    hp = tg.Hyperparameters.from_env({"COMPAT_PR644": "1", "MAX_WALLCLOCK_SECONDS": "60", "WARMDOWN_ITERS": "30"})
    f = lambda elapsed_ms: tg.lr_multiplier(hp, 250, elapsed_ms, elapsed_ms / 250)
    assert f(40_000.0) == f(0.0) == 1.0  # 160 ms/step: the warm-down spans the last 4.8 s
    assert f(57_000.0) == 3_000.0 / (30 * (57_000.0 / 250))
    assert f(60_000.0) == f(61_000.0) == 0.0


@pytest.mark.parametrize("env,var", [({"WARMUP_STEPS": "20"}, "WARMUP_STEPS"),
                                     ({"WARMDOWN_SHAPE": "cosine"}, "WARMDOWN_SHAPE")])
def test_incompatible_schedule_is_refused(env, var):
    with pytest.raises(tg.UserError, match=rf"^{var}=\S+: COMPAT_PR644=1 "):
        tg.Hyperparameters.from_env({"COMPAT_PR644": "1", **env})
    tg.Hyperparameters.from_env(env)  # fine without it
    tg.Hyperparameters.from_env({"COMPAT_PR644": "1", "WARMUP_STEPS": "0", "WARMDOWN_SHAPE": "linear"})


def test_priming_count_is_the_published_one_only_where_it_leaves_a_trace():
    """Priming is undone bit for bit (tests/test_optim.py), so the default primes 3 steps, enough to compile; under
    COMPAT_PR644=1 the kept scale gradient remembers every priming step, so it primes the published 20."""
    assert tg.Hyperparameters.from_env({}).prime_steps == 3
    assert tg.Hyperparameters.from_env({"COMPAT_PR644": "1"}).prime_steps == 20
    assert tg.Hyperparameters.from_env({"COMPAT_PR644": "1", "PRIME_STEPS": "5"}).prime_steps == 5


def test_attention_kernel_is_the_published_flash():
    """The published script turns every SDPA kernel but flash off; COMPAT_PR644=1 does the same (cuDNN's kernel out,
    torch's fallbacks kept for float32), unless SDPA_BACKEND says otherwise."""
    assert tg.Hyperparameters.from_env({}).sdpa_backend == "auto"
    assert tg.Hyperparameters.from_env({"COMPAT_PR644": "1"}).sdpa_backend == "flash"
    assert tg.Hyperparameters.from_env({"COMPAT_PR644": "1", "SDPA_BACKEND": "cudnn"}).sdpa_backend == "cudnn"


# ----------------------------------------------------------------------------------------------
# b. master weights as the published script holds them; c. the bf16 Muon update buffer
# ----------------------------------------------------------------------------------------------

def test_bf16_master_values_and_tok_emb(corpus, monkeypatch):
    """Same SEED: every initial value is the default init rounded to bf16; tok_emb is bf16 (parameter, gradient,
    AdamW moments), the rest fp32; the EMA stays fp32; Muon keeps its update in bf16."""
    plain, tr = make_trainer(seed=4, bigram_embed_dim=64), compat_trainer(seed=4)
    ref = dict(plain.model.named_parameters())
    for n, p in tr.model.named_parameters():
        assert p.dtype == (torch.bfloat16 if n == "tok_emb.weight" else torch.float32), n
        assert torch.equal(p.detach(), ref[n].detach().bfloat16().to(p.dtype)), n
    assert not torch.equal(ref["tok_emb.weight"].detach(), tr.model.tok_emb.weight.detach().float())
    muon, adam = tr.opts
    assert muon.update_dtype == torch.bfloat16 and plain.opts[0].update_dtype == torch.float32
    seen = clip_spy(monkeypatch)
    tr.train_step(1.0)
    emb = tr.model.tok_emb.weight
    assert seen[0][0][id(emb)].dtype == torch.bfloat16 and emb.dtype == torch.bfloat16
    assert adam.state[emb]["exp_avg"].dtype == adam.state[emb]["exp_avg_sq"].dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in tr.ema.values())
    ema = tr.ema["tok_emb.weight"].clone()
    tr.apply_ema()  # cast back to bf16: the artifact stores tok_emb as bf16, as the published one
    assert emb.dtype == torch.bfloat16 and torch.equal(emb.detach(), ema.bfloat16())
    obj, _ = tg.quantize_state_dict(tr.model.state_dict())
    assert tg.dequantize_state_dict(obj)["tok_emb.weight"].dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# a. bigram_emb.scale's gradient is never cleared
# ----------------------------------------------------------------------------------------------

def test_scale_gradient_survives_priming_and_enters_the_clip(corpus, monkeypatch):
    """The scale's .grad accumulates from the first priming step on (the priming restore keeps it while restoring
    everything else), counts in the clip norm and is rescaled by the clip in place, and keeps accumulating."""
    tr = compat_trainer(seed=1, prime_steps=2, grad_clip_norm=0.01)
    scale = tr.model.bigram_emb.scale
    before = copy.deepcopy(tr.state())
    tr.prime()
    g0 = scale.grad.clone()
    assert g0 != 0
    after = tr.state()
    _assert_same(before["model"], after["model"], "model")
    _assert_same(before["opts"], after["opts"], "opts")
    seen = clip_spy(monkeypatch)
    tr.train_step(1.0)
    (pre1, n1), = seen
    total = torch.nn.utils.get_total_norm
    assert id(scale) in pre1 and torch.equal(n1, total(list(pre1.values())))
    assert not torch.equal(n1, total([g for i, g in pre1.items() if i != id(scale)]))
    coef = 0.01 / (float(n1) + 1e-6)
    assert coef < 0.5  # the clip is active
    assert torch.equal(pre1[id(scale)], g0)  # the priming's sum (this step's own part is 0: the bigram table is 0)
    assert float(scale.grad) == pytest.approx(float(pre1[id(scale)]) * coef, rel=1e-6)  # rescaled, kept
    kept = scale.grad.clone()
    tr.train_step(1.0)
    assert seen[1][0][id(scale)] != kept and scale.grad is not None  # the table moved: a fresh part adds
    left = [n for n, p in tr.model.named_parameters() if p.grad is not None]
    assert left == ["bigram_emb.scale"]  # every other gradient is cleared as in the default


def test_resume_equals_uninterrupted(corpus):
    """A checkpoint holds the kept gradient: priming, 2 steps, save (through torch.save/load with weights_only, as
    RESUME=1 reads it), 2 more steps == a fresh trainer loaded from it and stepped twice, bit for bit."""
    kw = dict(seed=2, prime_steps=2, grad_clip_norm=0.01, iterations=6, warmdown_iters=3)
    a = compat_trainer(**kw)
    a.prime()
    step = lambda t: t.train_step(tg.lr_multiplier(t.hp, t.step))
    for _ in range(2):
        step(a)
    buf = io.BytesIO()
    torch.save(a.state(), buf)
    assert buf.tell() and a.state()["kept_grads"][0] is not None
    b = compat_trainer(**kw)
    b.load_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for t in (a, b, a, b):
        step(t)
    sa, sb = a.state(), b.state()
    for k in ("model", "opts", "ema", "kept_grads", "data", "step"):
        _assert_same(sa[k], sb[k], k)


def test_ttt_starts_without_the_kept_gradient(corpus, monkeypatch):
    """After COMPAT_PR644 training the scale holds a gradient; TTT must not add it to its first step."""
    tr = compat_trainer(seed=3, prime_steps=2)
    tr.prime()
    tr.train_step(1.0)
    assert tr.model.bigram_emb.scale.grad is not None
    clean = copy.deepcopy(tr.model)
    clean.zero_grad(set_to_none=True)
    hp = tg.dataclasses.replace(tr.hp, eval_stride=32, ttt_chunk_tokens=512, ttt_batch_seqs=2, ttt_epochs=1)
    val = tg.load_validation(tg.dataclasses.replace(hp, val_max_tokens=1100))
    tables = tg.byte_tables(tg.load_tokenizer(hp), hp.vocab_size)
    firsts = []
    for model in (tr.model, clean):
        seen = clip_spy(monkeypatch)
        rt = tg.Runtime()
        rt.compiled = model
        tg.ttt_evaluate(hp, rt, model, val, tables)
        firsts.append(seen[0][0][id(model.bigram_emb.scale)])
    assert torch.equal(*firsts)
