"""Shared helpers: the project's own generated corpus (tests/corpus.py, built once into tests/.cache),
tiny configs, subprocess runs."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402



def _corpus_dir() -> Path:
    """tests/.cache/corpus-KEY, KEY from the generator's source and the Python/sentencepiece versions (which
    decide its bytes); built in a subprocess so the stdlib imports it does stay out of the test process."""
    import sentencepiece
    src = (ROOT / "tests" / "corpus.py").read_bytes()
    key = hashlib.sha256(src + f"{sys.version}|{sentencepiece.__version__}".encode()).hexdigest()[:12]
    out = ROOT / "tests" / ".cache" / f"corpus-{key}"
    if not (out / "manifest.json").exists():
        subprocess.run([sys.executable, str(ROOT / "tests" / "corpus.py"), str(out)], check=True)
    return out


SAMPLE = _corpus_dir()  # shards, docs_val.jsonl and tokenizer.model of the generated corpus
TOKENIZER = SAMPLE / "tokenizer.model"

# A tiny model of the same architecture: 4 blocks (2 encoder, 2 decoder), GQA 4/2, XSA on the last 2,
# value embeddings in blocks 2 and 3, 128-token windows.
TINY = dict(
    DATA_PATH=str(SAMPLE), TOKENIZER_PATH=str(TOKENIZER),
    NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_HIDDEN="128",
    BIGRAM_BUCKETS="256", BIGRAM_EMBED_DIM="16", VE_DIM="16", VE_LAYERS="2,3", XSA_LAYERS="2",
    ROPE_DIMS="8", TRAIN_SEQ_LEN="128", ROPE_TRAIN_SEQ_LEN="128", TRAIN_BATCH_TOKENS="2048", MICRO_BATCH_SEQS="16",
    ITERATIONS="12", WARMDOWN_ITERS="4", WARMUP_STEPS="2", PRIME_STEPS="0", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="4",
    VAL_MAX_TOKENS="6000", EVAL_STRIDE="32", TTT_CHUNK_TOKENS="1024", TTT_EPOCHS="1", TTT_BATCH_SEQS="4",
    EVAL_BATCH_SEQS="8", SEED="7",
)


def tiny_hp(**overrides) -> "tg.Hyperparameters":
    env = {**TINY, **{k.upper(): str(v) for k, v in overrides.items()}}
    return tg.Hyperparameters.from_env(env)


def tiny_model(seed: int = 0, **overrides) -> "tg.GPT":
    torch.manual_seed(seed)
    return tg.GPT(tiny_hp(**overrides))


def clean_env(**env) -> dict:
    """The current environment minus every knob, plus `env`: a subprocess sees only what the test sets."""
    names = {f.name.upper() for f in tg.dataclasses.fields(tg.Hyperparameters)}
    base = {k: v for k, v in os.environ.items() if k not in names}
    base.update({"OMP_NUM_THREADS": "1"})
    base.update({k: str(v) for k, v in env.items()})
    return base


def run_script(env: dict, *args, timeout: int = 300, torchrun: int = 0) -> subprocess.CompletedProcess:
    """Run train_gpt.py (optionally through torchrun with N CPU processes) and capture its output."""
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               str(ROOT / "train_gpt.py"), *args]
    else:
        cmd = [sys.executable, str(ROOT / "train_gpt.py"), *args]
    return subprocess.run(cmd, env=clean_env(**env), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def final_line(out: str) -> str:
    lines = [l for l in out.splitlines() if l.startswith("final_int6_zstd-22_roundtrip_exact")]
    assert lines, f"no final line in output:\n{out[-3000:]}"
    return lines[-1]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast, deterministic, and immune to OpenMP spin-waiting when
    another process shares the 2 cores (which made in-process tests up to 40x slower)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The generated corpus folder (built when conftest is imported)."""
    return SAMPLE
