"""Rate-targeted int6 quantization (QUANT_TARGET_BYTES, issue 7): the byte target is honoured, the
loss-aware grid choice beats one uniform grid at equal bytes, and the output is a plain
int6_clean_per_row_v1 artifact that the seed's reader loads (a big tensor may also stay fp16 in
`passthrough`, as the seed's QUANT_EMBED=0 keeps tok_emb)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import tg, tiny_model, train_briefly

quantize_to_budget, sensitivity_from_batches = tg.quantize_to_budget, tg.sensitivity_from_batches

# Tiny, but with tensors above the 65,536-element float limit, so that something is quantized:
# tok_emb 1024x96, mlp up/down 768x96 / 96x768 (5 int6 tensors, ~0.47 M weights).
CFG = dict(num_layers=2, model_dim=96, mlp_hidden=768, ve_layers="1", xsa_layers=1, train_seq_len=64,
           rope_train_seq_len=64)
SEQ, BATCH, STEPS = 64, 16, 60


def batches(stream: "tg.TokenStream", n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for _ in range(n):
        t = torch.from_numpy(stream.take(BATCH * SEQ + 1).astype(np.int64))
        out.append((t[:-1].view(BATCH, SEQ), t[1:].view(BATCH, SEQ)))
    return out


@pytest.fixture(scope="module")
def trained(corpus):
    """A briefly trained tiny model, its training-data sensitivity and held-out training batches."""
    model = tiny_model(seed=0, **CFG)
    stream = train_briefly(model, STEPS, BATCH, SEQ, lr=1e-2)  # 60 steps to ~5.8 nats: quantization then shows
    sens_batches, held = batches(stream, 4), batches(stream, 6)
    sens = sensitivity_from_batches(model, sens_batches)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seed_obj, _ = tg.quantize_state_dict(sd, True)
    return dict(model=model, sd=sd, sens=sens, held=held, sens_batches=sens_batches,
                seed_bytes=len(tg.serialize_artifact(seed_obj)), seed_obj=seed_obj)


@torch.no_grad()
def held_loss(model, sd: dict, held) -> float:
    tg.load_weights(model, sd, "test")
    return float(torch.stack([model(x, y).mean() for x, y in held]).mean())


def damage(model, sd: dict, obj: dict, held) -> float:
    """Held-out loss increase caused by an artifact's weight error e, without its first-order part: the mean of
    the losses at w+e and w-e, minus the loss at w. The first-order part (gradient . e) is as likely to lower the
    loss as to raise it on a briefly trained model: its sign is luck of rounding (with the plain loss the comparisons
    below failed for 5 of 8 nearby training settings, with this one for 1). The mirrored pair cancels it and leaves
    0.5*e'He, what the search minimises."""
    back = tg.dequantize_state_dict(obj)
    mirror = {k: 2 * sd[k] - v if v.is_floating_point() else v for k, v in back.items()}
    return 0.5 * (held_loss(model, back, held) + held_loss(model, mirror, held)) - held_loss(model, sd, held)


def quantized_names(sd: dict) -> list[str]:
    return [k for k, t in sd.items() if t.is_floating_point() and t.ndim == 2 and t.numel() > tg.KEEP_FLOAT_MAX_NUMEL]


def uniform_to_budget(sd: dict, budget: int) -> tuple[dict, int]:
    """Reference: one step multiplier m for every row of every tensor, step_r = m * rms(row r) (the issue's
    probe), q = clamp(round(w / step), -32, 31); the smallest m whose real zstd-22 size fits the budget."""
    def build(m: float) -> dict:
        obj, _ = tg.quantize_state_dict(sd, True)
        for k in obj["quantized"]:
            w = sd[k].float()
            s = (m * w.square().mean(1).sqrt()).clamp_min(1e-7).half()
            obj["quantized"][k] = torch.clamp(torch.round(w / s.float()[:, None]), -32, 31).to(torch.int8)
            obj["scales"][k] = s
        return obj
    lo, hi = math.log(1 / 64), math.log(16)  # bisect log m: bytes fall as m grows
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if len(tg.serialize_artifact(build(math.exp(mid)))) <= budget else (mid, hi)
    obj = build(math.exp(hi))
    return obj, len(tg.serialize_artifact(obj))


@pytest.mark.parametrize("mult", [1.0, 1.05, 1.2])
def test_byte_target_never_over_and_within_one_percent(trained, mult):
    budget = int(trained["seed_bytes"] * mult)
    obj, stats = quantize_to_budget(trained["sd"], budget, trained["sens"], True, lambda s: None)
    n = len(tg.serialize_artifact(obj))
    assert n == stats["bytes"] == len(stats["blob"])
    assert 0.99 * budget <= n <= budget, (n, budget)


