"""The GPU path exercised on the CPU: bf16 autocast (AUTOCAST) and the compiled pipeline (COMPILE=1), so the
first GPU run can only fail on what is truly GPU-specific. The compiled run uses dynamo and AOTAutograd with
the run's own torch.compile(fullgraph=True, dynamic=False) call; inductor's C++ code generation is swapped for
AOTAutograd's eager backend (TORCH_COMPILE_OVERRIDE_BACKENDS), because inductor needs minutes per graph on two
cores. TEST_COMPILE_BACKEND=inductor runs the test with inductor (several minutes)."""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from conftest import TINY, final_line, run_script, tg, tiny_hp, tiny_model


@pytest.mark.parametrize("knob, on_cpu", [("auto", False), ("bf16", True), ("off", False)])
def test_autocast_knob_resolves_per_device(knob, on_cpu):
    assert tg.setup_runtime(tiny_hp(autocast=knob, device="cpu")).bf16 is on_cpu


def test_bf16_autocast_on_the_cpu_runs_matmuls_in_bf16_and_keeps_the_loss_in_float32():
    """Runtime.autocast is the one place: under AUTOCAST=bf16 the CPU takes the CUDA path's dtype handling
    (linear layers and attention in bf16, the softcapped head and the loss in float32, float32 gradients),
    including a seed artifact's bf16 tok_emb."""
    model = tiny_model(seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randint(0, 1024, (2, 128), generator=torch.Generator().manual_seed(0))
    seen = {}
    for name in ("attn.c_q", "mlp.down_proj"):
        model.blocks[1].get_submodule(name).register_forward_hook(lambda m, i, o, n=name: seen.update({n: o.dtype}))
    fp32 = model(x, x)
    assert seen == {"attn.c_q": torch.float32, "mlp.down_proj": torch.float32}
    seen.clear()
    with tg.Runtime(bf16=True).autocast():
        loss = model(x, x)
    assert seen == {"attn.c_q": torch.bfloat16, "mlp.down_proj": torch.bfloat16}
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, fp32, atol=0.05, rtol=0.02)  # bf16 rounding, not another model
    assert not torch.equal(loss, fp32)
    loss.mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    model.tok_emb.weight.data = model.tok_emb.weight.data.bfloat16()  # as loaded from the seed's artifact
    with torch.no_grad(), tg.Runtime(bf16=True).autocast():
        seed_style = model(x, x)
    assert seed_style.dtype == torch.float32
    torch.testing.assert_close(seed_style, loss.detach(), atol=0.05, rtol=0.02)


class CudaAutocastReplay(TorchFunctionMode):
    """Replays every torch call of a CPU forward under bf16 autocast on fake CUDA tensors of the same shapes, dtypes
    and strides under CUDA's bf16 autocast (no GPU needed: the dispatcher applies CUDA's cast policy to tensors
    that say they are on CUDA) and records where the two produce floating results of different dtypes."""

    def __init__(self):
        super().__init__()
        self.fake, self.replayed, self.differ, self.unreplayable = FakeTensorMode(), 0, set(), set()

    def on_cuda(self, a):
        if not isinstance(a, torch.Tensor):
            return a
        meta = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
        return FakeTensor(self.fake, meta, torch.device("cuda"))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            name = getattr(func, "__qualname__", str(func))
            with torch._C.DisableTorchFunction():
                torch.set_autocast_enabled("cpu", False)
                torch.set_autocast_enabled("cuda", True)
                try:
                    with self.fake:
                        ref = func(*tree_map(self.on_cuda, args), **tree_map(self.on_cuda, kwargs))
                    self.replayed += 1
                    if ref.dtype != out.dtype:
                        self.differ.add(f"{name}: cpu {out.dtype} cuda {ref.dtype}")
                except RuntimeError:  # indexing checks the device itself; it keeps its input's dtype anyway
                    self.unreplayable.add(name)
                finally:
                    torch.set_autocast_enabled("cuda", False)
                    torch.set_autocast_enabled("cpu", True)
        return out


