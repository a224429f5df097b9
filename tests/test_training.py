"""End-to-end training through the CLI: kill-and-resume, checkpoint safety, config guards, distributed
equivalence, divergence handling and a falling loss. Every run is a real subprocess of train_gpt.py on the
sample shards with the TINY config; one uninterrupted run (A) is shared by several tests."""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, TINY, clean_env, final_line, run_script, run_signalled, tg, train_gpt_job

pytestmark = pytest.mark.usefixtures("corpus")

# Run A and everything compared with it: 16 steps, a checkpoint every 4 (the folder keeps 12 and 16),
# validation at 0/8/16, an EMA that matters (decay 0.9), plain standard final eval (no TTT: not the point here).
CFG_A = {**TINY, "ITERATIONS": "16", "CHECKPOINT_EVERY": "4", "VAL_LOSS_EVERY": "8", "EMA_DECAY": "0.9",
         "TTT_ENABLED": "0", "EVAL_STRIDE": "0", "VAL_MAX_TOKENS": "4000"}

# Output lines that depend only on the weights and the data (no timings): must match bit for bit.
EXACT_PREFIXES = ("float_eval ", "quant_eval ", "pre_ttt_eval ", "final_int6_zstd-22_roundtrip_exact ")
VAL_LINE = re.compile(r"^step:(\d+)/(\d+) val_loss:(\S+) val_bpb:(\S+) ")
TRAIN_LINE = re.compile(r"^step:(\d+)/(\d+) train_loss:(\S+) ")


# ---------------------------------------------------------------------------------------------- helpers

def result_lines(out: str) -> list[str]:
    """The timing-free result lines: eval lines verbatim, val lines cut before their train_time."""
    keep = [l for l in out.splitlines() if l.startswith(EXACT_PREFIXES)]
    keep += [f"step:{m[1]}/{m[2]} val_loss:{m[3]} val_bpb:{m[4]}" for m in map(VAL_LINE.match, out.splitlines()) if m]
    return keep


def val_losses(out: str) -> dict[int, float]:
    return {int(m[1]): float(m[3]) for m in map(VAL_LINE.match, out.splitlines()) if m}


def kv(line: str, key: str) -> float:
    m = re.search(rf"\b{key}:(\S+)", line)
    assert m, f"no {key} in {line!r}"
    return float(m[1])


def only_line(out: str, prefix: str) -> str:
    lines = [l for l in out.splitlines() if l.startswith(prefix)]
    assert len(lines) == 1, f"expected one {prefix!r} line, got {lines}"
    return lines[0]


def ckpt_files(d: Path) -> list[Path]:
    return sorted(d.glob("ckpt_*.pt"))


def ckpt_step(p: Path) -> int:
    return int(re.fullmatch(r"ckpt_(\d+)\.pt", p.name)[1])


def load_ckpt(p: Path) -> dict:
    return torch.load(p, map_location="cpu", weights_only=True)


