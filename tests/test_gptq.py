"""GPTQ codes (QUANT_METHOD=gptq, issue 20): nearest rounding where inputs are uncorrelated, a lower
Hessian-weighted error where they are correlated, the same grid and artifact format, and calibration that
reads training tokens only."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch

from conftest import SAMPLE, TINY, run_script, tg, tiny_model, train_briefly


def heavy_matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Heavy-tailed weights above the 1/31 scale floor, so that the clip search clips and codes reach -32 and 31."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.5 / torch.rand(rows, cols, generator=g).clamp_min(0.05).sqrt()


def nearest(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(w / scales.float()[:, None]), -32, 31)


def weighted_error(d: torch.Tensor, H: torch.Tensor) -> float:
    """tr(d H d^T)"""
    return float(((d.double() @ H.double()) * d.double()).sum())


def test_identity_like_hessian_gives_nearest_codes():
    """Uncorrelated inputs (a diagonal Hessian of unequal entries, so act-order permutes, some inputs dead):
    no error has anywhere to go, and GPTQ's codes are nearest rounding's, in the original column order."""
    w = heavy_matrix(40, 300, 0)  # 300 columns: three blocks of 128
    _, s, _ = tg.quantize_matrix(w)
    diag = torch.rand(300, generator=torch.Generator().manual_seed(1)) + 0.1
    diag[[3, 150, 299]] = 0.0
    q, damp = tg.gptq_codes(w, s, torch.diag(diag).double(), damp=0.01)
    assert torch.equal(q, nearest(w, s)) and damp == 0.01


def test_correlated_hessian_lowers_weighted_error_on_the_same_grid():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2000, 300, generator=g) @ (torch.eye(300) + 0.3 * torch.randn(300, 300, generator=g))
    H, w = x.T @ x, heavy_matrix(48, 300, 3)
    _, s, _ = tg.quantize_matrix(w)
    q, damp = tg.gptq_codes(w, s, H, damp=0.01)
    sf = s.float()[:, None]
    err, err_near = weighted_error(w - q * sf, H), weighted_error(w - nearest(w, s) * sf, H)
    assert err < 0.7 * err_near, (err, err_near)
    assert torch.equal(q, q.round()) and int(q.min()) == -32 and int(q.max()) == 31 and damp == 0.01
    # lazy block updates are only a reordering of the same arithmetic: one block of all columns agrees
    err_one_block = weighted_error(w - tg.gptq_codes(w, s, H, damp=0.01, block=300)[0] * sf, H)
    assert err == pytest.approx(err_one_block, rel=1e-4)



def test_a_hessian_without_cholesky_factor_is_damped_more_not_a_crash():
    """A Hessian that GPTQ_DAMP leaves without a Cholesky factor (from very few calibration tokens and the smallest
    GPTQ_DAMP a real one was; here an indefinite one, so the failure is certain) raised LinAlgError after training.
    Now the damping grows tenfold until both factorisations succeed, and the codes are valid ones on the same grid."""
    w = heavy_matrix(16, 64, 4)
    _, s, _ = tg.quantize_matrix(w)
    H = torch.eye(64, dtype=torch.float64) + 2.0 * torch.diag(torch.ones(63, dtype=torch.float64), 1)
    H = H + H.T  # diagonal 2, eigenvalues down to 2 - 4cos(pi/65) < -1.9: indefinite at any damp below ~1
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(H + 1e-6 * 2.0 * torch.eye(64, dtype=torch.float64))
    q, damp = tg.gptq_codes(w, s, H, damp=1e-6)
    assert damp == pytest.approx(1.0), damp  # 1e-6 * 10^6: the first that makes H + 2*damp*I positive definite
    assert torch.equal(q, q.round()) and -32 <= int(q.min()) and int(q.max()) <= 31 and torch.isfinite(q).all()

# int6: mlp up/down 768x96 / 96x768 (linear layers), tok_emb 1024x96 (the tied head), the BigramHash table 4200x16
CFG = dict(num_layers=2, model_dim=96, mlp_hidden=768, ve_layers="1", xsa_layers=1, train_seq_len=64,
           rope_train_seq_len=64, bigram_buckets=4200)


@pytest.fixture(scope="module")
def calibrated(corpus):
    model = tiny_model(seed=0, **CFG)
    stream = train_briefly(model, 12, 16, 64, lr=1e-2)
    hp = tg.Hyperparameters.from_env({**TINY, **{k.upper(): str(v) for k, v in CFG.items()}, "GPTQ_CALIB_SEQS": "32"})
    H = tg.collect_hessians(model, tg.calibration_batches(hp, tg.Runtime(), tg.shard_files(str(SAMPLE), "train")),
                            tg.Runtime())
    t = torch.from_numpy(stream.take(8 * 64 + 1).astype(np.int64))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return dict(model=model, sd=sd, gptq={"H": H, "damp": 0.01}, held=(t[:-1].view(8, 64), t[1:].view(8, 64)))


def test_gptq_artifact_loads_with_the_reader_and_evaluates_as_in_memory(calibrated, tmp_path):
    sd, model = calibrated["sd"], calibrated["model"]
    obj, stats = tg.quantize_state_dict(sd, True, calibrated["gptq"])
    lite, _ = tg.quantize_state_dict(sd, True)
    linear = {"blocks.0.mlp.up_proj.weight", "blocks.0.mlp.down_proj.weight", "blocks.1.mlp.up_proj.weight",
              "blocks.1.mlp.down_proj.weight"}
    rounded = linear | {"tok_emb.weight"}  # the linear layers and the tied head; the tables keep nearest
    assert set(stats["herr"]) == rounded and "bigram_emb.embed.weight" in obj["quantized"]
    assert all(g < n and damp == 0.01 for g, n, damp in stats["herr"].values())
    for k in obj["quantized"]:  # the same grid as the seed's quantizer; other codes only where GPTQ rounded
        assert torch.equal(obj["scales"][k], lite["scales"][k])
        assert torch.equal(obj["quantized"][k], lite["quantized"][k]) == (k not in rounded), k
    path = tmp_path / "final_model.int6.ptz"
    path.write_bytes(tg.serialize_artifact(obj))
    x, y = calibrated["held"]
    with torch.no_grad():
        tg.load_weights(model, tg.dequantize_state_dict(tg.read_artifact(str(path))), "artifact")
        from_file = model(x, y)
        tg.load_weights(model, tg.dequantize_state_dict(obj), "memory")
        in_memory = model(x, y)
        tg.load_weights(model, sd, "float")
    assert torch.equal(from_file, in_memory)


def test_calibration_never_reads_validation(tmp_path):
    """Two runs, same seed and training data, validation shards of equal length but different tokens: the GPTQ
    artifacts are byte-identical (calibration read training tokens only), while the evaluations differ."""
    env = {**TINY, "NUM_LAYERS": "2", "VE_LAYERS": "1", "XSA_LAYERS": "1", "MLP_HIDDEN": "1040", "ITERATIONS": "2",
           "WARMDOWN_ITERS": "1", "QUANT_METHOD": "gptq", "GPTQ_CALIB_SEQS": "8", "TTT_ENABLED": "0",
           "VAL_MAX_TOKENS": "1000", "EVAL_STRIDE": "128",
           "RUNS_DIR": str(tmp_path / "runs")}
    outs, blobs = [], []
    for i in range(2):
        data = tmp_path / f"data{i}"
        shutil.copytree(SAMPLE, data)
        if i:
            val = data / "fineweb_val_000000.bin"
            raw = np.fromfile(val, dtype=np.uint16)
            head, tok = raw[:2 * tg.HEADER_INTS], raw[2 * tg.HEADER_INTS:]
            np.concatenate([head, np.random.default_rng(0).permutation(tok)]).tofile(val)
        r = run_script({**env, "DATA_PATH": str(data), "RUN_ID": f"r{i}"})
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        outs.append(r.stdout)
        blobs.append((tmp_path / "runs" / f"r{i}" / "final_model.int6.ptz").read_bytes())
    assert re.search(r"quant: method:gptq gptq_tensors:4 ", outs[0]), outs[0][-3000:]
    assert "gptq: calib_tokens:1024" in outs[0]
    floats = [re.search(r"float_eval val_loss:(\S+)", o).group(1) for o in outs]
    assert floats[0] != floats[1]  # the validation data did differ
    assert blobs[0] == blobs[1]


def test_hessians_take_one_product_per_distinct_input(corpus):
    """c_q, c_k and c_v read the same input: collect_hessians forms its x^T x once (one of its heaviest costs at
    the seed config) and gives all three the same sum, equal to a reference that forms every module's own."""
    from torch.utils._python_dispatch import TorchDispatchMode
    model = tiny_model(seed=0, **CFG)
    t = torch.from_numpy(tg.TokenStream(tg.shard_files(str(SAMPLE), "train")).take(4 * 64 + 1).astype(np.int64))
    batch, n_tok = [(t[:-1].view(4, 64), t[1:].view(4, 64))], 4 * 64
    inputs, last = {}, model.blocks[-1]
    hooks = [m.register_forward_hook(lambda m, i, o: inputs.__setitem__(m, tg.rms(o) if m is last else i[0]))
             for m in [*(m for m in model.modules() if isinstance(m, torch.nn.Linear)), last]]
    with torch.no_grad():
        model(*batch[0])
    for h in hooks:
        h.remove()
    names = {m: n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names[last] = "tok_emb.weight"
    ref = {names[m]: (x.reshape(-1, x.size(-1)).float().T @ x.reshape(-1, x.size(-1)).float()).double()
           for m, x in inputs.items()}
    distinct = len({id(x) for x in inputs.values()})

    class CountProducts(TorchDispatchMode):  # x^T x: (d, tokens) @ (tokens, d)
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.mm.default and args[0].shape[1] == n_tok == args[1].shape[0]:
                CountProducts.n += 1
            return func(*args, **(kwargs or {}))
    with CountProducts():
        H = tg.collect_hessians(model, batch, tg.Runtime())
    assert set(H) == set(ref) and all(torch.equal(H[k], ref[k]) for k in ref)
    assert distinct < len(ref) and CountProducts.n == distinct, (CountProducts.n, distinct, len(ref))