@pytest.mark.parametrize("compat", ["0", "1"])
def test_bf16_autocast_on_the_cpu_gives_every_operation_the_dtype_cuda_gives_it(compat):
    """The CPU rehearses the GPU's arithmetic: CUDA's autocast runs rms_norm, normalize, square (pow) and sum in
    float32 where the CPU's leaves them in bf16, so the model asks for float32 itself at those points. Every
    operation of a training forward and of a scoring one (the published model's bf16 tok_emb too), replayed under
    CUDA's policy, gives the dtype it gave on the CPU."""
    model = tiny_model(seed=3, compat_pr644=compat, warmup_steps=0)
    x = torch.randint(0, 1024, (2, 128), generator=torch.Generator().manual_seed(0))
    replay, real, cuda_dtype = CudaAutocastReplay(), tg.attention, torch.get_autocast_dtype("cuda")
    torch.set_autocast_dtype("cuda", torch.bfloat16)  # what torch.autocast("cuda", dtype=torch.bfloat16) sets
    tg.attention = lambda q, k, v: (q * 1.0).bfloat16()  # SDPA: bf16 under both policies; CUDA's checks the device
    try:
        with torch.no_grad(), tg.Runtime(bf16=True).autocast(), replay:
            model(x, x)
            model(x, x, score_from=96)
    finally:
        tg.attention = real
        torch.set_autocast_dtype("cuda", cuda_dtype)
    assert replay.replayed > 300 and replay.unreplayable <= {"TensorBase.__getitem__"}, replay.unreplayable
    assert not replay.differ, sorted(replay.differ)


def test_sdpa_backend_orders_the_attention_kernels_inside_every_forward_only(capsys):
    """SDPA_BACKEND acts inside Runtime.autocast, the context of every forward (training, scoring, TTT), and nowhere
    else: flash leaves cuDNN's kernel out (the published run's setting), cudnn tries it first, auto leaves torch's
    order; where the same kernel runs (the CPU's flash here) the forward is bit-equal to one outside any context
    (float32 stays float32). The log's device line names the kernel torch picks for the run's shapes and dtype: its
    choice, not an echo of the knob."""
    outside = (torch.backends.cuda.cudnn_sdp_enabled(), torch._C._get_sdp_priority_order())
    x = torch.randint(0, 1024, (2, 128), generator=torch.Generator().manual_seed(0))
    model, inside, losses = tiny_model(seed=1), {}, {}
    for knob in ("auto", "flash", "cudnn"):
        hp = tiny_hp(sdpa_backend=knob, device="cpu")
        rt = tg.setup_runtime(hp)
        with torch.no_grad(), rt.autocast():
            inside[knob] = (torch.backends.cuda.cudnn_sdp_enabled(), torch._C._get_sdp_priority_order()[0])
            losses[knob] = model(x, x)
        assert (torch.backends.cuda.cudnn_sdp_enabled(), torch._C._get_sdp_priority_order()) == outside
        tg.log_header(hp, rt)
        assert f" attention:flash_attention sdpa_backend:{knob}\n" in capsys.readouterr().out
    assert inside == {"auto": (outside[0], outside[1][0]), "flash": (False, int(SDPBackend.FLASH_ATTENTION)),
                      "cudnn": (True, int(SDPBackend.CUDNN_ATTENTION))}
    with torch.no_grad():
        plain = model(x, x)  # no context at all: AUTOCAST=off is float32 whatever the kernel order
    assert all(torch.equal(loss, plain) for loss in losses.values())
    hp = tiny_hp(device="cpu")
    with sdpa_kernel(SDPBackend.MATH):  # under SDPA_BACKEND=auto the only kernel left: the line must say so
        tg.log_header(hp, tg.setup_runtime(hp))
    assert " attention:math sdpa_backend:auto\n" in capsys.readouterr().out


COMPILE_LINE = re.compile(r"^compile: graphs:(\d+) graph_breaks:(\d+)$", re.M)
CHUNKS_LINE = re.compile(r"^ttt:start chunks:(\d+) ", re.M)