def assert_same(a, b, path="state", skip=("train_ms",)):
    """Recursive exact equality of checkpoint states (tensors with torch.equal, dtype included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            if k not in skip:
                assert_same(a[k], b[k], f"{path}.{k}", skip)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]", skip)
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def assert_same_weights(pa: Path, pb: Path) -> None:
    sa, sb = torch.load(pa, weights_only=True), torch.load(pb, weights_only=True)
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{pb.name}: tensor {k} differs"


def snapshot(d: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(d)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file()}


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr
    return r


def run_concurrently(*jobs: tuple[dict, int], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """run_script for several (env, torchrun) jobs at once (they are independent; saves wall time)."""
    import tempfile
    procs = []
    for env, nproc in jobs:
        cmd = [sys.executable, str(ROOT / "train_gpt.py")]
        if nproc:
            cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        procs.append((cmd, out, err, subprocess.Popen(cmd, env=clean_env(**env), cwd=ROOT, stdout=out, stderr=err, text=True)))
    results = []
    try:
        for cmd, out, err, p in procs:
            p.wait(timeout=timeout)
            out.seek(0), err.seek(0)
            results.append(subprocess.CompletedProcess(cmd, p.returncode, out.read(), err.read()))
    finally:
        for cmd, out, err, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            out.close(), err.close()
    return results


def assert_one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, f"exit {r.returncode}\nstdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{r.stderr}"
    return lines[0]


# ---------------------------------------------------------------------------------------------- run A

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def run_a(runs):
    """The uninterrupted reference run."""
    r = ok(run_script({**CFG_A, "RUNS_DIR": str(runs), "RUN_ID": "a"}))
    return runs / "a", r


def copy_checkpoints(src_run: Path, dst_run: Path) -> Path:
    dst_run.mkdir(parents=True)
    shutil.copytree(src_run / "checkpoints", dst_run / "checkpoints")
    return dst_run / "checkpoints"


def assert_matches_a(run_a, out: str, run_dir: Path) -> None:
    """A resumed run ended exactly where run A ended: same result lines, weights, last checkpoint."""
    a_dir, a = run_a
    assert final_line(out) == final_line(a.stdout)
    a_lines, lines = result_lines(a.stdout), result_lines(out)
    for prefix in EXACT_PREFIXES:  # every eval line of the final phase, verbatim
        assert [l for l in lines if l.startswith(prefix)] == [l for l in a_lines if l.startswith(prefix)], prefix
    last = "step:16/16 val_loss:"
    assert [l for l in lines if l.startswith(last)] == [l for l in a_lines if l.startswith(last)]
    assert_same_weights(a_dir / "final_model.pt", run_dir / "final_model.pt")
    assert (a_dir / "final_model.int6.ptz").read_bytes() == (run_dir / "final_model.int6.ptz").read_bytes()
    # the whole training state at the end (raw weights, both optimizers, EMA, data position, RNG) is the same
    assert_same(load_ckpt(a_dir / "checkpoints" / "ckpt_0000016.pt"), load_ckpt(run_dir / "checkpoints" / "ckpt_0000016.pt"))
    sa, sb = (json.loads((d / "submission.json").read_text()) for d in (a_dir, run_dir))
    for k in ("val_loss", "val_bpb", "pre_ttt_val_bpb", "training_steps", "bytes_model", "parameters"):
        assert sa[k] == sb[k], k


def test_run_a_outputs_and_checkpoint_rotation(run_a):
    """The files of a run exist; only the newest two checkpoints are kept, all complete and at their steps."""
    a_dir, a = run_a
    for name in ("train.log", "final_model.pt", "final_model.int6.ptz", "submission.json"):
        assert (a_dir / name).is_file(), name
    ck = a_dir / "checkpoints"
    assert [p.name for p in ck.iterdir()] and sorted(p.name for p in ck.iterdir()) == ["ckpt_0000012.pt", "ckpt_0000016.pt"]
    logged = [int(m[1]) for m in re.finditer(r"^checkpoint:\S+ckpt_\d+\.pt step:(\d+)$", a.stdout, re.M)]
    assert logged == [4, 8, 12, 16]
    for p in ckpt_files(ck):
        st = load_ckpt(p)
        assert st["step"] == ckpt_step(p)
    # the log file holds what stdout showed
    log = (a_dir / "train.log").read_text()
    assert final_line(log) == final_line(a.stdout)
    assert json.loads((a_dir / "submission.json").read_text())["training_steps"] == 16


# ---------------------------------------------------------------------------------------------- 7. loss falls

def test_loss_falls(run_a):
    """Validation loss of the raw model: ~ln(1024) at the (near-uniform) init, then clearly lower."""
    _, a = run_a
    v = val_losses(a.stdout)
    assert sorted(v) == [0, 8, 16]
    assert abs(v[0] - math.log(1024)) < 0.05, v  # tok_emb std 0.005 -> nearly uniform logits at step 0
    assert v[8] < v[0] - 0.5, v
    assert v[16] < v[0] - 1.0, v
    assert v[16] < v[8], v


def test_short_run_warns_about_its_ema_at_start(run_a):
    """Run A's EMA (0.9 over 16 steps) keeps 0.9^16 = 19% of the random init in the final weights: said at start."""
    lines = run_a[1].stdout.splitlines()
    warned = [i for i, l in enumerate(lines) if l.startswith("warning: EMA_DECAY^steps")]
    assert len(warned) == 1 and lines[warned[0] - 1].startswith("batch:"), warned
    line = lines[warned[0]]
    assert line.startswith("warning: EMA_DECAY^steps = 0.9^16 = 19% ") and line.endswith("EMA_DECAY=0.375"), line


# ---------------------------------------------------------------------------------------------- 1. kill and resume