@pytest.mark.parametrize("mult", [1.02, 1.05])
def test_byte_target_holds_with_gptq_codes(trained, mult):
    """QUANT_METHOD=gptq: GPTQ picks the codes on each chosen grid, and the bytes the controller measured are those
    of the artifact it returns (GPTQ codes compress differently from nearest rounding's), within the band. At 1.02x
    the controller's tries move a tensor's finer rows while keeping its step: codes cached by grid must not be
    reused across them (a cache keyed without the finer rows leaves codes of another grid in the artifact)."""
    model, sd = trained["model"], trained["sd"]
    tg.load_weights(model, sd, "test")
    gptq = {"H": tg.collect_hessians(model, trained["sens_batches"], tg.Runtime()), "damp": 0.01}
    budget = int(trained["seed_bytes"] * mult)
    obj, stats = quantize_to_budget(sd, budget, trained["sens"], True, lambda s: None, gptq)
    assert len(tg.serialize_artifact(obj)) == stats["bytes"] == len(stats["blob"])
    assert 0.99 * budget <= stats["bytes"] <= budget, (stats["bytes"], budget)
    assert {k for k in obj["quantized"] if "mlp" in k or k == "tok_emb.weight"} == set(stats["herr"])
    assert all(g < n for g, n, _ in stats["herr"].values()), stats["herr"]
    for k in stats["herr"]:  # the stored codes are GPTQ's on the stored grid (none left over from another grid)
        assert torch.equal(obj["quantized"][k].float(), tg.gptq_codes(sd[k], obj["scales"][k], gptq["H"][k], 0.01)[0]), k


@pytest.mark.parametrize("slope,mult", [(1.3, 1.2), (0.7, 1.1)])
def test_byte_target_holds_when_the_estimate_is_off_by_a_factor(trained, monkeypatch, slope, mult):
    """The histogram estimate's error varies with the grids (on the real tokenizer's sample the search once landed
    1.2% under the target, correcting its estimate by a constant). Here every compressed byte above 80% of the
    seed's size counts `slope` times: the search must still land within 1% under the target."""
    serialize, knee = tg.serialize_artifact, int(0.8 * trained["seed_bytes"])

    def skewed(obj: dict) -> bytes:
        blob = serialize(obj)
        extra = round((slope - 1) * max(len(blob) - knee, 0))
        return blob + bytes(extra) if extra >= 0 else blob[:extra]

    monkeypatch.setattr(tg, "serialize_artifact", skewed)
    budget = int(trained["seed_bytes"] * mult)
    _, stats = quantize_to_budget(trained["sd"], budget, trained["sens"], True, lambda s: None)
    assert 0.99 * budget <= stats["bytes"] <= budget, (stats["bytes"], budget)


def test_budget_extremes(trained):
    sd = trained["sd"]
    with pytest.raises(tg.UserError):  # even the coarsest grids cannot fit: refuse rather than overshoot
        quantize_to_budget(sd, 2000, trained["sens"], True, lambda s: None)
    # Far more bytes than int6 needs: under budget, no weight clipped (a tensor may also stay in fp16), and
    # less damage to the loss than at the seed's bytes.
    big, stats = quantize_to_budget(sd, 3 * trained["seed_bytes"], trained["sens"], True, lambda s: None)
    tight, _ = quantize_to_budget(sd, trained["seed_bytes"], trained["sens"], True, lambda s: None)
    assert stats["bytes"] <= 3 * trained["seed_bytes"]
    for k in quantized_names(sd):
        back = tg.dequantize_state_dict(big)[k]
        if k in big["quantized"]:
            assert (back - sd[k]).abs().le(big["scales"][k].float()[:, None] * 0.5 * (1 + 1e-3) + 1e-7).all(), k
        else:
            assert torch.equal(back, sd[k].half().float()), k
    model, held = trained["model"], trained["held"]
    assert damage(model, sd, big, held) < damage(model, sd, tight, held)


def test_loss_aware_beats_uniform_at_equal_bytes(trained):
    model, sd, held = trained["model"], trained["sd"], trained["held"]
    budget = trained["seed_bytes"]
    ours, stats = quantize_to_budget(sd, budget, trained["sens"], True, lambda s: None)
    uni, uni_bytes = uniform_to_budget(sd, budget)
    assert stats["bytes"] <= budget and uni_bytes <= budget
    d_ours, d_uni, d_seed = (damage(model, sd, obj, held) for obj in (ours, uni, trained["seed_obj"]))
    assert d_ours < d_uni, (d_ours, d_uni, d_seed)
    assert d_ours < d_seed, (d_ours, d_uni, d_seed)
    # The reported prediction is 0.5 * sum(F * e^2) of the weights it returns (the rows moved one grid
    # finer are interpolated, hence the tolerance).
    back, sens = tg.dequantize_state_dict(ours), trained["sens"]
    want = sum(0.5 * float((sens[k] * (back[k].float() - sd[k]).square()).sum()) for k in quantized_names(sd))
    assert abs(stats["predicted_dloss"] - want) <= 0.1 * want, (stats["predicted_dloss"], want)