def test_compiled_bf16_pipeline_has_no_graph_breaks_and_a_graph_count_independent_of_length(tmp_path):
    """COMPILE=1 AUTOCAST=bf16: train -> artifact -> TTT over 6 chunks; EVAL_ONLY of the artifact prints the
    same final line. Dynamo's counters (logged by the run) show no graph breaks, and EVAL_ONLY compiles the
    same graphs (scoring from position 0, sliding scoring, the TTT step: each by regions) for 6 and 10 chunks: a
    graph per chunk or per validation length would cost minutes per graph on the real split."""
    backend = os.environ.get("TEST_COMPILE_BACKEND", "aot_eager")
    env = dict(TINY, NUM_LAYERS="2", VE_LAYERS="1", XSA_LAYERS="1", TTT_FREEZE_BLOCKS="1",  # half the tracing
               COMPILE="1", AUTOCAST="bf16", RUNS_DIR=str(tmp_path), TORCH_COMPILE_OVERRIDE_BACKENDS=f">=0:{backend}")
    train = run_script(dict(env, RUN_ID="train"), timeout=1200)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "autocast:bf16" in train.stdout
    artifact = tmp_path / "train" / "final_model.int6.ptz"
    lengths = (int(TINY["VAL_MAX_TOKENS"]), 10_000)
    with ThreadPoolExecutor(2) as pool:  # the two evaluations share the two cores
        evals = list(pool.map(lambda n: run_script(dict(env, RUN_ID=f"eval_{n}", EVAL_ONLY="1", ARTIFACT=str(artifact),
                                                        VAL_MAX_TOKENS=str(n)), timeout=1200), lengths))
    for r in evals:
        assert r.returncode == 0, r.stderr[-3000:]
    assert final_line(evals[0].stdout) == final_line(train.stdout)
    chunks = [int(CHUNKS_LINE.search(r.stdout).group(1)) for r in evals]
    assert chunks[0] >= 6 and chunks[1] > chunks[0]
    (g_train, b_train), (g_a, b_a), (g_b, b_b) = [map(int, COMPILE_LINE.search(r.stdout).groups())
                                                  for r in (train, *evals)]
    print(f"compiled graphs: training run {g_train}; EVAL_ONLY at {lengths[0]} tokens ({chunks[0]} TTT chunks) "
          f"{g_a}, at {lengths[1]} tokens ({chunks[1]} chunks) {g_b}")
    assert b_train == b_a == b_b == 0
    # COMPILE=1 compiles by regions; here: the embeddings, block 0 (its input is x0 too), block 1, the skip mix (its
    # input is the skip too), the head. EVAL_ONLY: 5 scoring from position 0, the head again scoring a sliding
    # window's tail, 5 for TTT's step (block 0 frozen): 11, however many chunks
    assert g_a == g_b == 11, "EVAL_ONLY: a graph per region and scoring variant (score_from 0, sliding), TTT step"
    assert g_train == g_a + 5, "training adds its step's 5 regions only: Newton-Schulz runs uncompiled"


def test_compile_cache_folder_is_set_up_and_its_warmth_logged(tmp_path, monkeypatch, capsys):
    """COMPILE=1 points inductor's caches (FX graphs, AOTAutograd: TORCHINDUCTOR_CACHE_DIR) at COMPILE_CACHE_DIR,
    by default RUNS_DIR/compile_cache, where a later run (EVAL_ONLY after training) finds them; the run logs whether
    the folder already held entries, and the cache hits and misses at its end. torch.compile is a no-op here: the
    set-up is checked, not inductor (the GPU check measures the reuse)."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # restored after the test
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    quick = dict(COMPILE="1", RUNS_DIR=str(tmp_path), ITERATIONS="1", WARMDOWN_ITERS="0", WARMUP_STEPS="0",
                 TTT_ENABLED="0", EVAL_STRIDE="0", VAL_MAX_TOKENS="1025", EMA_DECAY="0")
    default = tmp_path / "compile_cache"
    for run_id, warm, extra in (("a", 0, {}), ("b", 1, {}), ("c", 0, {"COMPILE_CACHE_DIR": str(tmp_path / "own")})):
        if run_id == "b":
            (default / "fxgraph").mkdir(parents=True)  # what inductor leaves there
        if run_id == "c":
            (tmp_path / "own").mkdir()  # empty: cold
        hp = tg.Hyperparameters.from_env({**TINY, **quick, "RUN_ID": run_id, **extra})
        assert tg.run(hp, tg.setup_runtime(hp)) == 0
        out = capsys.readouterr().out
        where = extra.get("COMPILE_CACHE_DIR", str(default))
        assert f"\ncompile_cache: dir:{where} warm:{warm}\n" in out, out
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == where
        assert re.search(r"^compile_cache: fx_graph_hits:\d+ misses:\d+ aot_autograd_hits:\d+ misses:\d+$", out, re.M)


def compiled_step(monkeypatch, mode: str, layers: int, seed: int = 5):
    """One bf16 training forward + backward and one scoring forward (score_from 32) of a tiny model compiled by
    compile_model as COMPILE=mode, through dynamo and AOTAutograd (aot_eager: the traced graphs run as traced);
    mode "0" is the eager model. Returns the losses, the gradients, the scores and dynamo's graph count."""
    import torch._dynamo
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="aot_eager", **kw))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    hp = tiny_hp(compile=mode, device="cpu", autocast="bf16", num_layers=layers, xsa_layers=2,
                 ve_layers=f"{layers - 2},{layers - 1}", runs_dir="unused")
    rt = tg.setup_runtime(hp)
    model = tiny_model(seed, NUM_LAYERS=layers, XSA_LAYERS=2, VE_LAYERS=f"{layers - 2},{layers - 1}")
    with torch.no_grad():  # non-trivial weights everywhere (zero-initialised projections included)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    monkeypatch.setattr(tg.Runtime, "log", lambda self, msg: None)
    tg.compile_model(hp, rt, model)
    ids = torch.randint(0, 1024, (2, 128), generator=torch.Generator().manual_seed(seed))
    with rt.autocast():
        loss = rt.compiled(ids, ids.roll(-1, 1))
    loss.mean().backward()
    with torch.no_grad(), rt.autocast():
        scores = rt.compiled(ids, ids.roll(-1, 1), 32)
    monkeypatch.setattr(torch, "compile", real)
    return loss.detach(), [p.grad for p in model.parameters()], scores, torch._dynamo.utils.counters["stats"][
        "unique_graphs"]