def test_sigkill_then_resume_equals_uninterrupted(run_a, runs):
    """SIGKILL run B right after a checkpoint appears (while the next one is being written when we catch it),
    check that only complete checkpoints carry the final name, then RESUME=1: bit-identical to run A."""
    env = clean_env(**{**CFG_A, "RUNS_DIR": str(runs), "RUN_ID": "b"})
    ck = runs / "b" / "checkpoints"
    log_path = runs / "b_killed.out"
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline, caught_tmp = time.monotonic() + 240, False
            while time.monotonic() < deadline and proc.poll() is None:
                names = os.listdir(ck) if ck.is_dir() else []
                finals = [n for n in names if re.fullmatch(r"ckpt_\d+\.pt", n)]
                caught_tmp = bool(finals) and any(n.endswith(".tmp") for n in names)
                if caught_tmp or len(finals) >= 2:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.001)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    killed_out = log_path.read_text()
    assert proc.returncode == -signal.SIGKILL, f"run B was not killed (exit {proc.returncode}):\n{killed_out[-2000:]}"
    assert "final_int6_zstd-22_roundtrip_exact" not in killed_out  # it really stopped mid-training
    assert not (runs / "b" / "final_model.pt").exists()

    # every file under the final name pattern is complete, whatever moment the kill hit
    present = ckpt_files(ck)
    assert present, os.listdir(ck)
    for p in present:
        st = load_ckpt(p)
        assert st["step"] == ckpt_step(p)
    newest = max(ckpt_step(p) for p in present)
    assert newest < 16

    r = ok(run_script({**CFG_A, "RUNS_DIR": str(runs), "RUN_ID": "b", "RESUME": "1"}))
    assert re.search(rf"^resume:\S+ckpt_{newest:07d}\.pt step:{newest}$", r.stdout, re.M), r.stdout[-2000:]
    assert "starting from step 0" not in r.stdout
    assert_matches_a(run_a, r.stdout, runs / "b")
    leftovers = [n for n in os.listdir(runs / "b" / "checkpoints") if not n.endswith(".tmp")]
    assert sorted(leftovers) == ["ckpt_0000012.pt", "ckpt_0000016.pt"], (leftovers, caught_tmp)


# ---------------------------------------------------------------------------------------------- 2. unreadable checkpoint

def test_truncated_newest_checkpoint_is_skipped(run_a, runs):
    """Deterministic resume: A's checkpoints with the newest (step 16) truncated, a newer file of that name that is
    no checkpoint of this script (a bare state dict: it was refused as 'config differs', every knob None), and a
    newer still with a valid signature but no data position (step 16's weights: they load, then it fails; it was a
    traceback). The resume names the three unreadable, continues from step 12, all of it (nothing of the broken
    one's left), and trains steps 13..16 to exactly A's result."""
    a_dir, _ = run_a
    ck = copy_checkpoints(a_dir, runs / "c")
    bad = ck / "ckpt_0000016.pt"
    data = bad.read_bytes()
    broken = {k: v for k, v in load_ckpt(bad).items() if k != "data"}
    torch.save(broken, ck / "ckpt_0000024.pt")
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception):
        load_ckpt(bad)  # the damage is real
    torch.save({"tok_emb.weight": torch.zeros(4, 2)}, ck / "ckpt_0000020.pt")
    r = ok(run_script({**CFG_A, "RUNS_DIR": str(runs), "RUN_ID": "c", "RESUME": "1"}))
    for step, why in ((24, "KeyError"), (20, "KeyError"), (16, "")):
        assert re.search(rf"^checkpoint:\S+ckpt_{step:07d}\.pt unreadable \({why}", r.stdout, re.M), r.stdout[-2000:]
    assert re.search(r"^resume:\S+ckpt_0000012\.pt step:12$", r.stdout, re.M), r.stdout[-2000:]
    # it trained the 4 missing steps (step 16 logs a train line and writes a checkpoint again)
    assert [int(m[1]) for m in map(TRAIN_LINE.match, r.stdout.splitlines()) if m] == [16]
    assert_matches_a(run_a, r.stdout, runs / "c")


# ---------------------------------------------------------------------------------------------- 3. config change

@pytest.mark.parametrize("knob,value,was", [("MODEL_DIM", "32", "64"), ("MATRIX_LR", "0.5", "0.025"),
                                            ("EMA_DECAY", "0.0", "0.9"), ("SEED", "8", "7")])
def test_resume_with_other_config_is_refused(run_a, runs, knob, value, was):
    """The model's knobs, and those the checkpoint's optimizer and EMA state was made with (else a new LR was
    silently overridden by the saved one, and EMA or a learning-rate group turned on crashed), and the seed."""
    a_dir, _ = run_a
    ck = copy_checkpoints(a_dir, runs / knob)
    before = snapshot(ck)
    r = run_script({**CFG_A, "RUNS_DIR": str(runs), "RUN_ID": knob, "RESUME": "1", knob: value})
    line = assert_one_line_error(r)
    assert f"{knob}={was} in checkpoint vs {value} now" in line, line
    assert line.count(" in checkpoint vs ") == 1, line  # only the knob that differs is named
    assert snapshot(ck) == before
    assert not (runs / knob / "final_model.pt").exists()


