"""Optimizers and the training step against the published recipe: Newton-Schulz, Muon vs an independent
reference, LR schedule and Muon momentum, parameter routing, EMA arithmetic, priming undo, NaN detection."""
from __future__ import annotations

import copy
import math
import re
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT, SAMPLE, clean_env, tg, tiny_hp, tiny_model


def orth_spectrum(rows: int, cols: int, lo: float, g: torch.Generator):
    """A matrix U diag(s) V^T with singular values s in [lo, 1], and its polar factor U V^T."""
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
    s = torch.empty(k).uniform_(lo, 1.0, generator=g)
    return U @ torch.diag(s) @ V.T, U @ V.T


# ----------------------------------------------------------------------------------------------
# Newton-Schulz
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(128, 32), (32, 128), (64, 64), (96, 200)])
def test_newton_schulz_orthogonalises(shape):
    """5 quintic steps push every singular value into a band around 1 (~0.68..1.14 for these inputs) and the
    result points along the polar factor U V^T."""
    g = torch.Generator().manual_seed(1)
    G, polar = orth_spectrum(*shape, lo=0.1, g=g)
    for M in (G, torch.randn(*shape, generator=g)) if shape[0] != shape[1] else (G,):
        X = tg.newton_schulz(M, 5).float()
        assert X.shape == M.shape
        s = torch.linalg.svdvals(X)
        assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    X = tg.newton_schulz(G, 5).float()
    cos = (X * polar).sum() / (X.norm() * polar.norm())
    assert cos > 0.97
    # scale invariance (the input is normalised by its norm; a power of two keeps the bf16 rounding identical)
    torch.testing.assert_close(tg.newton_schulz(1024.0 * G, 5).float(), X, atol=0.01, rtol=0)


@pytest.mark.parametrize("shape", [(128, 32), (32, 128), (64, 64)])
def test_newton_schulz_transpose_symmetry(shape):
    """NS(G^T) = NS(G)^T (exactly for rectangular matrices, to bf16 precision for square ones)."""
    g = torch.Generator().manual_seed(2)
    G = torch.randn(*shape, generator=g)
    a, b = tg.newton_schulz(G.T, 5).float(), tg.newton_schulz(G, 5).float().T
    if shape[0] != shape[1]:
        assert torch.equal(a, b)
    else:
        assert (a - b).abs().max() < 0.05


def test_newton_schulz_more_steps_converge():
    g = torch.Generator().manual_seed(3)
    G, _ = orth_spectrum(64, 48, lo=0.02, g=g)
    s1 = torch.linalg.svdvals(tg.newton_schulz(G, 1).float())
    s5 = torch.linalg.svdvals(tg.newton_schulz(G, 5).float())
    assert s1.min() < 0.5 and s5.min() > 0.6  # one step is not enough for the small singular values


def ns_op_by_op(G: torch.Tensor, steps: int, fused_pointwise: bool) -> torch.Tensor:
    """The published bf16 iteration b*A + c*A@A, a*X + B@X: eagerly, a rounding per operation (the CPU's path
    before); fused_pointwise: the matmuls' outputs rounded, the sums in float32 rounded once (as torch.compile
    fuses them: the GPU's path before)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    X = X.mT if G.size(-2) > G.size(-1) else X
    for _ in range(steps):
        A = X @ X.mT
        if fused_pointwise:
            B = (b * A.float() + c * (A @ A).float()).bfloat16()
            X = (a * X.float() + (B @ X).float()).bfloat16()
        else:
            X = a * X + (b * A + c * A @ A) @ X
    return X.mT if G.size(-2) > G.size(-1) else X


@pytest.mark.parametrize("shape", [(6, 128, 128), (4, 64, 128), (3, 192, 64), (96, 24)])
def test_newton_schulz_is_nearer_the_exact_iteration_than_the_op_by_op_forms(shape):
    """Newton-Schulz runs uncompiled, each step three matmuls whose epilogues add the scaled terms (baddbmm). Its
    bf16 result differs from the published op-by-op form by rounding only, and lies nearer the exact (float64)
    iteration than that form did on the CPU (a rounding per operation) or compiled on a GPU (fused sums)."""
    g = torch.Generator().manual_seed(7)
    G = torch.randn(*shape, generator=g)
    exact = ref_ns_exact(G, 5)
    err = lambda X: float((X.float() - exact).norm() / exact.norm())
    ours, eager, fused = err(tg.newton_schulz(G, 5)), err(ns_op_by_op(G, 5, False)), err(ns_op_by_op(G, 5, True))
    assert ours < 0.02 and ours < 0.9 * fused < 0.9 * eager, (ours, fused, eager)


# ----------------------------------------------------------------------------------------------
# Muon
# ----------------------------------------------------------------------------------------------

def ref_ns_exact(G: torch.Tensor, steps: int) -> torch.Tensor:
    """The quintic iteration in float64 (no bf16), written independently."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.double()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # each matrix of a stack on its own
    flip = X.shape[-2] > X.shape[-1]
    if flip:
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return (X.mT if flip else X).float()


def _muon_setup(seed=4):
    g = torch.Generator().manual_seed(seed)
    shapes = [(48, 16), (16, 40), (24, 24)]
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    grads = [[torch.randn(*s, generator=g) for s in shapes] for _ in range(2)]
    return params, grads


