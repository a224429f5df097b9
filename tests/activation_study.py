"""Activation study (issue 19): the bytes a compiled training forward keeps for its backward, ours against the
published model, on any machine (no GPU needed); with --traffic, the bytes its kernels move instead.

    [knobs in the environment] [PEER_SCRIPT=path/to/the/published/train_gpt.py] \
        python tests/activation_study.py [B] [--traffic | --regions]

Both models are traced by torch.compile (dynamo + AOTAutograd) at B sequences of TRAIN_SEQ_LEN under bf16
autocast, and their joint graphs split by the min-cut partitioner that inductor uses; the forward graph's extra
outputs are what the backward keeps. Autocast follows CUDA's dtype policy where CPU autocast differs (rms_norm,
normalize and pow in float32). Printed: the total (and scaled to MICRO_BATCH_SEQS) and the largest groups by shape
and dtype. It compares the graphs, not a GPU's peak: kernels (flash attention) and the allocator differ there.
Not a test.

--traffic compiles one forward and backward with inductor (C++ kernels on a CPU: ~4 minutes per model) and sums, per
graph, the bytes each kernel reads and writes as inductor's scheduler counts them after fusion: the fused pointwise
and reduction kernels apart from the matmul and attention kernels. A CPU's fusions are not a GPU's (no Triton), so
this compares the two models' memory traffic, not a GPU's time.

--regions compares our model's two ways of compiling (COMPILE=1, by regions, against COMPILE=graph) by what their
forwards keep for the backward, counted per call on real tensors (kept_per_call)."""
from __future__ import annotations

import importlib.util
import os
import sys
import unittest.mock
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def as_on_cuda(fn):
    """CUDA's autocast runs rms_norm, normalize and pow in float32; CPU autocast leaves them in the input's dtype
    (train_gpt asks for float32 itself; the published model relies on CUDA's autocast)."""

    def run(x, *args, **kwargs):
        return fn(x.float() if torch.is_autocast_enabled("cpu") and x.dtype == torch.bfloat16 else x, *args, **kwargs)
    return run