def test_checkpoints_in_a_shared_folder_are_kept_and_never_resume_another_run(run_a, runs):
    """CHECKPOINT_DIR holding another run's later checkpoints (12, 16): a new run's own checkpoints survive their
    rotation (it used to delete the one just written), and a resume that finds the other run's is refused."""
    a_dir, _ = run_a
    shared = copy_checkpoints(a_dir, runs / "shared_a")
    theirs = snapshot(shared)
    env = {**CFG_A, "RUNS_DIR": str(runs), "RUN_ID": "shared_b", "SEED": "8", "ITERATIONS": "6",
           "WARMDOWN_ITERS": "2", "CHECKPOINT_EVERY": "2", "CHECKPOINT_DIR": str(shared)}
    r = ok(run_script(env))
    assert re.findall(r"^checkpoint:\S+ step:(\d+)$", r.stdout, re.M) == ["2", "4", "6"]
    names = sorted(p.name for p in shared.iterdir())
    assert names == ["ckpt_0000004.pt", "ckpt_0000006.pt", "ckpt_0000012.pt", "ckpt_0000016.pt"], names
    assert load_ckpt(shared / "ckpt_0000006.pt")["step"] == 6
    assert {k: v for k, v in snapshot(shared).items() if k in theirs} == theirs
    line = assert_one_line_error(run_script({**env, "RUN_ID": "shared_b2", "RESUME": "1"}))
    assert "ckpt_0000016.pt" in line and "SEED=7 in checkpoint vs 8 now" in line, line


def test_resume_over_checkpoints_none_readable_is_refused(run_a, runs):
    """Checkpoints exist but none loads: one line naming each and why, never a silent restart from step 0 (it was
    one log line and a new run over the old checkpoints, which a rotation would then delete)."""
    a_dir, _ = run_a
    ck = copy_checkpoints(a_dir, runs / "u")
    for p in ck.iterdir():
        p.write_bytes(p.read_bytes()[:1000])
    before = snapshot(ck)
    line = assert_one_line_error(run_script({**CFG_A, "RUNS_DIR": str(runs), "RUN_ID": "u", "RESUME": "1"}))
    assert "no checkpoint in" in line and "ckpt_0000016.pt (" in line and "ckpt_0000012.pt (" in line, line
    assert snapshot(ck) == before and not (runs / "u" / "final_model.pt").exists()


def test_resume_of_a_finished_run_without_checkpoints_is_refused(run_a, runs):
    """RESUME=1 with no checkpoint starts at step 0, except where the run folder holds a finished run: its artifact,
    weights and submission must not be trained over."""
    a_dir, _ = run_a
    done = runs / "done"
    shutil.copytree(a_dir, done, ignore=shutil.ignore_patterns("checkpoints"))
    before = snapshot(done)
    line = assert_one_line_error(run_script({**CFG_A, "RUNS_DIR": str(runs), "RUN_ID": "done", "RESUME": "1"}))
    assert "finished run" in line and str(done) in line, line
    assert {k: v for k, v in snapshot(done).items() if k != "train.log"} == \
        {k: v for k, v in before.items() if k != "train.log"}


# ---------------------------------------------------------------------------------------------- 5. no overwrite

def test_same_run_id_without_resume_is_refused(run_a, runs):
    a_dir, _ = run_a
    dup = runs / "o"
    shutil.copytree(a_dir, dup)
    before = snapshot(dup)
    r = run_script({**CFG_A, "RUNS_DIR": str(runs), "RUN_ID": "o"})
    line = assert_one_line_error(r)
    assert str(dup) in line and "RESUME=1" in line and "RUN_ID" in line, line
    assert snapshot(dup) == before  # not a byte, not an mtime changed