def test_artifact_layout_and_seed_reader(trained, tmp_path):
    sd, seed_obj = trained["sd"], trained["seed_obj"]
    for mult in (1.0, 2.0):  # at 2x some tensor is worth keeping in fp16 (a passthrough entry, as QUANT_EMBED=0)
        obj, stats = quantize_to_budget(sd, int(trained["seed_bytes"] * mult), trained["sens"], True, lambda s: None)
        assert obj["__quant_format__"] == "int6_clean_per_row_v1"
        assert set(obj) == set(seed_obj)
        big = set(quantized_names(sd))
        assert set(obj["quantized"]) | (set(obj["passthrough"]) & big) == set(seed_obj["quantized"]) == big
        assert not set(obj["quantized"]) & set(obj["passthrough"])
        for section in ("scales", "dtypes", "qmeta"):
            assert list(obj[section]) == list(obj["quantized"]), section
        for k, q in obj["quantized"].items():
            assert q.dtype == torch.int8 and q.shape == sd[k].shape and -32 <= int(q.min()) and int(q.max()) <= 31
            assert obj["scales"][k].dtype == torch.float16 and obj["scales"][k].shape == (q.size(0),)
            assert obj["qmeta"][k] == {"scheme": "per_row", "axis": 0} and obj["dtypes"][k] == "float32"
        for k, t in obj["passthrough"].items():  # small tensors exactly as the seed keeps them; big ones fp16
            want = seed_obj["passthrough"].get(k, sd[k].half())
            assert t.dtype == want.dtype and torch.equal(t, want), k
            if k in big:
                assert obj["passthrough_orig_dtypes"][k] == "float32"
        path = tmp_path / f"final_model_{mult}.int6.ptz"
        path.write_bytes(stats["blob"])
        back = tg.dequantize_state_dict(tg.read_artifact(str(path)))
        model = tiny_model(seed=1, **CFG)
        tg.load_weights(model, back, "artifact")
        for k in obj["quantized"]:  # dequantized = q * per-row scale, within half a step of the float weights
            want = obj["quantized"][k].float() * obj["scales"][k].float()[:, None]
            assert torch.equal(model.state_dict()[k], want)
            assert ((want - sd[k]).abs() <= obj["scales"][k].float()[:, None] * 0.5 * (1 + 1e-3) + 1e-7).all()
        if mult > 1:
            assert set(obj["passthrough"]) & big, "no tensor kept in fp16 at 2x the seed's bytes"


def test_sensitivity_is_token_weighted_squared_gradient(trained):
    """Reference: per batch, the gradient of the mean loss via autograd, squared, times the batch's tokens,
    averaged over the batches."""
    model, bs = trained["model"], trained["sens_batches"][:2]
    tg.load_weights(model, trained["sd"], "test")
    got = sensitivity_from_batches(model, bs)
    names = ["tok_emb.weight", "blocks.0.mlp.up_proj.weight", "skip_weights"]
    params = dict(model.named_parameters())
    want = {k: torch.zeros_like(params[k]) for k in names}
    for x, y in bs:
        grads = torch.autograd.grad(model(x, y).mean(), [params[k] for k in names])
        for k, g in zip(names, grads):
            want[k] += g.square() * y.numel() / len(bs)
    for k in names:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # leaves no gradients behind


def test_quant_target_bytes_is_the_whole_submission_through_the_cli(tmp_path):
    """QUANT_TARGET_BYTES budgets model plus code bytes: a real run (this file's tiny-but-quantized model, 4 steps)
    given 400,000 bytes for the model on top of the script's size ends with bytes_total at most the target and
    within 1% of the model's share below it, as its artifact and submission.json say too."""
    from conftest import TINY, ROOT, run_script
    import json
    import re
    code = len((ROOT / "train_gpt.py").read_bytes())
    target = code + 400_000
    cfg = {k.upper(): str(v) for k, v in CFG.items()}
    r = run_script({**TINY, **cfg, "TTT_FREEZE_BLOCKS": "1", "ITERATIONS": "4", "WARMDOWN_ITERS": "2",
                    "TTT_ENABLED": "0", "EVAL_STRIDE": "0", "VAL_MAX_TOKENS": "2000", "QUANT_TARGET_BYTES": str(target),
                    "RUNS_DIR": str(tmp_path), "RUN_ID": "q"})
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"^bytes_model:(\d+) bytes_code:(\d+) bytes_total:(\d+) ", r.stdout, re.M)
    model_bytes, code_bytes, total = map(int, m.groups())
    assert code_bytes == code and total == model_bytes + code
    assert target - 0.01 * 400_000 <= total <= target, (total, target)
    assert (tmp_path / "q" / "final_model.int6.ptz").stat().st_size == model_bytes
    assert json.loads((tmp_path / "q" / "submission.json").read_text())["bytes_total"] == total