@pytest.mark.parametrize("use_default_ns", [False, True])
def test_muon_two_steps_match_reference(use_default_ns):
    """Muon vs the published recipe: buf = m*buf + g; u = NS(g + m*buf) * sqrt(max(1, rows/cols));
    p = p*(1 - lr*wd) - lr*u; two steps, two groups with different LRs and momenta."""
    params, grads = _muon_setup()
    lrs, moms, wd = [0.05, 0.02], [0.9, 0.95], 0.1
    groups = [dict(params=params[:2], lr=lrs[0]), dict(params=params[2:], lr=lrs[1], momentum=moms[1])]
    ns = tg.newton_schulz if use_default_ns else ref_ns_exact
    opt = tg.Muon(groups, momentum=moms[0], steps=5, wd=wd, **({} if use_default_ns else {"ns": ref_ns_exact}))
    ref_p = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in ref_p]
    group_of = [0, 0, 1]
    for step in range(2):
        for p, gr in zip(params, grads[step]):
            p.grad = gr.clone()
        opt.step()
        for i, gr in enumerate(grads[step]):
            lr, m = lrs[group_of[i]], moms[group_of[i]]
            bufs[i] = m * bufs[i] + gr
            u = ns(gr + m * bufs[i], 5).float() * math.sqrt(max(1.0, ref_p[i].shape[0] / ref_p[i].shape[1]))
            ref_p[i] = ref_p[i] * (1 - lr * wd) - lr * u
        for i, p in enumerate(params):
            if use_default_ns:  # bf16 NS: a rounding flip in its input may move an update entry by a few bf16 ulps
                assert (p.detach() - ref_p[i]).abs().max() < 0.02 * lrs[group_of[i]]
            else:
                torch.testing.assert_close(p.detach(), ref_p[i], atol=1e-6, rtol=1e-6)


def test_muon_bf16_update_buffer():
    """COMPAT_PR644 (update_dtype=bf16): the Newton-Schulz output times sqrt(max(1, rows/cols)) is rounded in bf16
    and held in a bf16 buffer before it is applied; the default keeps that product in fp32. The 48x16 matrix
    (factor sqrt(3)) shows the difference."""
    lr, m, wd = 0.05, 0.9, 0.1
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        params, grads = _muon_setup()
        opt = tg.Muon([dict(params=params, lr=lr)], momentum=m, steps=5, wd=wd, update_dtype=dtype)
        for p, gr in zip(params, grads[0]):
            p.grad = gr.clone()
        want = [p.detach().clone() for p in params]
        opt.step()
        for i, gr in enumerate(grads[0]):
            u = tg.newton_schulz(gr.add(gr, alpha=m), 5)  # momentum buffer after one step = the gradient
            assert u.dtype == torch.bfloat16
            f = math.sqrt(max(1.0, gr.shape[0] / gr.shape[1]))
            upd = (u * f).float() if dtype == torch.bfloat16 else u.float() * f
            want[i].mul_(1 - lr * wd).add_(upd, alpha=-lr)
            assert torch.equal(params[i].detach(), want[i]), (dtype, i)
        out[dtype] = params[0].detach()
    assert not torch.equal(out[torch.bfloat16], out[torch.float32])


def test_batched_newton_schulz_equals_one_matrix_at_a_time():
    """A stack of same-shape matrices, each normalised by its own norm (the stack's scales span 1e-2..1e2): the same
    result as one call per matrix. On the CPU the kernels per matrix are the same, so the results are bit-equal; a
    GPU's batched matmul may sum in another order, which can flip bf16 roundings (not checked here)."""
    g = torch.Generator().manual_seed(5)
    for shape in ((64, 64), (96, 32), (32, 96)):
        G = torch.randn(4, *shape, generator=g) * torch.tensor([1.0, 100.0, 0.01, 3.0]).view(4, 1, 1)
        assert torch.equal(tg.newton_schulz(G, 5), torch.stack([tg.newton_schulz(m, 5) for m in G])), shape