def test_a_run_folder_in_use_is_refused(run_a, runs):
    """Two processes on one run folder (RESUME=1 twice, a job requeued beside its predecessor) both trained from the
    same checkpoint and wrote over each other's checkpoints, log and artifact. A run locks its folder (flock, held
    until it exits): a second one is refused in one line and touches nothing."""
    rt = tg.Runtime()
    tg.open_run_dir(tg.Hyperparameters.from_env({**CFG_A, "RUNS_DIR": str(runs), "RUN_ID": "held"}), rt)
    rt.log_file.close()
    fd = os.open(runs / "held", os.O_RDONLY)
    with pytest.raises(BlockingIOError):  # open_run_dir holds the lock (this test's process stands for the run)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)
    busy = runs / "busy"
    shutil.copytree(run_a[0], busy)
    before = snapshot(busy)
    fd = os.open(busy, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a train_gpt.py still running there holds it
    try:
        r = run_script({**CFG_A, "RUNS_DIR": str(runs), "RUN_ID": "busy", "RESUME": "1"})
    finally:
        os.close(fd)
    line = assert_one_line_error(r)
    assert str(busy) in line and "in use" in line, line
    assert snapshot(busy) == before  # not a byte, not an mtime changed


def test_a_full_disk_under_the_log_is_one_line(runs):
    """train.log on a full disk (/dev/full refuses every write): the error line could not be written to the log
    either, and that second OSError was a traceback after the first. Now one line on stderr, exit 2."""
    (runs / "full").mkdir()
    (runs / "full" / "train.log").symlink_to("/dev/full")
    line = assert_one_line_error(run_script({**TINY, "RUNS_DIR": str(runs), "RUN_ID": "full", "RESUME": "1"}))
    assert "OSError" in line and "No space left on device" in line, line


# ---------------------------------------------------------------------------------------------- 6. divergence

def test_divergence_exits_with_step_and_keeps_checkpoints(runs):
    """A Muon LR of 1e6 (ramped over 8 warm-up steps, no clipping) blows up after a few steps. The run stops with
    exit 2 and names the first step whose loss is non-finite; the checkpoints before it remain and load."""
    env = {**TINY, "RUNS_DIR": str(runs), "RUN_ID": "nan", "MATRIX_LR": "1e6", "WARMUP_STEPS": "8",
           "GRAD_CLIP_NORM": "0", "CHECKPOINT_EVERY": "1", "TRAIN_LOG_EVERY": "1", "TTT_ENABLED": "0", "EVAL_STRIDE": "0"}
    r = run_script(env)
    line = assert_one_line_error(r)
    m = re.search(r"non-finite at step (\d+)", line)
    assert m, line
    bad = int(m[1])
    # every step before `bad` was logged with a finite loss, and step `bad` was not logged at all
    logged = {int(m[1]): float(m[3]) for m in map(TRAIN_LINE.match, r.stdout.splitlines()) if m}
    assert bad >= 3 and sorted(logged) == list(range(1, bad)), (bad, logged)
    assert all(math.isfinite(v) for v in logged.values()), logged
    ck = runs / "nan" / "checkpoints"
    assert [ckpt_step(p) for p in ckpt_files(ck)] == [bad - 2, bad - 1]  # newest two before divergence, none after
    for p in ckpt_files(ck):
        st = load_ckpt(p)
        assert st["step"] == ckpt_step(p)
        assert all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point()), p
    assert not (runs / "nan" / "final_model.pt").exists()
    assert line in (runs / "nan" / "train.log").read_text()


# ---------------------------------------------------------------------------------------------- 4. torchrun

def test_a_non_finite_score_is_an_error_not_a_result(runs):
    """TTT that diverges (an overflowing LR, no clip) ends the run with one line and exit 2, not exit 0 and a
    submission.json holding NaN (not even valid JSON); the weights and the artifact stay."""
    env = {**TINY, "RUNS_DIR": str(runs), "RUN_ID": "nanscore", "ITERATIONS": "4", "WARMDOWN_ITERS": "1",
           "TTT_LR": "1e30", "TTT_GRAD_CLIP": "0", "VAL_MAX_TOKENS": "4000"}
    line = assert_one_line_error(run_script(env))
    assert "not finite" in line and "val_bpb nan" in line, line
    assert sorted(p.name for p in (runs / "nanscore").iterdir()) == ["final_model.int6.ptz", "final_model.pt",
                                                                      "train.log"]


def test_wallclock_cap_follows_rank_0s_clock(tmp_path):
    """Each host clock runs ahead of its GPU by a different amount; if every rank read its own, one could
    stop (and evaluate) while another trains: mismatched collectives, a hang, or weights drifting apart
    through different warm-down LRs. Rank 1's clock runs 10,000x fast here (its cap passes after ~0.1 s):
    the run must still train all its steps on both ranks and give the same result as an unskewed run."""
    hook = tmp_path / "skew"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, time\n"
        "if os.environ.get('RANK') == '1':\n"
        "    _pc = time.perf_counter\n"
        "    time.perf_counter = lambda: _pc() * 10000.0\n")
    cfg = {**TINY, "ITERATIONS": "6", "MICRO_BATCH_SEQS": "8", "MAX_WALLCLOCK_SECONDS": "1000", "WARMDOWN_ITERS": "2",
           "TTT_ENABLED": "0", "EVAL_STRIDE": "0", "RUNS_DIR": str(tmp_path / "runs")}
    skewed = ok(run_script({**cfg, "RUN_ID": "skewed", "PYTHONPATH": str(hook)}, torchrun=2, timeout=150))
    plain = ok(run_script({**cfg, "RUN_ID": "plain"}, torchrun=2, timeout=150))
    assert '"training_steps": 6' in (tmp_path / "runs/skewed/submission.json").read_text()
    assert final_line(skewed.stdout) == final_line(plain.stdout)


