"""Quantization (int6 GPTQ-lite, artifact format, zstd-22, safe loading) and the artifact side of
the CLI (size accounting, the 16 MB cap, EVAL_ONLY)."""
from __future__ import annotations

import builtins
import io
import json
import math
import pickle
import re
from pathlib import Path

import pytest
import torch
import zstandard

from conftest import ROOT, TINY, final_line, run_script, tg, tiny_model

P_CANDIDATES = (0.990, 0.993, 0.995, 0.997, 0.998, 0.999, 0.9993, 0.9995, 0.9997, 0.9999,
                0.99993, 0.99995, 0.99997, 0.99999, 1.0)
FP32_PATTERNS = ("attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes", "q_gain",
                 "skip_weight", "skip_weights", "smear_gate", "bigram", "skip_gates", "ve_shared", "ve_layer_scales")
SECTIONS = {"__quant_format__", "quantized", "scales", "dtypes", "passthrough", "qmeta", "passthrough_orig_dtypes"}
U16 = 2.0 ** -11  # unit roundoff of float16




# ------------------------------------------------------------------------------------------------ references

def ref_quantize(w: torch.Tensor, per_row_loop: bool = True):
    """The recipe literally: per candidate p, clip_r = p-quantile of |row r| (p = 1: row max),
    scale = max(clip/31, 1/31) in fp32, q = clamp(round(w/scale), -32, 31); keep the candidate with the lowest
    whole-matrix MSE (first wins ties); scales become fp16 only after the choice. Returns (q int8, scales fp16,
    fp32 scales, chosen p)."""
    t = w.detach().float()
    a = t.abs()
    best = None
    for p in P_CANDIDATES:
        if p == 1.0:
            clip = a.amax(dim=1)
        elif per_row_loop:
            clip = torch.stack([torch.quantile(row, p) for row in a])
        else:
            clip = torch.quantile(a, p, dim=1)
        scale = torch.maximum(clip / 31.0, torch.tensor(1.0 / 31.0, dtype=torch.float32))
        q = torch.clamp(torch.round(t / scale[:, None]), -32, 31)
        err = (t - q * scale[:, None]).square().mean().item()
        if best is None or err < best[0]:
            best = (err, p, scale, q)
    _, p, scale, q = best
    return q.to(torch.int8), scale.to(torch.float16), scale, p


def expected_kind(name: str, t: torch.Tensor, quant_embed: bool = True) -> str:
    if not t.is_floating_point():
        return "raw"
    if t.ndim == 2 and t.numel() > 65_536 and (quant_embed or name != "tok_emb.weight"):
        return "int6"
    return "fp32" if any(p in name for p in FP32_PATTERNS) else "fp16"


def kind_in(obj: dict, name: str) -> str:
    if name in obj["quantized"]:
        return "int6"
    t = obj["passthrough"][name]
    if not t.is_floating_point():
        return "raw"
    return {torch.float32: "fp32", torch.float16: "fp16"}.get(t.dtype, str(t.dtype))


