"""Quantization study (issue 20): one float checkpoint, quantized several ways, quant gap and artifact bytes.

    <the run's knobs in the environment> python tests/quant_study.py RUN_DIR/final_model.pt

Rows: lite (the seed's quantizer), lite+gptq, QUANT_TARGET_BYTES at lite's bytes, and the same + gptq; each GPTQ
row with GPTQ on the linear layers only, then as QUANT_METHOD=gptq does, with the tied tok_emb too (rounded on the
head's input Hessian, the final normed hidden states).
Calibration and sensitivity read the start of the training stream, as train_gpt.run() does. Not a test."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def main(ckpt: str) -> None:
    hp = tg.Hyperparameters.from_env(os.environ)
    rt = tg.Runtime()
    model = tg.GPT(hp)
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    tg.load_weights(model, sd, ckpt)
    rt.compiled = model
    val, tables = tg.load_validation(hp), tg.byte_tables(tg.load_tokenizer(hp), hp.vocab_size)
    files = tg.shard_files(hp.data_path, "train")
    _, float_bpb = tg.evaluate(hp, rt, model, val, tables, 0)
    print(f"float val_bpb:{float_bpb:.6f} params:{sum(p.numel() for p in model.parameters())}", flush=True)

    t0 = time.perf_counter()
    H = tg.collect_hessians(model, tg.calibration_batches(hp, rt, files), rt)
    t_calib = time.perf_counter() - t0
    stream = tg.TokenStream(files)
    T, m = hp.train_seq_len, hp.micro_batch_seqs
    sens_batches = []
    for _ in range(2):
        t = torch.from_numpy(stream.take(m * T + 1).astype(np.int64))
        sens_batches.append((t[:-1].view(m, T), t[1:].view(m, T)))
    sens = tg.sensitivity_from_batches(model, sens_batches, rt)

    def gap(obj: dict) -> float:
        tg.load_weights(model, tg.dequantize_state_dict(obj), "study")
        bpb = tg.evaluate(hp, rt, model, val, tables, 0)[1]
        tg.load_weights(model, sd, ckpt)
        return bpb - float_bpb

    gptq = {"H": {k: v for k, v in H.items() if k != "tok_emb.weight"}, "damp": hp.gptq_damp}  # linear layers only
    gptq_emb = {"H": H, "damp": hp.gptq_damp}  # QUANT_METHOD=gptq: tok_emb too, on the head's input Hessian
    rows = []
    t0 = time.perf_counter()
    lite, _ = tg.quantize_state_dict(sd, hp.quant_embed)
    t_lite = time.perf_counter() - t0
    budget = len(tg.serialize_artifact(lite))
    rows.append(("lite", lite, t_lite, {}))
    for label, g in (("lite+gptq", gptq), ("lite+gptq+tok_emb", gptq_emb)):
        t0 = time.perf_counter()
        obj, st = tg.quantize_state_dict(sd, hp.quant_embed, g)
        rows.append((label, obj, time.perf_counter() - t0, st["herr"]))
    for label, g in (("target", None), ("target+gptq", gptq), ("target+gptq+tok_emb", gptq_emb)):
        t0 = time.perf_counter()
        obj, st = tg.quantize_to_budget(sd, budget, sens, hp.quant_embed, lambda s: None, g)
        rows.append((label, obj, time.perf_counter() - t0, st["herr"]))
    print(f"calibration: seqs:{hp.gptq_calib_seqs} tokens:{hp.gptq_calib_seqs * T} time:{t_calib:.1f}s "
          f"budget(lite bytes):{budget}")
    for label, obj, secs, herr in rows:
        ratio = sum(h[0] for h in herr.values()) / max(sum(h[1] for h in herr.values()), 1e-30) if herr else 1.0
        emb = herr.get("tok_emb.weight")
        print(f"{label:22s} bytes:{len(tg.serialize_artifact(obj)):9d} quant_gap_bpb:{gap(obj):+.6f} "
              f"hessian_err_vs_nearest:{ratio:.4f} tok_emb_vs_nearest:{emb[0] / emb[1] if emb else 1.0:.4f} "
              f"quant_time:{secs:.1f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