def test_an_error_every_rank_hits_is_shown_once_with_6_processes(tmp_path):
    """16 sequences do not split over 6 processes, and every rank finds that out. Only rank 0 used to print it; when
    the others exited first, torchrun killed rank 0 before it printed (the line was lost in ~1 launch of 3). Here
    rank 0 is held back 5 s after joining the process group, the order that lost the line (the old code: 0 lines
    every time); ranks 1-5 then wait 3 s for it and all claim the report: exactly one of them may print it."""
    hook = tmp_path / "late0"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\nif os.environ.get('RANK') == '0':\n    import time, torch.distributed as dist\n"
        "    init = dist.init_process_group\n"
        "    dist.init_process_group = lambda *a, **k: (init(*a, **k), time.sleep(5))[0]\n")
    r = run_script({**TINY, "RUNS_DIR": str(tmp_path / "runs"), "PYTHONPATH": str(hook)}, torchrun=6, timeout=240)
    errors = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1, (r.stdout + r.stderr)[-3000:]
    want = re.escape("TRAIN_BATCH_TOKENS=2048 (16 sequences of 128) does not split over 6 processes: use a multiple "
                     "of 768, e.g. TRAIN_BATCH_TOKENS=1536 or 2304")
    assert re.fullmatch(rf"error: (rank [1-5]: )?{want}", errors[0]), errors  # the first claim (rank 0 if in time)
    assert 'train_gpt.py", line' not in r.stderr  # no worker traceback (torchrun's own follows, run directly)
    assert not (tmp_path / "runs").exists()


def test_a_rank_killed_mid_collective_leaves_one_stop_line(tmp_path):
    """Rank 1 dies (SIGKILL: the OOM killer, a lost node) at its 6th all-reduce, in step 3; rank 0's all-reduce breaks
    ("Connection closed by peer"). That was gloo's traceback; now rank 0 logs one stop line saying that another
    process ended and what is safe on disk (the checkpoint of step 2)."""
    hook = tmp_path / "kill1"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\nif os.environ.get('RANK') == '1':\n    import signal, torch.distributed as dist\n"
        "    calls, all_reduce = [], dist.all_reduce\n"
        "    def dying(*a, **k):\n        calls.append(1)\n"
        "        if len(calls) == 6:\n            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        return all_reduce(*a, **k)\n"
        "    dist.all_reduce = dying\n")
    env = {**TINY, "RUNS_DIR": str(tmp_path / "runs"), "RUN_ID": "k", "CHECKPOINT_EVERY": "2", "PYTHONPATH": str(hook)}
    r = run_script(env, torchrun=2, timeout=150)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and 'train_gpt.py", line' not in out, out[-3000:]
    stops = [l for l in r.stdout.splitlines() if l.startswith("stopped:")]
    assert len(stops) == 1 and stops[0].endswith("safe on disk: " + str(tmp_path / "runs/k/checkpoints/ckpt_0000002.pt"))


def test_an_unreachable_torchrun_store_still_reports_the_error(monkeypatch):
    """The report is claimed in torchrun's store; if it cannot be reached (the launcher gone, a firewall) the rank
    reports anyway: the old code hung 300 s in the connect, then printed a DistNetworkError traceback instead."""
    def unreachable(*args, **kwargs):
        assert kwargs.get("timeout") is not None and kwargs["timeout"].total_seconds() <= 30, kwargs
        raise tg.dist.DistNetworkError("The client socket has timed out")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setattr(tg.dist, "TCPStore", unreachable)
    assert tg.reports_error(0) is True


