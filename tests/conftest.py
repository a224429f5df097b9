"""Shared helpers: the project's own generated corpus (tests/corpus.py, built once into tests/.cache),
tiny configs, subprocess runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402
import corpus as generator  # noqa: E402  (tests/corpus.py)

SAMPLE = generator.cached()  # shards, docs_val.jsonl and tokenizer.model of the generated corpus
TOKENIZER = SAMPLE / "tokenizer.model"
MANIFEST = json.loads((SAMPLE / "manifest.json").read_text())  # its token and document counts

# The challenge's own tokenizer and validation shard, where `./run.sh data 0` put them: the few tests that
# compare against them are the only tests that may skip, with this reason (summed up in one line at the end).
REAL_TOKENIZER = ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model"
REAL_VAL = ROOT / "data" / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin"
REAL_SKIP = "optional real-sp1024 test"


def need_real(*paths: Path) -> None:
    missing = [str(p.relative_to(ROOT)) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"{REAL_SKIP}: {', '.join(missing)} not found")

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


def train_briefly(model: "tg.GPT", steps: int, seqs: int, seq_len: int, lr: float = 3e-3) -> "tg.TokenStream":
    """Adam on the corpus' train stream, `steps` batches of seqs x seq_len in order; returns the stream (positioned
    after them) for held-out batches."""
    stream = tg.TokenStream(tg.shard_files(str(SAMPLE), "train"))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        t = torch.from_numpy(stream.take(seqs * seq_len + 1).astype(np.int64))
        model(t[:-1].view(seqs, seq_len), t[1:].view(seqs, seq_len)).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return stream


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


def pytest_terminal_summary(terminalreporter):
    """One line saying why tests skipped: the optional real-tokenizer ones, and any other (there should be none)."""
    skipped = terminalreporter.stats.get("skipped", [])
    reasons = [str(r.longrepr[2]) if isinstance(r.longrepr, tuple) else str(r.longrepr) for r in skipped]
    real = [r for r in reasons if REAL_SKIP in r]
    if real:
        terminalreporter.write_line(f"{len(real)} optional tests skipped: the real sp1024 tokenizer / validation shard "
                                    f"is not under data/ (`./run.sh data 0` puts it there; then they run)")
    if len(real) < len(reasons):
        terminalreporter.write_line(f"{len(reasons) - len(real)} other tests skipped (none should): "
                                    + "; ".join(sorted({r for r in reasons if REAL_SKIP not in r})))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """STRICT_SKIPS=1 (.ci/run): any skip but the optional real-tokenizer ones is a failure."""
    report = (yield).get_result()
    reason = str(report.longrepr[2]) if report.skipped and isinstance(report.longrepr, tuple) else ""
    if report.skipped and os.environ.get("STRICT_SKIPS") == "1" and REAL_SKIP not in reason:
        report.outcome, report.longrepr = "failed", f"skipped under STRICT_SKIPS=1 (only optional tests may): {reason}"


def run_signalled(jobs: list, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Start every (cmd, popen options, prefix, signal) job at once; send a job its signal as soon as its output
    shows a line starting with prefix (deterministic: the run is at that point of its log). stdout and stderr
    together in .stdout."""
    from concurrent.futures import ThreadPoolExecutor
    procs = [subprocess.Popen(cmd, **opts, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd, opts, _, _ in jobs]

    def follow(p, prefix, sig):
        lines = []
        for line in p.stdout:
            lines.append(line)
            if sig and line.startswith(prefix):
                p.send_signal(sig)
                sig = None
        p.wait()
        return subprocess.CompletedProcess(p.args, p.returncode, "".join(lines), "")

    pool = ThreadPoolExecutor(len(jobs))
    try:
        futures = [pool.submit(follow, p, prefix, sig) for p, (_, _, prefix, sig) in zip(procs, jobs)]
        return [f.result(timeout=timeout) for f in futures]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        pool.shutdown()


def train_gpt_job(env: dict, prefix: str = "", sig: int = 0) -> tuple:
    """A run_signalled job of train_gpt.py with the knobs in env."""
    return [sys.executable, str(ROOT / "train_gpt.py")], dict(env=clean_env(**env), cwd=ROOT), prefix, sig