def kept_for_backward(model: torch.nn.Module, loss_of) -> list[torch.Tensor]:
    """Fake tensors of what the partitioned forward saves for the backward (one traced forward)."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    kept = []

    def forward_graph(gm, inputs):
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        kept.extend(v for v in (getattr(n, "meta", {}).get("val") for n in out) if isinstance(v, torch.Tensor))
        return gm.forward

    def backend(gm, inputs):
        return aot_module_simplified(gm, inputs, fw_compiler=forward_graph, bw_compiler=lambda g, _: g.forward,
                                     partition_fn=min_cut_rematerialization_partition)
    compiled = torch.compile(model, backend=backend, dynamic=False, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_of(compiled)
    return kept


def min_cut_backend(model: torch.nn.Module, counts: dict):
    """A torch.compile backend: AOTAutograd with inductor's min-cut partitioner (where ACTIVATION_BUDGET acts), its
    graphs run as traced. Adds to counts "kept" and "storages", the bytes and storages the forwards keep for the
    backward at every call (each storage once, the model's weights and buffers not), and "mm" and "attention", the
    backward graphs' nodes of those kinds."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    seen, n_user = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}, []
    for key in ("kept", "storages", "mm", "attention"):
        counts.setdefault(key, 0)

    def partition(joint, inputs, **kw):  # runs before the forward compiler of the same graph
        n_user.append(kw["num_fwd_outputs"])
        return min_cut_rematerialization_partition(joint, inputs, **kw)

    def forward(gm, _):
        first_saved = n_user[-1]

        def run(*args):
            outs = gm(*args)
            for t in outs[first_saved:]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    counts["kept"] += t.untyped_storage().nbytes()
                    counts["storages"] += 1
            return outs
        return make_boxed_func(run)

    def backward(gm, _):
        for kind in ("mm", "attention"):
            counts[kind] += sum(n.op == "call_function" and kind in str(n.target) for n in gm.graph.nodes)
        return make_boxed_func(gm)
    return aot_autograd(fw_compiler=forward, bw_compiler=backward, partition_fn=partition)


def kept_per_call(hp: tg.Hyperparameters, model: torch.nn.Module, loss_of, mode: str) -> tuple[int, int]:
    """Bytes and storages that the forwards of train_gpt.compile_model's graphs (COMPILE=mode: by regions or one graph)
    keep for the backward, collected at every call (by regions a block's graph runs once per block of its kind), real
    tensors from AOTAutograd's min-cut partition run as traced. Each storage counts once (x0 is kept by every block
    that reads it), the weights' not at all (alive anyway); a region's input kept for its backward counts too."""
    counts = {}
    backend = min_cut_backend(model, counts)
    torch._dynamo.reset()
    real = torch.compile
    rt = tg.Runtime(compile=True)
    rt.log = lambda msg: None
    with unittest.mock.patch.object(torch, "compile", lambda fn, **kw: real(fn, backend=backend, **kw)):
        tg.compile_model(tg.dataclasses.replace(hp, compile=mode, runs_dir="/tmp"), rt, model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_of(rt.compiled).backward()
    return counts["kept"], counts["storages"]


def kernel_traffic(model: torch.nn.Module, loss_of) -> list[dict[str, float]]:
    """Per compiled graph (forward, backward): kernel counts and bytes moved, fused kernels apart from extern ones."""
    import torch._inductor.config as inductor_config
    graphs = []

    def after_fusion(nodes):
        g = {"fused": 0, "fused_mib": 0.0, "extern": 0, "extern_mib": 0.0}
        graphs.append(g)
        for n in nodes:
            kind, nbytes = "extern" if n.is_extern() else "fused", n.get_read_write_buffers_sizes()
            g[kind] += nbytes > 0  # views and no-ops move nothing
            g[f"{kind}_mib"] += nbytes / 2**20
        return nodes
    torch._dynamo.reset()
    with unittest.mock.patch.object(inductor_config, "_post_fusion_custom_pass", after_fusion), \
            unittest.mock.patch.object(inductor_config, "fx_graph_cache", False):  # a cache hit would skip the pass
        compiled = torch.compile(model, dynamic=False, fullgraph=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(compiled)
        loss.backward()
    return graphs


def peer_model(hp: tg.Hyperparameters, script: str) -> torch.nn.Module:
    """The published GPT at our knobs, with its tok_emb in bf16 as its script keeps it."""
    spec = importlib.util.spec_from_file_location("peer_train_gpt", script)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    m = peer.GPT(vocab_size=hp.vocab_size, num_layers=hp.num_layers, model_dim=hp.model_dim, num_heads=hp.num_heads,
                 num_kv_heads=hp.num_kv_heads, mlp_mult=3, tie_embeddings=True,
                 tied_embed_init_std=hp.tied_embed_init_std, logit_softcap=hp.logit_softcap, rope_base=hp.rope_base,
                 qk_gain_init=hp.qk_gain_init, mlp_hidden=hp.mlp_hidden, bigram_buckets=hp.bigram_buckets,
                 bigram_embed_dim=hp.bigram_embed_dim, rope_dims=hp.rope_dims, ln_scale=hp.ln_scale,
                 xsa_last_n=hp.xsa_layers, ve_enabled=hp.ve_enabled, ve_dim=hp.ve_dim, ve_layers=hp.ve_layers,
                 rope_train_seq_len=hp.rope_train_seq_len)
    m.tok_emb.bfloat16()
    return m


def main() -> None:
    hp = tg.Hyperparameters.from_env()
    args = [a for a in sys.argv[1:] if a not in ("--traffic", "--regions")]
    B, T = int(args[0]) if args else 2, hp.train_seq_len
    F.rms_norm, F.normalize, torch.Tensor.pow = map(as_on_cuda, (F.rms_norm, F.normalize, torch.Tensor.pow))
    torch.manual_seed(hp.seed)
    x, y = (torch.randint(0, hp.vocab_size, (B, T)) for _ in range(2))
    models = [("ours", tg.GPT(hp), lambda m: m(x, y).mean())]
    script = os.environ.get("PEER_SCRIPT", "")
    if script:
        models.append(("published", peer_model(hp, script), lambda m: m(x, y)))
    else:
        print("activation_study model:published not_run:PEER_SCRIPT_unset")
    totals = {}
    if "--regions" in sys.argv:  # ours by regions (COMPILE=1) against ours as one graph (COMPILE=graph)
        for mode in ("graph", "1"):
            nbytes, n = kept_per_call(hp, tg.GPT(hp), models[0][2], mode)
            totals[mode] = nbytes
            print(f"activation_study_compile mode:{mode} seqs:{B} seq_len:{T} kept_storages:{n} "
                  f"kept_mib:{nbytes / 2**20:.1f} at_micro_batch_{hp.micro_batch_seqs}_gib:"
                  f"{nbytes * hp.micro_batch_seqs / B / 2**30:.2f}")
        print(f"activation_study_compile ratio_regions_to_graph:{totals['1'] / totals['graph']:.4f}")
        return
    if "--traffic" in sys.argv:
        for name, model, loss_of in models:
            for graph, g in zip(("forward", "backward"), kernel_traffic(model, loss_of)):
                totals[name] = totals.get(name, 0.0) + g["fused_mib"]
                print(f"kernel_traffic model:{name} seqs:{B} seq_len:{T} graph:{graph} fused_kernels:{g['fused']} "
                      f"fused_mib:{g['fused_mib']:.1f} extern_kernels:{g['extern']} extern_mib:{g['extern_mib']:.1f}")
        if len(totals) == 2:
            print(f"kernel_traffic fused_ratio_ours_to_published:{totals['ours'] / totals['published']:.4f}")
        return
    for name, model, loss_of in models:
        kept = kept_for_backward(model, loss_of)
        nbytes = sum(t.numel() * t.element_size() for t in kept)
        totals[name] = nbytes
        scale = hp.micro_batch_seqs / B
        print(f"activation_study model:{name} params:{sum(p.numel() for p in model.parameters())} seqs:{B} "
              f"seq_len:{T} kept_tensors:{len(kept)} kept_mib:{nbytes / 2**20:.1f} "
              f"at_micro_batch_{hp.micro_batch_seqs}_gib:{nbytes * scale / 2**30:.2f}")
        groups = Counter()
        for t in kept:
            groups[(tuple(t.shape), str(t.dtype).removeprefix("torch."))] += t.numel() * t.element_size()
        for (shape, dtype), b in groups.most_common(8):
            print(f"activation_study_group model:{name} shape:{'x'.join(map(str, shape))} dtype:{dtype} "
                  f"mib:{b / 2**20:.1f}")
    if len(totals) == 2:
        print(f"activation_study ratio_ours_to_published:{totals['ours'] / totals['published']:.4f}")


if __name__ == "__main__":
    main()