def test_two_process_torchrun_equals_grad_accumulation(tmp_path):
    """2 gloo ranks x 1 micro-step == 1 process x 2 micro-steps (same global batch, distributed Muon).
    Only rank 0 writes: one run folder, each line once, exactly the expected files."""
    cfg = {**TINY, "ITERATIONS": "8", "MICRO_BATCH_SEQS": "8", "EMA_DECAY": "0", "CHECKPOINT_EVERY": "4",
           "TTT_ENABLED": "0", "EVAL_STRIDE": "0"}
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    r1, r2 = run_concurrently(({**cfg, "RUNS_DIR": str(one_dir), "RUN_ID": "single"}, 0),
                              ({**cfg, "RUNS_DIR": str(two_dir)}, 2))  # no RUN_ID: rank 0 draws it, broadcasts
    ok(r1), ok(r2)
    assert "Warning" not in r2.stderr, r2.stderr[-2000:]  # e.g. torch 2.13's for a renamed collective, once per rank
    assert "grad_accum:2" in only_line(r1.stdout, "batch:") and "micro_batch_seqs:8" in only_line(r1.stdout, "batch:")
    assert "grad_accum:1" in only_line(r2.stdout, "batch:") and "micro_batch_seqs:8" in only_line(r2.stdout, "batch:")
    assert "world_size:2" in only_line(r2.stdout, "device:")

    for key in ("val_loss", "val_bpb"):
        for prefix in ("float_eval ", "final_int6_zstd-22_roundtrip_exact "):
            a, b = kv(only_line(r1.stdout, prefix), key), kv(only_line(r2.stdout, prefix), key)
            assert abs(a - b) <= 1e-4 * abs(a), (prefix, key, a, b)
    t1 = {int(m[1]): float(m[3]) for m in map(TRAIN_LINE.match, r1.stdout.splitlines()) if m}
    t2 = {int(m[1]): float(m[3]) for m in map(TRAIN_LINE.match, r2.stdout.splitlines()) if m}
    assert sorted(t1) == sorted(t2) == [4, 8]
    for s in t1:
        assert abs(t1[s] - t2[s]) <= 2e-4 + 1e-4 * abs(t1[s]), (s, t1[s], t2[s])

    # exactly one run folder with exactly the rank-0 outputs, no stray or temporary files
    folders = list(two_dir.iterdir())
    assert len(folders) == 1, folders
    run2 = folders[0]
    assert sorted(p.name for p in run2.iterdir()) == sorted(p.name for p in (one_dir / "single").iterdir()) == \
        ["checkpoints", "final_model.int6.ptz", "final_model.pt", "submission.json", "train.log"]
    assert sorted(p.name for p in (run2 / "checkpoints").iterdir()) == ["ckpt_0000004.pt", "ckpt_0000008.pt"]
    for out in (r2.stdout, (run2 / "train.log").read_text()):
        for prefix in ("model_params:", "float_eval ", "final_int6_zstd-22_roundtrip_exact ", "submission:"):
            only_line(out, prefix)
        assert len(re.findall(r"^checkpoint:", out, re.M)) == 2
    sub = json.loads((run2 / "submission.json").read_text())
    assert sub["gpu"] == "2xCPU" and sub["training_steps"] == 8

    # same global batch: both consumed the stream to the same position; the weights agree closely
    c1, c2 = load_ckpt(one_dir / "single" / "checkpoints" / "ckpt_0000008.pt"), load_ckpt(run2 / "checkpoints" / "ckpt_0000008.pt")
    assert c1["data"] == c2["data"] and c1["step"] == c2["step"] == 8
    for k, v in c1["model"].items():
        assert torch.allclose(v, c2["model"][k], rtol=1e-3, atol=1e-4), k



# ---------------------------------------------------------------------------------------------- 8. priming divergence

def test_priming_divergence_is_forgotten(monkeypatch):
    """The untimed priming steps (full LR, no clip) may diverge: here the weights turn NaN before each priming
    step, so its loss, gradients, optimizer moments and EMA all go non-finite. The real run must not notice: it
    trains to the end with finite losses and ends in exactly the state of the same run without priming."""
    from conftest import tiny_hp
    step, log = tg.Trainer.train_step, []

    def recorded(self, lr_mult, priming=False):  # priming diverges when the test asks for it
        if priming and nan_priming:
            with torch.no_grad():
                for p in self.params:
                    p.fill_(float("nan"))
        loss = step(self, lr_mult, priming)
        log.append((priming, float(loss)))
        return loss

    def train(prime_steps: int) -> dict:
        hp = tiny_hp(prime_steps=prime_steps, iterations=6, warmdown_iters=2, ema_decay=0.9, train_log_every=1)
        rt = tg.Runtime()
        torch.manual_seed(hp.seed)
        rt.compiled = model = tg.GPT(hp)
        trainer = tg.Trainer(hp, rt, model, tg.TokenStream(tg.shard_files(hp.data_path, "train")))
        trainer.prime()
        trainer.run(lambda m: (0.0, 0.0))
        return trainer.state()

    monkeypatch.setattr(tg.Trainer, "train_step", recorded)
    nan_priming = True
    state = train(prime_steps=3)
    primed, real = [v for p, v in log if p], [v for p, v in log if not p]
    assert len(primed) == 3 and not any(map(math.isfinite, primed)), primed  # every priming step diverged
    assert len(real) == 6 and all(map(math.isfinite, real)), real
    nan_priming, log[:] = False, []
    assert_same(state, train(prime_steps=0))
    assert [v for _, v in log] == real


# ---------------------------------------------------------------------------------------------- 9. stop signals

def test_ranks_agree_on_the_stop_step_and_a_rank_stops_on_its_own_signal_at_the_loops_end(monkeypatch):
    """Several processes read the summed votes every 4 steps (all ranks at the same steps); after the last step (or a
    stop) also a rank's own signal counts, e.g. one that arrived during the last validation, after every vote."""
    trainer = SimpleNamespace(rt=SimpleNamespace(world=2), step=5, votes=torch.tensor(1.0))
    agreed = lambda now=False: tg.Trainer.stop_agreed(trainer, now)
    monkeypatch.setattr(tg.STOP, "signum", 0)
    assert not agreed() and agreed(now=True)  # step 5 is no reading step; the loop's end reads the votes
    trainer.step = 6
    assert not agreed()
    trainer.step = 8
    assert agreed()
    trainer.votes = torch.tensor(0.0)
    assert not agreed() and not agreed(now=True)
    monkeypatch.setattr(tg.STOP, "signum", signal.SIGTERM)  # this rank's signal, after its last vote
    assert not agreed() and agreed(now=True)
    trainer.rt.world = 1  # one process: its own signal, at every step boundary
    assert agreed()