def deep_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(deep_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def outlier_matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 3.0
    idx = torch.randint(0, rows * cols, (max(rows * cols // 500, 3),), generator=g)
    w.view(-1)[idx] *= 12.0  # heavy outliers: clipping them below the max lowers the MSE
    w[::7] *= 0.1  # some rows with max |w| < 1: the 1/31 floor
    return w


def big_model(**over):
    """MODEL_DIM 256: tok_emb, MLP matrices and the bigram table exceed 65,536 elements; c_q is exactly 65,536."""
    return tiny_model(0, model_dim=256, mlp_hidden=512, bigram_buckets=2048, bigram_embed_dim=64, ve_dim=64, **over)


# ------------------------------------------------------------------------------------------------ quantize_matrix

@pytest.mark.parametrize("case", ["outliers", "small", "mixed_bf16", "wide_rows"])
def test_quantize_matrix_matches_spec_reference(case):
    g = torch.Generator().manual_seed(3)
    if case == "outliers":
        w = outlier_matrix(96, 400, 1)
    elif case == "small":
        w = torch.randn(80, 300, generator=g) * 0.02
    elif case == "mixed_bf16":
        w = (outlier_matrix(64, 256, 2) * torch.logspace(-2, 1, 64)[:, None]).to(torch.bfloat16)
    else:
        w = outlier_matrix(8, 5000, 4)
    q, s, floor_rows = tg.quantize_matrix(w)
    rq, rs, rs32, p = ref_quantize(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert s.dtype == torch.float16 and s.shape == (w.shape[0],)
    assert torch.equal(q, rq), f"q differs from the reference (reference chose p={p})"
    assert torch.equal(s, rs), f"scales differ from the reference (reference chose p={p})"
    assert int(q.min()) >= -32 and int(q.max()) <= 31
    assert floor_rows == int((rs32 == torch.tensor(1.0 / 31.0)).sum())
    row_max = w.float().abs().amax(dim=1)
    if case == "small":
        assert torch.all(s == torch.tensor(1.0 / 31.0).half()) and floor_rows == w.shape[0]
    else:  # the search mattered: some rows clip below their max, and some rows sit on the floor
        assert p < 1.0 and bool((rs32 * 31 < row_max * 0.999).any())
        if case != "wide_rows":
            assert 0 < floor_rows < w.shape[0]


# ------------------------------------------------------------------------------------------------ round trip

def synthetic_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return {
        "blocks.0.mlp.up_proj.weight": outlier_matrix(300, 256, 5),               # 76,800 -> int6
        "tok_emb.weight": r(1024, 80) * 0.02,                                   # floor rows -> int6
        "bigram_emb.embed.weight": r(2048, 48) * 0.5,                           # control name but large -> int6
        "blocks.1.mlp.down_proj.weight": (r(280, 256) * 2).to(torch.bfloat16),  # bf16 -> int6, dtype bfloat16
        "blocks.0.attn_scale": r(256),                                          # control -> fp32
        "blocks.0.resid_mix": r(2, 256),
        "blocks.0.attn.q_gain": r(4),
        "skip_gates": r(2, 256), "skip_weights": r(2, 256),
        "smear_gate.gate": r(256), "bigram_emb.scale": r(()), "ve_layer_scales.0": r(1),
        "ve_shared.embed.weight": r(1024, 64),                                  # 65,536 with control name -> fp32
        "blocks.0.mlp.scale": r(512).to(torch.bfloat16),                        # small bf16 -> fp16, restored bf16
        "blocks.0.attn.c_q.weight": r(256, 256) * 3,                            # exactly 65,536 -> fp16
        "blocks.0.attn.c_k.weight": r(128, 256) * 1e-3,                         # small -> fp16
        "step_counter": torch.tensor([7, 8, 9], dtype=torch.int64),             # not float -> as is
    }


def test_quantize_state_dict_routes_each_tensor_and_round_trips_within_bounds():
    sd = synthetic_state_dict()
    obj, stats = tg.quantize_state_dict(sd)
    assert set(obj) == SECTIONS and obj["__quant_format__"] == "int6_clean_per_row_v1"
    for name, t in sd.items():
        assert kind_in(obj, name) == expected_kind(name, t), name
    deq = tg.dequantize_state_dict(obj)
    assert deq.keys() == sd.keys()
    n_rows = 0
    for name, w in sd.items():
        out, kind = deq[name], expected_kind(name, w)
        assert out.dtype == w.dtype and out.shape == w.shape, name
        if kind == "raw" or kind == "fp32":
            assert torch.equal(out, w), f"{name} must be kept exactly"
        elif kind == "fp16":
            assert obj["passthrough_orig_dtypes"][name] == str(w.dtype).removeprefix("torch.")
            assert torch.equal(out, w.half().to(w.dtype)), name
            assert torch.all((out.float() - w.float()).abs() <= w.float().abs() * U16 + 2.0 ** -24), name
        else:
            assert obj["dtypes"][name] == str(w.dtype).removeprefix("torch."), name
            n_rows += w.shape[0]
            x = w.float()
            s16 = obj["scales"][name].float()[:, None]
            q = obj["quantized"][name].float()
            s32_hi, s32_lo = s16 / (1 - U16), s16 / (1 + U16)  # the fp32 scale before fp16 rounding lies in here
            # unclipped entries (|w| <= 31*scale): |w - q*scale| <= scale/2; clipped ones: |w| - 31*scale + scale/2;
            # plus |q| times the fp16 rounding of the scale, and fp32 rounding of the product.
            bound = (x.abs() - 31 * s32_lo).clamp_min(0) + s32_hi / 2 + q.abs() * (s32_hi - s16).abs() \
                + 1e-6 * x.abs() + 1e-7
            err = (x - q * s16).abs()
            assert torch.all(err <= bound), f"{name}: worst excess {float((err - bound).max())}"
            assert torch.allclose(out.float(), (q * s16).to(w.dtype).float()), name
            clipped = x.abs() > 31 * s32_hi
            if name == "blocks.0.mlp.up_proj.weight":
                assert clipped.any(), "the outlier matrix should have clipped entries"
    assert stats["rows"] == n_rows


# ------------------------------------------------------------------------------------------------ exact format

@pytest.mark.parametrize("quant_embed", [True, False])
def test_artifact_format_of_a_model_state_dict(quant_embed):
    model = big_model()
    sd = model.state_dict()
    obj, _ = tg.quantize_state_dict(sd, quant_embed=quant_embed)
    assert set(obj) == SECTIONS and obj["__quant_format__"] == "int6_clean_per_row_v1"
    want = {name: expected_kind(name, t, quant_embed) for name, t in sd.items()}
    got = {name: kind_in(obj, name) for name in sd}
    assert got == want
    # the size rule comes first, then the name patterns; == 65,536 stays float
    assert want["blocks.0.mlp.up_proj.weight"] == "int6" and want["bigram_emb.embed.weight"] == "int6"
    assert want["blocks.0.attn.c_q.weight"] == "fp16" and want["ve_shared.embed.weight"] == "fp32"
    assert want["skip_weights"] == "fp32" and want["blocks.2.attn.c_k.weight"] == "fp16"
    assert want["tok_emb.weight"] == ("int6" if quant_embed else "fp16")
    int6 = {n for n, k in want.items() if k == "int6"}
    fp16 = {n for n, k in want.items() if k == "fp16"}
    assert set(obj["quantized"]) == set(obj["scales"]) == set(obj["dtypes"]) == set(obj["qmeta"]) == int6
    assert set(obj["passthrough"]) == set(sd) - int6
    assert obj["passthrough_orig_dtypes"] == {n: "float32" for n in fp16}
    for n in int6:
        q, s = obj["quantized"][n], obj["scales"][n]
        assert q.dtype == torch.int8 and q.shape == sd[n].shape
        assert int(q.min()) >= -32 and int(q.max()) <= 31
        assert s.dtype == torch.float16 and s.shape == (sd[n].shape[0],)
        assert obj["dtypes"][n] == "float32"
        assert obj["qmeta"][n] == {"scheme": "per_row", "axis": 0}
    n = "tok_emb.weight" if quant_embed else "blocks.0.mlp.up_proj.weight"
    rq, rs, _, _ = ref_quantize(sd[n], per_row_loop=False)
    assert torch.equal(obj["quantized"][n], rq) and torch.equal(obj["scales"][n], rs)
    # the dequantized state dict loads into the same architecture
    other = big_model()
    tg.load_weights(other, tg.dequantize_state_dict(obj), "test")


# ------------------------------------------------------------------------------------------------ serialization

@pytest.fixture(scope="module")
def artifact_obj():
    return tg.quantize_state_dict(big_model().state_dict())[0]


def test_serialization_is_deterministic_zstd22_and_plain_readable(artifact_obj):
    blob = tg.serialize_artifact(artifact_obj)
    assert tg.serialize_artifact(artifact_obj) == blob
    buf = io.BytesIO()
    torch.save(artifact_obj, buf)
    raw = buf.getvalue()
    assert len(blob) <= len(zstandard.ZstdCompressor(level=22).compress(raw))  # never larger than the seed's way
    assert zstandard.get_frame_parameters(blob).content_size == len(raw)
    out = zstandard.ZstdDecompressor().decompress(blob)  # single frame with its content size
    assert out == raw
    back = torch.load(io.BytesIO(out), weights_only=True)
    assert deep_equal(back, artifact_obj)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path):
    """atomic_save failing half-way (here an object torch.save cannot pickle, after its tensor bytes; a full disk
    fails there too, where torch says only "unexpected pos"): one line naming the file and the free space, the
    previous file intact, no temporary file left to fill the disk."""
    path = tmp_path / "final_model.pt"
    tg.atomic_save(b"the previous artifact", path)
    with pytest.raises(tg.UserError, match=rf"cannot write {re.escape(str(path))} \(.*; \d+ MiB free there\)"):
        tg.atomic_save({"w": torch.zeros(1 << 16), "f": lambda: 0}, path)
    assert path.read_bytes() == b"the previous artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_model.pt"]


# ------------------------------------------------------------------------------------------------ safe loading

class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_payload_is_live(tmp_path):
    """Control for the next test: loaded unsafely, the payload really does create its marker."""
    marker = tmp_path / "CONTROL"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_read_artifact_refuses_defective_or_hostile_files(tmp_path, artifact_obj):
    marker = tmp_path / "MARKER"
    good = tg.serialize_artifact(artifact_obj)
    wrong_format = dict(artifact_obj, __quant_format__="int8_clean_per_row_v1")
    malformed = dict(artifact_obj, quantized={**artifact_obj["quantized"],
                                              "tok_emb.weight": artifact_obj["quantized"]["tok_emb.weight"].float()})
    pt, q = artifact_obj["passthrough"], artifact_obj["quantized"]
    k, kq = next(iter(pt)), next(iter(q))
    cases = {
        "truncated": good[: len(good) // 2],
        # each of these three loaded and failed later with a traceback (a sort of mixed keys, a copy_ from sparse,
        # an integer parameter); a sparse or integer int6 tensor, a number as a tensor's name likewise
        "number_as_name": _zstd(_saved(dict(artifact_obj, passthrough={**pt, 5: torch.zeros(3)}))),
        "sparse_passthrough": _zstd(_saved(dict(artifact_obj, passthrough={**pt, k: pt[k].to_sparse()}))),
        "integer_passthrough": _zstd(_saved(dict(artifact_obj, passthrough={**pt, k: pt[k].long()}))),
        "meta_tensor": _zstd(_saved(dict(artifact_obj, passthrough={**pt, k: pt[k].to("meta")}))),
        "sparse_codes": _zstd(_saved(dict(artifact_obj, quantized={**q, kq: q[kq].to_sparse()}))),
        "integer_scales": _zstd(_saved(dict(artifact_obj, scales={**artifact_obj["scales"],
                                                                   kq: artifact_obj["scales"][kq].long()}))),
        "number_as_int6_name": _zstd(_saved(dict(artifact_obj, quantized={**q, 7: q[kq]},
                                                 scales={**artifact_obj["scales"], 7: artifact_obj["scales"][kq]},
                                                 dtypes={**artifact_obj["dtypes"], 7: "float32"}))),
        "random": torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0),
                                dtype=torch.uint8).numpy().tobytes(),
        "empty": b"",
        "not_zstd_torch_save": _saved(artifact_obj),
        "non_dict": _zstd(_saved([torch.zeros(3), "int6_clean_per_row_v1"])),
        "tensor": _zstd(_saved(torch.zeros(4))),
        "wrong_format": _zstd(_saved(wrong_format)),
        "no_format": _zstd(_saved({k: v for k, v in artifact_obj.items() if k != "__quant_format__"})),
        "malformed_tensor": _zstd(_saved(malformed)),
        "orig_dtypes_a_list": _zstd(_saved(dict(artifact_obj, passthrough_orig_dtypes=["float32"]))),  # AttributeError
        "raw_pickle_program": _zstd(pickle.dumps(_Payload(marker))),
        "torch_save_program": _zstd(_saved({"__quant_format__": "int6_clean_per_row_v1", "x": _Payload(marker)})),
        "program_in_dict": _zstd(pickle.dumps({"__quant_format__": "int6_clean_per_row_v1", "x": _Payload(marker)})),
    }
    for label, data in cases.items():
        path = tmp_path / f"{label}.ptz"
        path.write_bytes(data)
        with pytest.raises(tg.UserError) as e:
            tg.read_artifact(str(path))
        assert str(path) in str(e.value), (label, str(e.value))
        assert not marker.exists(), f"{label}: reading the artifact executed pickled code"
    missing = tmp_path / "missing.ptz"
    with pytest.raises(tg.UserError, match=re.escape(str(missing))):
        tg.read_artifact(str(missing))
    # and a good file reads back whole, also recompressed as a stream (as the zstd CLI writes one from a pipe: no
    # declared size, which was read as 2^64 - 1 bytes and refused as a decompression bomb)
    path = tmp_path / "good.ptz"
    path.write_bytes(good)
    assert deep_equal(tg.read_artifact(str(path)), artifact_obj)
    stream = io.BytesIO()
    with zstandard.ZstdCompressor(level=19).stream_writer(stream, closefd=False) as w:
        w.write(zstandard.ZstdDecompressor().decompress(good))
    assert zstandard.get_frame_parameters(stream.getvalue()).content_size == zstandard.CONTENTSIZE_UNKNOWN
    path.write_bytes(stream.getvalue())
    assert deep_equal(tg.read_artifact(str(path)), artifact_obj)


def test_read_artifact_refuses_decompression_bombs(tmp_path, artifact_obj):
    # a 2 GB frame of zeros (a few KB on disk) declaring its size: refused under the default limit, quickly
    bomb = io.BytesIO()
    w = zstandard.ZstdCompressor(level=1).stream_writer(bomb, size=2 ** 31, closefd=False)
    chunk = bytes(1 << 24)
    for _ in range(2 ** 31 // len(chunk)):
        w.write(chunk)
    w.flush(zstandard.FLUSH_FRAME)
    path = tmp_path / "bomb.ptz"
    path.write_bytes(bomb.getvalue())
    assert path.stat().st_size < 1 << 20
    with pytest.raises(tg.UserError, match=re.escape(str(path))):
        tg.read_artifact(str(path))
    # same frame without a declared size: still refused
    bomb2 = io.BytesIO()
    w = zstandard.ZstdCompressor(level=1).stream_writer(bomb2, closefd=False)
    for _ in range(4):
        w.write(chunk)
    w.flush(zstandard.FLUSH_FRAME)
    path2 = tmp_path / "bomb2.ptz"
    path2.write_bytes(bomb2.getvalue())
    with pytest.raises(tg.UserError, match=re.escape(str(path2))):
        tg.read_artifact(str(path2), max_bytes=1 << 20)
    # max_bytes is a hard limit on the decompressed size of a real artifact
    raw_len = len(_saved(artifact_obj))
    real = tmp_path / "real.ptz"
    real.write_bytes(tg.serialize_artifact(artifact_obj))
    with pytest.raises(tg.UserError, match=re.escape(str(real))):
        tg.read_artifact(str(real), max_bytes=raw_len - 1)
    assert deep_equal(tg.read_artifact(str(real), max_bytes=raw_len), artifact_obj)


# ------------------------------------------------------------------------------------------------ CLI
# One tiny training run (TTT final eval) whose code + artifact exceeds a deliberately tiny ARTIFACT_LIMIT_BYTES:
# it must still write everything and exit 2; EVAL_ONLY runs (under the real cap) then reuse its artifact.

# TINY plus an MLP wide enough (1040 x 64 = 66,560 elements) that the MLP matrices are int6-quantized
CLI = {**TINY, "MLP_HIDDEN": "1040", "ITERATIONS": "6", "WARMDOWN_ITERS": "2", "VAL_MAX_TOKENS": "2500",
       "EVAL_STRIDE": "32", "TTT_ENABLED": "1", "TTT_EPOCHS": "1", "TTT_CHUNK_TOKENS": "512"}
TINY_LIMIT = 1000
SUBMISSION_FIELDS = {"author", "github_id", "name", "blurb", "date", "track", "val_loss", "val_bpb", "pre_ttt_val_bpb",
                     "bytes_model", "bytes_code", "bytes_total", "eval_time_seconds", "gpu", "training_steps",
                     "wallclock_seconds", "seed", "parameters"}


def _code_size() -> int:
    return len((ROOT / "train_gpt.py").read_bytes())


def _check_outputs(run_dir: Path, art: Path, out: str, code_sizes: set[int], steps: int) -> dict:
    """submission.json, the log line and the files agree: bytes_model = artifact file size, bytes_code = size of
    train_gpt.py, bytes_total = their sum; the final numbers are the final line's."""
    sub = json.loads((run_dir / "submission.json").read_text())
    assert SUBMISSION_FIELDS <= set(sub), SUBMISSION_FIELDS - set(sub)
    assert sub["bytes_model"] == art.stat().st_size
    assert sub["bytes_code"] in code_sizes  # (read before and after the run: others may edit the file meanwhile)
    assert sub["bytes_total"] == sub["bytes_model"] + sub["bytes_code"]
    m = re.search(r"bytes_model:(\d+) bytes_code:(\d+) bytes_total:(\d+)", out)
    assert m and tuple(map(int, m.groups())) == (sub["bytes_model"], sub["bytes_code"], sub["bytes_total"])
    fl = re.search(r"val_loss:(\S+) val_bpb:(\S+)", final_line(out))
    assert sub["val_loss"] == pytest.approx(float(fl.group(1)), abs=1e-8)
    assert sub["val_bpb"] == pytest.approx(float(fl.group(2)), abs=1e-8)
    pre = re.search(r"pre_ttt_eval mode:standard val_loss:\S+ val_bpb:(\S+)", out)
    assert pre and sub["pre_ttt_val_bpb"] == pytest.approx(float(pre.group(1)), abs=1e-8)
    assert final_line(out) in (run_dir / "train.log").read_text()
    assert sub["training_steps"] == steps and sub["seed"] == int(CLI["SEED"])
    return sub


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, corpus):
    runs = tmp_path_factory.mktemp("runs")
    env = {**CLI, "RUNS_DIR": str(runs), "RUN_ID": "train", "ARTIFACT_LIMIT_BYTES": str(TINY_LIMIT)}
    sizes = {_code_size()}
    r = run_script(env)
    sizes.add(_code_size())
    return runs / "train", r, sizes


def test_cli_over_the_cap_writes_everything_accounts_sizes_and_exits_2(train_run):
    run_dir, r, sizes = train_run
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    assert "Traceback" not in r.stderr
    art = run_dir / "final_model.int6.ptz"
    assert art.is_file() and (run_dir / "train.log").is_file()
    sub = _check_outputs(run_dir, art, r.stdout, sizes, int(CLI["ITERATIONS"]))
    assert "final_eval_mode:ttt" in r.stdout
    over = sub["bytes_total"] - TINY_LIMIT
    assert over > 0 and re.search(rf"\b{over}\b", r.stderr), r.stderr[-2000:]
    # the artifact on disk is a readable int6 artifact whose MLP matrices are quantized
    obj = tg.read_artifact(str(art))
    assert "blocks.0.mlp.up_proj.weight" in obj["quantized"] and "tok_emb.weight" in obj["passthrough"]


def test_eval_only_reproduces_the_training_runs_final_numbers(train_run, tmp_path):
    run_dir, r, sizes = train_run
    art = run_dir / "final_model.int6.ptz"
    assert art.is_file(), (r.stdout + r.stderr)[-3000:]
    e = run_script({**CLI, "RUNS_DIR": str(tmp_path), "RUN_ID": "eval", "EVAL_ONLY": "1", "ARTIFACT": str(art)})
    assert e.returncode == 0, (e.stdout + e.stderr)[-3000:]
    sub = _check_outputs(tmp_path / "eval", art, e.stdout, sizes | {_code_size()}, 0)
    assert sub["bytes_total"] <= 16_000_000
    assert final_line(e.stdout) == final_line(r.stdout)


@pytest.mark.parametrize("change,names", [({"NUM_LAYERS": "3", "VE_LAYERS": "1,2"}, ["blocks.3."]),
                                          ({"MLP_HIDDEN": "1024"}, ["blocks.0.mlp.up_proj.weight", "1040", "1024"])])
def test_eval_only_architecture_mismatch_names_the_tensors(train_run, tmp_path, change, names):
    run_dir, r, _ = train_run
    art = run_dir / "final_model.int6.ptz"
    assert art.is_file(), (r.stdout + r.stderr)[-3000:]
    e = run_script({**CLI, **change, "RUNS_DIR": str(tmp_path), "RUN_ID": "bad", "EVAL_ONLY": "1", "ARTIFACT": str(art)})
    assert e.returncode == 2, (e.stdout + e.stderr)[-3000:]
    assert "Traceback" not in e.stderr
    for n in names:
        assert n in e.stderr, e.stderr[-2000:]
    assert re.search(r"\(\d+, \d+\)", e.stderr), "the message should show the differing shapes"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_float16_tensor_in_an_artifact_is_cast_to_the_models_dtype(tmp_path, dtype):
    """Neither script trains in float16, nor keeps a matrix in bf16 (only the seed's tok_emb), so an artifact whose
    dtypes say so (for a quantized matrix or a kept tensor) loads into the model's float32 tensors: before, the model
    kept those weights and its first float32 matmul failed on mixed dtypes (a traceback)."""
    knobs = dict(MODEL_DIM=256, MLP_HIDDEN=512)  # an MLP matrix big enough to be quantized
    model = tiny_model(3, **knobs)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    obj, _ = tg.quantize_state_dict(sd)
    obj["dtypes"]["blocks.0.mlp.up_proj.weight"] = dtype
    obj["passthrough_orig_dtypes"]["blocks.0.mlp.scale"] = dtype
    path = tmp_path / "float16.ptz"
    path.write_bytes(tg.serialize_artifact(obj))
    deq = tg.dequantize_state_dict(tg.read_artifact(str(path)))
    assert deq["blocks.0.mlp.up_proj.weight"].dtype == deq["blocks.0.mlp.scale"].dtype == getattr(torch, dtype)
    fresh = tiny_model(4, **knobs)
    tg.load_weights(fresh, deq, "float16 artifact")
    assert all(p.dtype == torch.float32 for p in fresh.parameters())
    assert torch.equal(fresh.blocks[0].mlp.up_proj.weight, deq["blocks.0.mlp.up_proj.weight"].float())
    ids = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(fresh(ids, ids)).all()


def test_seed_style_bf16_embedding_is_kept_in_bf16_through_ttt(tmp_path, corpus):
    """The seed stores tok_emb as bf16 (dtypes 'bfloat16'); loading adopts the file's dtype, so scoring and
    TTT see exactly the seed's tensor and TTT updates it in bf16 as the seed does."""
    model = tiny_model(seed=3, MODEL_DIM=128)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd["tok_emb.weight"] = (sd["tok_emb.weight"] * 40).bfloat16()
    obj, _ = tg.quantize_state_dict(sd)
    assert obj["dtypes"]["tok_emb.weight"] == "bfloat16"
    path = tmp_path / "seed_like.ptz"
    path.write_bytes(tg.serialize_artifact(obj))
    fresh = tiny_model(seed=4, MODEL_DIM=128)
    deq = tg.dequantize_state_dict(tg.read_artifact(str(path)))
    tg.load_weights(fresh, deq, "seed-like artifact")
    assert fresh.tok_emb.weight.dtype == torch.bfloat16
    assert torch.equal(fresh.tok_emb.weight, deq["tok_emb.weight"])
    assert all(p.dtype == torch.float32 for n, p in fresh.named_parameters() if n != "tok_emb.weight")
    hp = tg.Hyperparameters.from_env({**TINY, "MODEL_DIM": "128", "VAL_MAX_TOKENS": "1200", "TTT_CHUNK_TOKENS": "256",
                                       "TTT_EPOCHS": "1"})
    rt = tg.Runtime()
    rt.compiled = fresh
    import sentencepiece as spm
    tables = tg.byte_tables(spm.SentencePieceProcessor(model_file=hp.tokenizer_path), hp.vocab_size)
    val = tg.load_validation(hp)
    before = fresh.tok_emb.weight.detach().clone()
    loss, bpb = tg.ttt_evaluate(hp, rt, fresh, val, tables)
    assert math.isfinite(loss) and math.isfinite(bpb)
    assert fresh.tok_emb.weight.dtype == torch.bfloat16 and not torch.equal(fresh.tok_emb.weight, before)


def test_compression_beats_zstd22_on_trained_like_int6_codes():
    """The point of the tuned zstd settings: on int6 codes with a trained model's spread (per-row scales vary),
    the artifact is not larger than the seed's zstd level 22 (4.7 MB of codes here; the gain grows with size)."""
    g = torch.Generator().manual_seed(0)
    sd = {f"blocks.{i}.mlp.up_proj.weight": torch.randn(1536, 512, generator=g) * 0.16 * (0.5 + torch.rand(1536, 1, generator=g))
          for i in range(6)}
    obj, _ = tg.quantize_state_dict(sd)
    buf = io.BytesIO()
    torch.save(obj, buf)
    seed_way = zstandard.ZstdCompressor(level=22).compress(buf.getvalue())
    assert len(tg.serialize_artifact(obj)) <= len(seed_way)