def test_compiling_by_regions_computes_the_eager_model_with_one_graph_per_kind_of_block(monkeypatch):
    """COMPILE=1 compiles GPT.forward's regions (embeddings, blocks, skip mix, head) one by one: the traced regions
    compute what the eager model does (training loss and sliding scores bit for bit, as the one-graph COMPILE=graph;
    the gradients of tok_emb and of what x0 feeds up to float32 rounding, summed from the regions in another order),
    and blocks of one kind share a graph, so a deeper model compiles no more graphs (the seed's 11 blocks are 4
    kinds: block 0, whose input is also x0, plain, XSA, XSA + value embeddings)."""
    eager = compiled_step(monkeypatch, "0", 6)
    for mode in ("1", "graph"):
        loss, grads, scores, graphs = compiled_step(monkeypatch, mode, 6)
        assert torch.equal(loss, eager[0]) and torch.equal(scores, eager[2]), mode
        worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads, eager[1]))
        assert worst <= (0.0 if mode == "graph" else 1e-6), (mode, worst)
        assert graphs == (2 if mode == "graph" else 2 * 7), (mode, graphs)  # training and scoring, each: 1 or 7
    assert compiled_step(monkeypatch, "1", 10)[3] == 2 * 7, "one graph per kind of block, however many blocks"


def budget_step(monkeypatch, budget: float) -> dict:
    """One bf16 training forward + backward of a tiny model that compile_model compiles by regions with
    ACTIVATION_BUDGET=budget, through activation_study's min-cut backend (the partitioner the budget acts on): the
    loss, the gradients, the bytes the forwards keep for the backward and the backward's matmul and attention nodes."""
    import torch._dynamo
    from activation_study import min_cut_backend
    model, got = tiny_model(5), {}
    real, backend = torch.compile, min_cut_backend(model, got)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=backend, **kw))
    monkeypatch.setattr(tg.Runtime, "log", lambda self, msg: None)
    monkeypatch.setattr(torch._functorch.config, "activation_memory_budget", 1.0)  # put back afterwards
    torch._dynamo.reset()
    hp = tiny_hp(compile="1", device="cpu", autocast="bf16", activation_budget=budget, runs_dir="unused")
    rt = tg.setup_runtime(hp)
    tg.compile_model(hp, rt, model)
    ids = torch.randint(0, 1024, (4, 128), generator=torch.Generator().manual_seed(5))
    with rt.autocast():
        loss = rt.compiled(ids, ids.roll(-1, 1))
    loss.mean().backward()
    monkeypatch.setattr(torch, "compile", real)
    return dict(got, loss=loss.detach(), grads=[p.grad for p in model.parameters()])


def test_activation_budget_keeps_less_for_the_backward_and_recomputes_only_elementwise_work(monkeypatch):
    """ACTIVATION_BUDGET=0.9 reaches the partitioner of every region COMPILE=1 compiles: the forwards keep under 75%
    of the default's bytes for the backward (the seed's model: 61%, measured.md), the backward redoes no attention and
    no block matmul, only elementwise work (and here the BigramHash projection, 16 wide: the seed's 128-wide one is
    kept), and loss and gradients are the default's bit for bit (the same operations on the same values, redone)."""
    default, budget = budget_step(monkeypatch, 0.0), budget_step(monkeypatch, 0.9)
    assert budget["kept"] < 0.75 * default["kept"], (budget["kept"], default["kept"])
    assert budget["attention"] == default["attention"] > 0 and default["mm"] <= budget["mm"] <= default["mm"] + 1
    assert torch.equal(budget["loss"], default["loss"])
    assert all(torch.equal(a, b) for a, b in zip(budget["grads"], default["grads"]))