def per_matrix_muon_step(opt: "tg.Muon") -> None:
    """Muon's step before batching, written out as the reference: per parameter, momentum, Newton-Schulz of that
    matrix alone, the scale in the update dtype, decoupled decay."""
    for g in opt.param_groups:
        for p in g["params"]:
            buf = opt.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            buf.mul_(g["momentum"]).add_(p.grad)
            u = tg.newton_schulz(p.grad.add(buf, alpha=g["momentum"]), g["steps"])
            u = u.to(opt.update_dtype) * max(1.0, p.size(0) / p.size(1)) ** 0.5
            p.mul_(1 - g["lr"] * g["wd"]).add_(u.to(p.dtype), alpha=-g["lr"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_muon_equals_the_per_matrix_path(dtype):
    """Three steps over two groups (other LR and momentum) holding matrices of three shapes, two of them repeated
    across groups (so batches mix groups): bit-equal to the per-matrix step, weights and momentum buffers, with the
    default fp32 update buffer and COMPAT_PR644's bf16 one."""
    g = torch.Generator().manual_seed(6)
    shapes = [(48, 16), (24, 24), (48, 16), (16, 40), (24, 24), (48, 16)]
    init = [torch.randn(*s, generator=g) for s in shapes]
    grads = [[torch.randn(*s, generator=g) for s in shapes] for _ in range(3)]
    runs = []
    for batched in (True, False):
        params = [torch.nn.Parameter(w.clone()) for w in init]
        opt = tg.Muon([dict(params=params[:3], lr=0.05), dict(params=params[3:], lr=0.02, momentum=0.8)],
                      momentum=0.95, steps=5, wd=0.1, update_dtype=dtype)
        for step in range(3):
            for p, gr in zip(params, grads[step]):
                p.grad = gr.clone()
            opt.step() if batched else torch.no_grad()(per_matrix_muon_step)(opt)
        runs.append((params, [opt.state[p]["momentum_buffer"] for p in params]))
    (pb, bb), (pr, br) = runs
    for i in range(len(shapes)):
        assert torch.equal(pb[i].detach(), pr[i].detach()) and torch.equal(bb[i], br[i]), i
        assert not torch.equal(pb[i].detach(), init[i])


MUON_RANK_SCRIPT = """
import os
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import train_gpt as tg

def no_all_reduce(*args, **kwargs):
    raise AssertionError("Muon all-reduced its updates")

dist.init_process_group("gloo")
data, out, calls, sent = torch.load(sys.argv[2]), {}, [], []
name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"  # as Muon picks
gather = getattr(dist, name)
setattr(dist, name, lambda every, mine: sent.append(mine.numel()) or gather(every, mine))
dist.all_reduce = no_all_reduce
for dtype in (torch.float32, torch.bfloat16):
    params = [torch.nn.Parameter(w.clone()) for w in data["init"]]
    ns = lambda G, steps: calls.append((str(dtype), tuple(G.shape))) or tg.newton_schulz(G, steps)
    opt = tg.Muon([dict(params=params[:4], lr=0.05), dict(params=params[4:], lr=0.02, momentum=0.8)],
                  momentum=0.95, steps=5, wd=0.1, ns=ns, update_dtype=dtype)
    for grads in data["grads"]:
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
    out[str(dtype)] = [(p.detach(), opt.state[p]["momentum_buffer"]) for p in params]
torch.save({"out": out, "calls": calls, "sent": sent}, f"{sys.argv[3]}/rank{dist.get_rank()}.pt")
dist.barrier()
os._exit(0)  # as train_gpt.py: gloo's teardown at exit can abort a rank whose peers have gone
"""


def test_muon_on_3_processes_equals_one_and_gathers_each_share_once(tmp_path):
    """3 gloo ranks, 9 matrices of 3 shapes in two groups, 3 steps, fp32 and bf16 update buffers: every rank ends
    with the weights and momentum buffers of the one-process per-matrix path, bit for bit. Each matrix is
    orthogonalised on one rank only (every 3rd of the shape-sorted list), and the updates travel by one
    all-gather per step (no all-reduce) of a share at most one matrix longer than an even third."""
    g = torch.Generator().manual_seed(7)
    shapes = [(48, 16), (24, 24), (48, 16), (16, 40), (24, 24), (48, 16), (48, 16), (16, 40), (48, 16)]
    data = {"init": [torch.randn(*s, generator=g) for s in shapes],
            "grads": [[torch.randn(*s, generator=g) for s in shapes] for _ in range(3)]}
    torch.save(data, tmp_path / "data.pt")
    (tmp_path / "rank.py").write_text(MUON_RANK_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                        str(tmp_path / "rank.py"), str(ROOT), str(tmp_path / "data.pt"), str(tmp_path)],
                       env=clean_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    ranks = [torch.load(tmp_path / f"rank{k}.pt") for k in range(3)]
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.nn.Parameter(w.clone()) for w in data["init"]]
        opt = tg.Muon([dict(params=params[:4], lr=0.05), dict(params=params[4:], lr=0.02, momentum=0.8)],
                      momentum=0.95, steps=5, wd=0.1, update_dtype=dtype)
        for grads in data["grads"]:
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            torch.no_grad()(per_matrix_muon_step)(opt)
        for k, rank in enumerate(ranks):
            for i, ((w, buf), p) in enumerate(zip(rank["out"][str(dtype)], params)):
                assert torch.equal(w, p.detach()) and torch.equal(buf, opt.state[p]["momentum_buffer"]), (k, i, dtype)
    order = sorted(shapes, key=lambda s: list(dict.fromkeys(shapes)).index(s))  # shape by shape
    total, longest = sum(math.prod(s) for s in shapes), max(math.prod(s) for s in shapes)
    share = max(sum(math.prod(s) for s in order[j::3]) for j in range(3))  # every rank sends the longest share
    assert share <= total / 3 + longest
    for k, rank in enumerate(ranks):
        done = [(tuple(shape), n) for dt, (n, *shape) in rank["calls"] if dt == "torch.float32"]
        assert sorted(done) == sorted(list(Counter(order[k::3]).items()) * 3), (k, done)  # a call per shape and step
        assert rank["sent"] == [share] * 6, k  # one all-gather per step, 3 steps x 2 update dtypes


# ----------------------------------------------------------------------------------------------
# LR schedule and Muon momentum
# ----------------------------------------------------------------------------------------------

def sched_hp(**kw):
    env = dict(ITERATIONS="25000", WARMDOWN_ITERS="13000", WARMUP_STEPS="20")
    env.update({k.upper(): str(v) for k, v in kw.items()})
    return tg.Hyperparameters.from_env(env)


@pytest.mark.parametrize("shape", ["cosine", "linear"])
def test_lr_multiplier_steps(shape):
    hp = sched_hp(warmdown_shape=shape)
    f = lambda s: tg.lr_multiplier(hp, s)
    assert f(0) == pytest.approx(1 / 20)
    assert f(9) == pytest.approx(10 / 20)
    assert f(19) == pytest.approx(1.0)
    assert f(20) == f(5000) == f(12000) == pytest.approx(1.0)
    assert f(18500) == pytest.approx(0.5)  # midpoint of the warm-down, both shapes
    quarter = 12000 + 13000 // 4  # 15250
    want = 0.75 if shape == "linear" else 0.5 * (1 + math.cos(math.pi / 4))
    assert f(quarter) == pytest.approx(want)
    assert 0 <= f(24999) < 1e-3
    assert f(25000) == pytest.approx(0.0, abs=1e-12)
    vals = [f(s) for s in range(12000, 25001, 250)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone warm-down


def test_lr_multiplier_default_is_cosine():
    hp = sched_hp()
    assert hp.warmdown_shape == "cosine"
    assert tg.lr_multiplier(hp, 15250) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


@pytest.mark.parametrize("shape", ["cosine", "linear"])
def test_lr_multiplier_wallclock(shape):
    """Cap 600 s, step 100 ms, WARMDOWN_ITERS=1000: warm-down over the last 100 s, 0 at the cap."""
    hp = sched_hp(warmdown_shape=shape, max_wallclock_seconds=600, warmdown_iters=1000)
    f = lambda elapsed_s, step=3000: tg.lr_multiplier(hp, step, elapsed_s * 1000.0, 100.0)
    assert f(10) == f(300) == f(499) == pytest.approx(1.0)
    assert f(550) == pytest.approx(0.5)
    assert f(575) == pytest.approx(0.25 if shape == "linear" else 0.5 * (1 + math.cos(0.75 * math.pi)))
    assert f(600) == pytest.approx(0.0, abs=1e-12) and f(700) == pytest.approx(0.0, abs=1e-12)
    assert f(0, step=0) == pytest.approx(1 / 20)  # warm-up still applies
    # a slower step rate starts the warm-down earlier: 200 ms/step -> last 200 s
    assert tg.lr_multiplier(hp, 3000, 450_000.0, 200.0) == pytest.approx(
        0.75 if shape == "linear" else 0.5 * (1 + math.cos(0.25 * math.pi)))


def test_muon_momentum_warmup():
    hp = sched_hp()
    assert tg.muon_momentum(hp, 0) == pytest.approx(0.92)
    assert tg.muon_momentum(hp, 750) == pytest.approx(0.955)
    assert tg.muon_momentum(hp, 300) == pytest.approx(0.92 + 0.07 * 0.2)
    assert tg.muon_momentum(hp, 1500) == pytest.approx(0.99)
    assert tg.muon_momentum(hp, 20000) == pytest.approx(0.99)


# ----------------------------------------------------------------------------------------------
# parameter routing
# ----------------------------------------------------------------------------------------------

MATRIX_LR, SCALAR_LR, EMBED_LR = 0.011, 0.013, 0.017


def expected_route(name: str, n_enc: int):
    """(optimizer, lr) by the published recipe, or None for bigram_emb.scale (frozen in the seed)."""
    if name == "bigram_emb.scale":
        return None
    if name == "tok_emb.weight":
        return ("adam", EMBED_LR)
    if name == "bigram_emb.proj.weight":
        return ("muon", MATRIX_LR)
    m = re.match(r"blocks\.(\d+)\.(.*)", name)
    if m:
        mult = 2.0 if int(m.group(1)) >= n_enc else 1.0
        linear = m.group(2) in {f"attn.{n}.weight" for n in ("c_q", "c_k", "c_v", "proj")} | {
            "mlp.up_proj.weight", "mlp.down_proj.weight"}
        return ("muon", MATRIX_LR * mult) if linear else ("adam", SCALAR_LR * mult)
    assert name.split(".")[0] in {"smear_gate", "skip_weights", "skip_gates", "bigram_emb", "ve_shared",
                                  "ve_layer_scales"}, name
    return ("adam", SCALAR_LR)


def test_param_roles_cover_every_parameter_once():
    model = tiny_model()
    roles = tg.param_roles(model)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(roles) == sorted(names) and len(names) == len(set(names))
    assert roles["bigram_emb.scale"][0] == "frozen"


def test_build_optimizers_routing():
    hp = tiny_hp(matrix_lr=MATRIX_LR, scalar_lr=SCALAR_LR, tied_embed_lr=EMBED_LR, decoder_lr_mult=2.0)
    model = tg.GPT(hp)
    opts = tg.build_optimizers(hp, model)
    where: dict[int, list] = {}
    for opt in opts:
        kind = "muon" if isinstance(opt, tg.Muon) else "adam" if isinstance(opt, torch.optim.AdamW) else "?"
        for grp in opt.param_groups:
            assert grp["base_lr"] == grp["lr"]
            for p in grp["params"]:
                where.setdefault(id(p), []).append((kind, grp["lr"]))
    n_enc = hp.num_layers // 2
    seen_decoder_matrix = False
    for name, p in model.named_parameters():
        want = expected_route(name, n_enc)
        got = where.get(id(p), [])
        if want is None:
            assert got == [], f"{name} must not be optimized (seed leaves it at its init)"
            continue
        assert p.requires_grad
        assert len(got) == 1, f"{name} is in {len(got)} optimizer groups"
        assert got[0][0] == want[0] and got[0][1] == pytest.approx(want[1]), (name, got, want)
        seen_decoder_matrix |= name == "blocks.3.attn.c_q.weight"
    assert seen_decoder_matrix
    assert len(where) == sum(1 for _ in model.parameters()) - 1
    muon, adam = opts
    assert isinstance(muon, tg.Muon) and isinstance(adam, torch.optim.AdamW)
    assert adam.defaults["betas"] == (0.9, 0.95) and adam.defaults["eps"] == 1e-8
    assert adam.defaults["weight_decay"] == pytest.approx(0.04)
    assert all(g["wd"] == pytest.approx(0.04) for g in muon.param_groups)


# ----------------------------------------------------------------------------------------------
# Trainer: EMA, priming, non-finite loss
# ----------------------------------------------------------------------------------------------

def make_trainer(seed=0, **kw):
    kw = {"train_batch_tokens": 512, "micro_batch_seqs": 2, **kw}  # 4 sequences of 128: 2 micro-steps
    hp = tiny_hp(**kw)
    torch.manual_seed(seed)
    model = tg.GPT(hp)
    rt = tg.Runtime()
    rt.compiled = model
    stream = tg.TokenStream(tg.shard_files(str(SAMPLE), "train"))
    return tg.Trainer(hp, rt, model, stream)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ema_arithmetic(corpus):
    d = 0.9
    tr = make_trainer(ema_decay=d)
    w = [snapshot(tr.model)]
    for _ in range(2):
        tr.train_step(1.0)
        w.append(snapshot(tr.model))
    assert set(tr.ema) == set(w[0])
    moved = 0
    for k in w[0]:
        want = d * (d * w[0][k].float() + (1 - d) * w[1][k].float()) + (1 - d) * w[2][k].float()
        torch.testing.assert_close(tr.ema[k], want, atol=1e-6, rtol=1e-6, msg=k)
        moved += int(not torch.equal(w[2][k], w[0][k]))
    assert moved > 10  # the steps really changed the weights


def _assert_same(a, b, path="state"):
    """Recursive bit-for-bit comparison of nested state (tensors, dicts, lists, scalars)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path} keys differ: {set(a) ^ set(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_prime_restores_exact_state(corpus):
    """Priming must restore every state it touched: weights, optimizer state, EMA, data
    position, step counter and RNG, bit for bit."""
    tr = make_trainer(seed=1, prime_steps=3)
    before = copy.deepcopy(tr.state())  # deep copy: nothing the priming does in place may reach it
    tr.prime()
    after = copy.deepcopy(tr.state())
    _assert_same(before["model"], after["model"], "model")
    _assert_same(before["opts"], after["opts"], "opts")
    _assert_same(before["data"], after["data"], "data")
    assert before["step"] == after["step"] == 0 and before["train_ms"] == after["train_ms"]
    assert torch.equal(before["rng"], after["rng"])
    tr.check_finite()
    _assert_same(before["ema"], after["ema"], "ema")  # the EMA must not remember the priming steps


def test_step_after_prime_equals_fresh_step(corpus):
    """One train_step after priming == one train_step of a fresh identical trainer, bit for bit."""
    tr = make_trainer(seed=1, prime_steps=3)
    tr.prime()
    fresh = make_trainer(seed=1, prime_steps=3)
    la, lb = tr.train_step(1.0), fresh.train_step(1.0)
    assert torch.equal(la, lb)
    a, b = copy.deepcopy(fresh.state()), copy.deepcopy(tr.state())
    _assert_same(a["model"], b["model"], "model after 1 step")
    _assert_same(a["opts"], b["opts"], "opts after 1 step")
    assert a["data"] == b["data"] and a["step"] == b["step"] == 1
    _assert_same(a["ema"], b["ema"], "ema after 1 step")


def test_no_gradient_survives_a_step(corpus):
    """A step's gradients must not leak into the next step. bigram_emb.scale is in no optimizer, so
    zero_grad of the optimizers never clears it: its .grad would accumulate over all steps and inflate the
    global norm used by GRAD_CLIP_NORM (and make a step depend on history that state() does not hold)."""
    tr = make_trainer(seed=3)
    for _ in range(3):
        tr.train_step(1.0)
    left = {n: float(p.grad.abs().max()) for n, p in tr.model.named_parameters()
            if p.grad is not None and bool(p.grad.abs().max() > 0)}
    assert not left, f"gradients left over after train_step: {left}"


def test_prime_really_trains_then_undoes(corpus):
    """Guard for the test above: the priming steps do change the weights while they run."""
    tr = make_trainer(seed=1, prime_steps=3)
    w0 = snapshot(tr.model)
    seen = {}
    orig = tr.train_step

    def spy(lr, **kw):
        out = orig(lr, **kw)
        seen["w"] = snapshot(tr.model)
        return out
    tr.train_step = spy
    tr.prime()
    assert not torch.equal(seen["w"]["blocks.0.attn.c_q.weight"], w0["blocks.0.attn.c_q.weight"])
    assert torch.equal(snapshot(tr.model)["blocks.0.attn.c_q.weight"], w0["blocks.0.attn.c_q.weight"])


def test_priming_is_the_published_warmup(corpus, monkeypatch):
    """Priming steps run as the published script's warm-up: LR multiplier 1, Muon at MUON_MOMENTUM (no momentum
    warm-up), no gradient clip. The steps after it clip and warm the momentum up from 0.92."""
    tr = make_trainer(seed=1, prime_steps=2, grad_clip_norm=0.3)
    clips, seen = [], []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: clips.append(1) or torch.tensor(1.0))
    real = tg.Muon.step

    def spy(self):
        g = self.param_groups[0]
        seen.append((g["momentum"], g["lr"] / g["base_lr"]))
        return real(self)
    monkeypatch.setattr(tg.Muon, "step", spy)
    tr.prime()
    assert clips == [] and seen == [(0.99, 1.0), (0.99, 1.0)]
    tr.train_step(tg.lr_multiplier(tr.hp, 0))
    assert clips == [1] and seen[-1][0] == pytest.approx(0.92) and seen[-1][1] == pytest.approx(0.5)


def test_non_finite_loss_raises_with_step(corpus):
    tr = make_trainer(seed=2)
    tr.train_step(1.0)
    tr.check_finite()  # a healthy step does not raise
    with torch.no_grad():
        tr.model.tok_emb.weight.fill_(float("nan"))
    loss = tr.train_step(1.0)
    assert not torch.isfinite(loss)
    tr.train_step(1.0)  # the first bad step is the one reported
    with pytest.raises(tg.UserError, match=r"\bstep 2\b"):
        tr.check_finite()


# ----------------------------------------------------------------------------------------------
# One training step, written out
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_train_step_matches_hand_written_steps(corpus, monkeypatch, clip):
    """Two train_steps of 2 micro-batches against the recipe written out: the gradient of the mean loss over the whole
    batch (accumulation scaling), clipped over all parameters to GRAD_CLIP_NORM (what the optimizers see then has
    exactly that norm; with the clip off, the raw gradient), AdamW and Muon by role with LR = base x lr_mult
    (decoder blocks x2), Muon momentum from its warm-up at each step (0.5, then 0.7)."""
    monkeypatch.setattr(tg, "newton_schulz", ref_ns_exact)  # float64 Newton-Schulz: no bf16 rounding flips
    tr = make_trainer(seed=5, ema_decay=0, grad_clip_norm=clip, matrix_lr=MATRIX_LR, scalar_lr=SCALAR_LR,
                      tied_embed_lr=EMBED_LR, muon_momentum_warmup_start=0.5, muon_momentum=0.9,
                      muon_momentum_warmup_steps=2)
    hp, model = tr.hp, tr.model
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # wake the zero-initialised projections, so every matrix gets a gradient
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    seen = []
    tr.opts[0].register_step_pre_hook(lambda *_: seen.append({k: p.grad.clone() for k, p in
                                                                 model.named_parameters() if p.grad is not None}))
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    ref = dict(start)
    state = {k: [torch.zeros_like(v), torch.zeros_like(v)] for k, v in ref.items()}  # Adam m, v / Muon buffer
    tokens = torch.from_numpy(np.fromfile(sorted(SAMPLE.glob("fineweb_train_*.bin"))[0], "<u2", offset=1024)[:1028]
                              .astype(np.int64)).view(2, 2, 2 * 128 + 1)  # step, micro-step, 2 sequences + 1
    for step, lr_mult in enumerate((1.0, 0.5)):
        x = torch.cat([t[:-1].view(2, 128) for t in tokens[step]])
        y = torch.cat([t[1:].view(2, 128) for t in tokens[step]])
        params = {k: v.clone().requires_grad_() for k, v in ref.items()}
        loss = torch.func.functional_call(model, params, (x, y)).mean()  # all 4 sequences at once
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        norm = math.sqrt(sum(float(v.square().sum()) for v in grads.values()))
        scale = min(1.0, clip / (norm + 1e-6)) if clip else 1.0
        mom = 0.5 + 0.4 * min(step / 2, 1.0)
        for k, gr in grads.items():
            gr, route = gr * scale, expected_route(k, hp.num_layers // 2)
            if route is None:
                continue
            kind, lr = route[0], route[1] * lr_mult
            w, (a, b) = ref[k] * (1 - lr * 0.04), state[k]
            if kind == "adam":
                a.mul_(0.9).add_(0.1 * gr)
                b.mul_(0.95).add_(0.05 * gr * gr)
                ref[k] = w - lr * (a / (1 - 0.9 ** (step + 1))) / ((b / (1 - 0.95 ** (step + 1))).sqrt() + 1e-8)
            else:
                a.mul_(mom).add_(gr)
                ref[k] = w - lr * ref_ns_exact(gr + mom * a, 5) * math.sqrt(max(1.0, w.size(0) / w.size(1)))
        tr.train_step(lr_mult)
        got = seen[-1]
        assert set(got) == set(grads)
        for k, gr in grads.items():
            assert float((got[k] - gr * scale).norm()) <= 1e-4 * float((gr * scale).norm()) + 1e-12, k
        got_norm = math.sqrt(sum(float(v.square().sum()) for v in got.values()))
        assert got_norm == pytest.approx(min(norm, clip or norm), rel=1e-5)
        assert norm > 2 * clip  # so the clip really acts when it is on
    assert len(seen) == 2
    for k, p in model.named_parameters():
        err, moved = float((p.detach() - ref[k]).norm()), float((ref[k] - start[k]).norm())
        assert (moved == 0) == (k == "bigram_emb.scale"), k
        assert err <= 1e-3 * moved + 1e-9, (k, err, moved)


# ----------------------------------------------------------------------------------------------
# Batch split over processes
# ----------------------------------------------------------------------------------------------

SEED = dict(train_batch_tokens=786432, train_seq_len=2048, rope_train_seq_len=2048, micro_batch_seqs=48)
SEED_SPLITS = {1: (48, 8), 2: (48, 4), 3: (32, 4), 4: (48, 2), 6: (32, 2), 8: (48, 1)}  # docs/reproduce.md's table


def test_batch_split_of_the_seed_batch_for_1_to_8_processes():
    """384 sequences: the largest micro-batch <= 48 dividing each rank's share; 5 and 7 processes cannot share
    384 sequences equally and are refused with the nearest global batches that do split."""
    hp = tiny_hp(**SEED)
    assert {w: tg.batch_split(hp, w)[:2] for w in SEED_SPLITS} == SEED_SPLITS
    for world, near in ((5, (380, 385)), (7, (378, 385))):
        with pytest.raises(tg.UserError) as info:
            tg.batch_split(hp, world)
        msg = str(info.value)
        assert f"does not split over {world} processes" in msg, msg
        assert msg.endswith(f"TRAIN_BATCH_TOKENS={near[0] * 2048} or {near[1] * 2048}"), msg
        for seqs in near:
            micro, accum, _ = tg.batch_split(tiny_hp(**{**SEED, "train_batch_tokens": seqs * 2048}), world)
            assert micro * accum * world == seqs and micro <= 48


def test_batch_split_small_batches_and_micro_batches():
    T = 128
    def split(seqs, micro, world):
        return tg.batch_split(tiny_hp(train_batch_tokens=seqs * T, micro_batch_seqs=micro), world)[:2]
    assert split(60, 48, 1) == (30, 2)  # refused before: 48 does not divide 60
    assert split(16, 48, 4) == (4, 1) and split(16, 5, 1) == (4, 4) and split(14, 4, 2) == (1, 7)
    with pytest.raises(tg.UserError, match=r"multiple of 768, e\.g\. TRAIN_BATCH_TOKENS=1536 or 2304$"):
        split(16, 16, 6)
    with pytest.raises(tg.UserError, match=r"TRAIN_BATCH_TOKENS=1024$"):  # fewer sequences than processes
        split(2, 16, 8)


class CountingStream:
    """A stream whose token at stream position i is i: each batch shows which span it came from."""

    def __init__(self):
        self.pos = 0

    def take(self, n):
        self.pos += n
        return np.arange(self.pos - n, self.pos)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_seed_data_order_on_1_2_4_8_processes_is_unchanged(world):
    """The order before the split changed, written out: each step reads one contiguous span of 8 pieces of
    48 x 2048 + 1 tokens, and micro-step a of rank r gets piece a * world + r."""
    hp = tiny_hp(**SEED, VOCAB_SIZE=1 << 22)  # the tokens are stream positions: up to 1.6 M, all "in the vocabulary"
    model = tiny_model()
    n = 48 * 2048 + 1
    for rank in range(world):
        tr = tg.Trainer(hp, tg.Runtime(rank=rank, world=world), model, CountingStream())
        assert (tr.micro, tr.accum) == (48, 8 // world)
        for step in range(2):
            batch = tr.next_batch()
            assert len(batch) == 8 // world
            for a, (x, y) in enumerate(batch):
                start = step * 8 * n + (a * world + rank) * n
                assert torch.equal(x.flatten(), torch.arange(start, start + n - 1))
                assert torch.equal(y.flatten(), torch.arange(start + 1, start + n)) and x.shape == (48, 2048)


# ----------------------------------------------------------------------------------------------
# Micro-batches stacked from pieces (MICRO_BATCH_PIECES)
# ----------------------------------------------------------------------------------------------

def test_micro_pieces_choice():
    """The knob, capped to a divisor of the accumulation steps; the default is the published one piece per forward."""
    assert tg.Hyperparameters().micro_batch_pieces == 1
    pieces = lambda k, accum: tg.batch_split(tiny_hp(train_batch_tokens=accum * 128, micro_batch_seqs=1,
                                                     micro_batch_pieces=k), 1)[2]
    assert [pieces(k, 8) for k in (1, 3, 4, 16)] == [1, 2, 4, 8]
    assert pieces(4, 6) == 3
    with pytest.raises(tg.UserError, match="MICRO_BATCH_PIECES"):
        tiny_hp(micro_batch_pieces=0)


def recorded_step(pieces: int, monkeypatch):
    """One train_step with 4 pieces of 1 sequence, `pieces` per forward; the forwards' inputs, the trainer."""
    monkeypatch.setattr(tg, "newton_schulz", ref_ns_exact)  # float64 Newton-Schulz: no bf16 rounding flips
    tr = make_trainer(seed=3, micro_batch_seqs=1, micro_batch_pieces=pieces, ema_decay=0)
    seen, grads, model = [], {}, tr.model
    tr.rt.compiled = lambda x, y: seen.append((x, y)) or model(x, y)
    tr.opts[0].register_step_pre_hook(lambda *_: grads.update({k: p.grad.clone() for k, p in
                                                               model.named_parameters() if p.grad is not None}))
    start = snapshot(model)
    loss = tr.train_step(1.0)
    return tr, seen, loss, grads, start


def test_stacked_pieces_keep_the_data_order_and_the_step(monkeypatch):
    """k = 2 and 4 pieces per forward: the forwards hold exactly the rows of the k = 1 pieces, in order; the step
    gives the same loss and gradients (clipped, as the optimizers see them) within float32 rounding, as the same mean
    over the batch's sequences, and the same weights to 1e-4 of their move (AdamW's g / (sqrt(v) + 1e-8) magnifies
    the rounding of gradients near 1e-8); the token stream ends where k = 1 leaves it, so checkpoints and resume
    do not depend on k."""
    ref, ref_seen, ref_loss, ref_grads, start = recorded_step(1, monkeypatch)
    assert (ref.accum, len(ref_seen)) == (4, 4)
    for k in (2, 4):
        tr, seen, loss, grads, _ = recorded_step(k, monkeypatch)
        assert len(seen) == 4 // k and all(x.shape == (k, 128) for x, _ in seen)
        for i in (0, 1):
            assert torch.equal(torch.cat([s[i] for s in seen]), torch.cat([s[i] for s in ref_seen]))
        assert tr.stream.state() == ref.stream.state()
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
        assert set(grads) == set(ref_grads)
        for name, g in grads.items():
            assert float((g - ref_grads[name]).norm()) <= 1e-5 * float(ref_grads[name].norm()) + 1e-12, name
        for (name, p), q in zip(tr.model.named_parameters(), ref.model.parameters()):
            err, moved = float((p.detach() - q.detach()).norm()), float((q.detach() - start[name]).norm())
            assert err <= 1e-4 * moved + 1e-9, (name, err, moved)


# ----------------------------------------------------------------------------------------------
# EMA on short runs
# ----------------------------------------------------------------------------------------------

def logged(hp, step_ms=0.0) -> list[str]:
    lines = []
    tg.warn_short_ema(hp, SimpleNamespace(log=lines.append), step_ms)
    return lines


def test_short_run_ema_warning():
    """EMA_DECAY^steps > 5%: the final EMA weights would still be that much the random init: one line, with a decay
    that fits (1 - 10/steps). 0.997^1000 = 4.96% is fine, 0.997^900 = 6.7% is not."""
    [line] = logged(tiny_hp(iterations=200, warmdown_iters=100, ema_decay=0.997))
    assert line == ("warning: EMA_DECAY^steps = 0.997^200 = 55% of the initial weights stay in the final EMA "
                    "weights; for a run this short use e.g. EMA_DECAY=0.95")
    assert "0.997^900 = 7%" in logged(tiny_hp(iterations=900, warmdown_iters=100, ema_decay=0.997))[0]
    for quiet in (dict(iterations=1000), dict(iterations=200, ema_decay=0.98), dict(iterations=200, ema_decay=0),
                  dict(iterations=0, warmdown_iters=0)):
        assert logged(tiny_hp(**{"warmdown_iters": 100, "ema_decay": 0.997, **quiet})) == [], quiet
    # with a wall-clock cap: nothing at start; once the step time is known, the estimated steps decide
    wall = tiny_hp(iterations=25000, warmdown_iters=100, ema_decay=0.997, max_wallclock_seconds=60)
    assert logged(wall) == [] and logged(wall, step_ms=1.0) == []  # 60,000 steps, capped at 25,000
    assert "0.997^120 = 70%" in logged(wall, step_ms=500.0)[0]


def test_training_loop_checks_the_ema_once_the_step_time_is_known(corpus, monkeypatch):
    """In wall-clock mode the number of steps is only known once steps have been timed: the loop hands the step
    time of its first logged step to the check above, once."""
    calls = []
    monkeypatch.setattr(tg, "warn_short_ema", lambda hp, rt, step_ms=0.0: calls.append((tr.step, step_ms)))
    tr = make_trainer(iterations=4, warmdown_iters=2, train_log_every=2)  # logs at steps 2 and 4
    tr.run(lambda m: (0.0, 0.0))
    assert len(calls) == 1 and calls[0][0] == 2 and calls[0][1] > 0, calls


def test_train_lines_eta_counts_down_to_the_wallclock_cap(corpus, monkeypatch):
    """With a wall-clock cap the run ends at the cap, not at ITERATIONS: the train lines' eta is the time left to
    the cap (it was the steps left to ITERATIONS times the step time, here ~10^6 s for a 60 s run). A clock that
    advances 1 s per reading and a stub step (no compute) make the times exact."""
    tr = make_trainer(iterations=100000, warmdown_iters=0, max_wallclock_seconds=60, train_log_every=1,
                      val_loss_every=0, ema_decay=0)
    ticks = iter(range(10**6))
    monkeypatch.setattr(tg.time, "perf_counter", lambda: float(next(ticks)))
    monkeypatch.setattr(tr, "train_step", lambda lr: (setattr(tr, "step", tr.step + 1), torch.zeros(()))[1])
    lines = []
    tr.rt.log = lines.append
    tr.run(lambda m: (0.0, 0.0))
    timed = [(int(m[1]), int(m[2])) for m in (re.search(r"train_time:(\d+)ms .* eta:(\d+)s$", l) for l in lines) if m]
    assert len(timed) > 10 and 10 < tr.step < 100, (tr.step, lines[-3:])
    assert all(eta == round(60 - t / 1000) for t, eta in timed), timed