STOPPED = re.compile(r"^stopped: (SIG\w+) at step (\d+)/16; checkpoint (\S+); continue with RESUME=1$", re.M)


def test_stop_signal_checkpoints_at_a_step_boundary_and_resume_equals_uninterrupted(run_a, runs):
    """SIGTERM / SIGUSR1 (a scheduler's preemption) once the log shows step 5, with periodic checkpoints off: the
    step in flight finishes, the run writes a checkpoint where RESUME=1 looks, logs one line and exits with 128 +
    the signal's number. RESUME=1 then ends exactly as run A, which was never interrupted."""
    cfg = {**CFG_A, "CHECKPOINT_EVERY": "0", "TRAIN_LOG_EVERY": "1", "RUNS_DIR": str(runs)}
    sigs = {"term": signal.SIGTERM, "usr1": signal.SIGUSR1}
    stopped = run_signalled([train_gpt_job({**cfg, "RUN_ID": name}, "step:5/16 train_loss", sig)
                             for name, sig in sigs.items()])
    for (name, sig), r in zip(sigs.items(), stopped):
        assert r.returncode == 128 + sig, f"exit {r.returncode}\n{r.stdout[-3000:]}"
        assert "Traceback" not in r.stdout and len(STOPPED.findall(r.stdout)) == 1, r.stdout[-3000:]
        how, step, path = STOPPED.search(r.stdout).groups()
        assert how == sig.name and 5 <= int(step) < 16, r.stdout[-3000:]  # signalled after step 5 (or later)
        assert [p.name for p in ckpt_files(runs / name / "checkpoints")] == [f"ckpt_{int(step):07d}.pt"]
        assert Path(path) == runs / name / "checkpoints" / f"ckpt_{int(step):07d}.pt"
        assert load_ckpt(Path(path))["step"] == int(step)
        assert [int(m[1]) for m in map(TRAIN_LINE.match, r.stdout.splitlines()) if m] == list(range(1, int(step) + 1))
        assert not (runs / name / "final_model.pt").exists()
        assert STOPPED.search((runs / name / "train.log").read_text())
    resumed = run_signalled([train_gpt_job({**cfg, "RUN_ID": name, "RESUME": "1"}) for name in sigs])
    for name, r in zip(sigs, resumed):
        assert r.returncode == 0 and "stopped:" not in r.stdout, r.stdout[-3000:]
        assert final_line(r.stdout) == final_line(run_a[1].stdout)
        for prefix in EXACT_PREFIXES:
            assert [l for l in r.stdout.splitlines() if l.startswith(prefix)] == \
                [l for l in run_a[1].stdout.splitlines() if l.startswith(prefix)], prefix


def test_stop_signal_during_final_evaluation_keeps_the_artifact(run_a, runs):
    """Resumed at its last step from run A's checkpoints (in a CHECKPOINT_DIR outside the run folder), a run goes
    straight to the artifact and its final (TTT) evaluation; SIGTERM there ends it with one line naming the artifact
    and the checkpoints, exit 143; the artifact is run A's, whole."""
    a_dir, _ = run_a
    ckpts = copy_checkpoints(a_dir, runs / "fe_elsewhere")
    env = {**CFG_A, "RUNS_DIR": str(runs), "RUN_ID": "fe", "RESUME": "1", "TTT_ENABLED": "1", "EVAL_STRIDE": "32",
           "CHECKPOINT_DIR": str(ckpts)}
    r, = run_signalled([train_gpt_job(env, "final_eval_mode:ttt", signal.SIGTERM)])
    assert r.returncode == 143 and "Traceback" not in r.stdout, r.stdout[-3000:]
    artifact = runs / "fe" / "final_model.int6.ptz"
    lines = [l for l in r.stdout.splitlines() if l.startswith("stopped:")]
    assert len(lines) == 1 and lines[0].startswith("stopped: SIGTERM during final evaluation; safe on disk: "), \
        r.stdout[-3000:]
    assert sorted(lines[0].split("; safe on disk: ")[1].split(", ")) == \
        sorted(map(str, [artifact, runs / "fe" / "final_model.pt", *ckpt_files(ckpts)])), lines[0]
    assert "final_int6_zstd-22_roundtrip_exact" not in r.stdout
    assert artifact.read_bytes() == (a_dir / "final_model.int6.ptz").read_bytes()
    assert sorted(p.name for p in (runs / "fe").iterdir()) == ["final_model.int6.ptz", "final_model.pt", "train.log"]
