"""Which RoPE table did the published *compiled* run use? (issue 13, item 4; CUDA only)

The published model keeps its inverse-frequency buffer in bf16 and builds its table as
`t = arange(T, dtype=bf16); freqs = outer(t, inv_freq); cos/sin(freqs)`. Eager PyTorch rounds the positions
(above 256 they lose low bits) and the products to bf16; a compiled graph may keep them in fp32. This computes
that table once eager and once inside torch.compile(fullgraph=True) at the seed's shape (T 2,048, 16 dims, base
10,000) and prints the largest difference of each against our table for both readings: exact fp32 positions
(train_gpt.rope_angles, ROPE_INV_FREQ=bf16: what we use) and bf16-rounded positions. A difference at bf16
resolution (<= ~0.004) means that reading holds. Usage: python tests/gpu_rope_probe.py   (prints key:value lines)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


class PublishedTable(torch.nn.Module):
    """The published way: a buffer computed in fp32 and cast to bf16 with the model, positions in its dtype."""

    def __init__(self, dims: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, dims, 2, dtype=torch.float32) / dims))

    def forward(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(T, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(t, self.inv_freq)
        return freqs.cos(), freqs.sin()


def probe(device: str) -> str:
    hp = tg.Hyperparameters.from_env({"ROPE_INV_FREQ": "bf16"})
    T, dims = hp.train_seq_len, hp.rope_dims
    ours = tg.rope_angles(hp, T, device)  # exact positions x bf16-rounded frequencies, fp32 angles
    inv = 1.0 / hp.rope_base ** (torch.arange(0, dims, 2, dtype=torch.float32, device=device) / dims)
    ang = torch.arange(T, device=device).bfloat16().float()[:, None] * inv.bfloat16().float()[None, :]
    readings = {"exact_positions": ours, "bf16_positions": (ang.cos(), ang.sin())}
    table = PublishedTable(dims, hp.rope_base).to(device).bfloat16()
    tables = {"eager": table(T), "compiled": torch.compile(table, fullgraph=True, dynamic=False)(T)}
    best = {}
    for name, (cos, sin) in tables.items():
        diffs = {r: max(float((cos.float() - c).abs().max()), float((sin.float() - s).abs().max()))
                 for r, (c, s) in readings.items()}
        print(f"rope_probe table:{name} dtype:{str(cos.dtype).removeprefix('torch.')} "
              + " ".join(f"max_diff_vs_{r}:{d:.6f}" for r, d in diffs.items()), flush=True)
        r, d = min(diffs.items(), key=lambda kv: kv[1])
        best[name] = r if d <= 0.004 else "neither"
    print(f"rope_probe reading_eager:{best['eager']} reading_compiled:{best['compiled']} "
          f"ours:exact_positions torch:{torch.__version__}", flush=True)
    return best["compiled"]


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("rope_probe: skipped (no CUDA device)")
        sys.exit(0)
    probe("cuda")
