"""run.sh as a new user runs it, in a copy of the project: `data` against a local stand-in for the
Hugging Face hub (HF_ENDPOINT), and `smoke` followed by `eval` of the artifact it wrote."""
from __future__ import annotations

import hashlib
import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import SAMPLE, TINY, TOKENIZER, clean_env, final_line, run_signalled

ROOT = Path(__file__).resolve().parents[1]
REPO = "willdepueoai/parameter-golf"


def project_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "project"
    (dest / "tests").mkdir(parents=True)
    for name in ("run.sh", "train_gpt.py", "requirements.txt", "tests/corpus.py", "tests/compare.py",
                 "tests/pr644_ttt_curve.tsv"):
        shutil.copy2(ROOT / name, dest / name)
    return dest


def run_sh(project: Path, *args: str, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    """./run.sh with this interpreter's environment as its 'virtualenv' (nothing gets installed)."""
    cmd, opts = sh_command(project, *args, **env)
    return subprocess.run(cmd, **opts, capture_output=True, text=True, timeout=timeout)


def sh_command(project: Path, *args: str, **env) -> tuple[list, dict]:
    full = clean_env(VENV=sys.prefix, HF_HOME=project / ".hf_home", HF_HUB_DISABLE_TELEMETRY=1, **env)
    return ["bash", str(project / "run.sh"), *args], dict(cwd=project, env=full)


@pytest.fixture(scope="module", autouse=True)
def smoke(tmp_path_factory, corpus):
    """`./run.sh smoke` (fewer steps) in its own project copy, started with this file's first test so that it runs
    alongside the `data` tests (one process each); test_smoke_then_eval_reproduces_its_final_line checks it. The
    copy holds an older smoke folder: a stale shard and a file of the user's."""
    project = project_copy(tmp_path_factory.mktemp("smoke"))
    smoke_data = project / "runs/smoke_data"
    smoke_data.mkdir(parents=True)
    (smoke_data / "fineweb_val_000000.bin").write_bytes(b"from an older run.sh")
    (smoke_data / "notes.txt").write_text("mine")
    knobs = dict(ITERATIONS="8", WARMDOWN_ITERS="4", VAL_LOSS_EVERY="0", TTT_EPOCHS="1", VAL_MAX_TOKENS="4096",
                 RUN_ID="first")
    cmd, opts = sh_command(project, "smoke", **knobs)
    proc = subprocess.Popen(cmd, **opts, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield project, proc
    proc.kill()
    proc.communicate()


class FakeHub:
    """Serves files under `root` at /datasets/{repo}/resolve/{revision}/{path}, HEAD and GET, counting GETs."""

    def __init__(self, root: Path):
        self.root, self.gets = root, []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def target(self):
                prefix = f"/datasets/{REPO}/resolve/main/"
                path = self.path.split("?")[0]
                f = hub.root / path[len(prefix):] if path.startswith(prefix) else None
                if f is None or not f.is_file():
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return None
                data = f.read_bytes()
                self.send_response(200)
                self.send_header("ETag", '"' + hashlib.sha1(data).hexdigest() + '"')
                self.send_header("X-Repo-Commit", "0" * 40)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                return data

            def do_HEAD(self):
                self.target()

            def do_GET(self):
                data = self.target()
                if data is not None:
                    hub.gets.append(self.path.rsplit("/", 1)[-1])
                    self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(tmp_path, corpus):
    pytest.importorskip("huggingface_hub")
    root = tmp_path / "hub"
    (root / "datasets/tokenizers").mkdir(parents=True)
    (root / "datasets/datasets/fineweb10B_sp1024").mkdir(parents=True)
    shutil.copy2(TOKENIZER, root / "datasets/tokenizers/fineweb_1024_bpe.model")
    for f in SAMPLE.glob("fineweb_*.bin"):
        shutil.copy2(f, root / "datasets/datasets/fineweb10B_sp1024" / f.name)
    h = FakeHub(root)
    yield h
    h.close()


def test_data_downloads_links_verifies_and_resumes(tmp_path, hub):
    project = project_copy(tmp_path)
    r = run_sh(project, "data", "2", HF_ENDPOINT=hub.url)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "data:verified tokenizer + 3 shards (2 train)" in r.stdout
    assert sorted(hub.gets) == ["fineweb_1024_bpe.model", "fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                "fineweb_val_000000.bin"]
    data = project / "data/datasets/fineweb10B_sp1024"  # the layout train_gpt.py's defaults read
    for f in SAMPLE.glob("fineweb_*.bin"):
        assert (data / f.name).read_bytes() == f.read_bytes()
    assert (project / "data/tokenizers/fineweb_1024_bpe.model").read_bytes() == TOKENIZER.read_bytes()

    r = run_sh(project, "data", "2", HF_ENDPOINT=hub.url)  # a second run fetches nothing
    assert r.returncode == 0 and len(hub.gets) == 4, r.stderr[-2000:]

    other = project_copy(tmp_path / "other")  # files already in place (e.g. the official helper's) are kept
    mine = other / "data/datasets/fineweb10B_sp1024/fineweb_val_000000.bin"
    mine.parent.mkdir(parents=True)
    shutil.copy2(SAMPLE / mine.name, mine)
    r = run_sh(other, "data", "0", HF_ENDPOINT=hub.url)
    assert r.returncode == 0 and "data:verified tokenizer + 1 shards (0 train)" in r.stdout, r.stderr[-2000:]
    assert hub.gets[4:] == ["fineweb_1024_bpe.model"] and not mine.is_symlink()

    local = project / "data/hf/datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    local.write_bytes(local.read_bytes()[:5000])  # a copy cut short on disk is found and fetched again
    r = run_sh(project, "data", "2", HF_ENDPOINT=hub.url)
    assert r.returncode == 0, r.stderr[-2000:]
    assert hub.gets[5:] == ["fineweb_train_000001.bin"]
    assert local.read_bytes() == (SAMPLE / "fineweb_train_000001.bin").read_bytes()


def test_data_failures_are_one_line_and_keep_what_is_there(tmp_path, hub):
    project = project_copy(tmp_path)
    bad = hub.root / "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    good = bad.read_bytes()
    bad.write_bytes(b"\0" * 3000)  # the hub's copy itself is corrupt
    r = run_sh(project, "data", "2", HF_ENDPOINT=hub.url)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "fineweb_train_000001.bin" in r.stderr and "bad magic" in r.stderr and "looks bad" in r.stderr
    assert (project / "data/datasets/fineweb10B_sp1024/fineweb_train_000000.bin").is_file()  # earlier files kept

    bad.write_bytes(good)
    r = run_sh(project, "data", "3", HF_ENDPOINT=hub.url)  # a shard the hub does not have
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "could not download datasets/datasets/fineweb10B_sp1024/fineweb_train_000002.bin" in r.stderr
    assert "rerun ./run.sh data 3 to resume" in r.stderr
    assert (project / "data/datasets/fineweb10B_sp1024/fineweb_train_000001.bin").read_bytes() == good

    # Offline (HF_HUB_OFFLINE=1 fails at once; a dead network takes the same path after the hub's retries)
    r = run_sh(project, "data", "2", HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE=1)  # what is here is verified
    assert r.returncode == 0 and "data:verified tokenizer + 3 shards (2 train)" in r.stdout, r.stderr[-2000:]
    fresh = project_copy(tmp_path / "fresh")
    r = run_sh(fresh, "data", "2", HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE=1)  # nothing here
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "could not download" in r.stderr and "rerun ./run.sh data 2 to resume" in r.stderr


def test_smoke_then_eval_reproduces_its_final_line(smoke, corpus):
    """The README's first command (fewer steps), then `./run.sh eval` of the artifact it wrote: the knobs
    come from the run's train.log, so the final line is the same. The smoke's data is the test suite's corpus
    (one generator, same bytes), written over an older smoke folder without touching files of others."""
    project, proc = smoke
    stdout, stderr = proc.communicate(timeout=600)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    smoke_data = project / "runs/smoke_data"
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"in {smoke_data.relative_to(project)} (" in r.stdout  # the corpus line of tests/corpus.py
    for f in ("tokenizer.model", "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"):
        assert (smoke_data / f).read_bytes() == (corpus / f).read_bytes(), f
    assert (smoke_data / "notes.txt").read_text() == "mine"
    run = project / "runs/first"
    for name in ("final_model.int6.ptz", "submission.json", "train.log"):
        assert (run / name).is_file(), name
    first = final_line(r.stdout)
    with open(run / "train.log", "a") as log:  # lines shaped like knobs but not knobs: bash refused `export =x`
        log.write("config:=x\nconfig:9LIVES=1\n")
    r = run_sh(project, "eval", "runs/first/final_model.int6.ptz", RUN_ID="again")  # knobs from its train.log
    assert r.returncode == 0, r.stderr[-3000:]
    assert final_line(r.stdout) == first
    r = run_sh(project, "eval")
    assert r.returncode == 2 and "usage: ./run.sh eval" in r.stderr
    r = run_sh(project, "evaluate")
    assert r.returncode == 2 and "unknown mode 'evaluate'" in r.stderr and "set -euo" not in r.stderr


@pytest.mark.parametrize("args", [("train", "EVAL_ONLY=1"), ("smoke", "ITERATIONS=5"), ("eval", "a.ptz", "b.ptz"),
                                  ("data", "abc"), ("data", "1.5"), ("data", "-3"), ("data", "2", "3")])
def test_arguments_that_would_be_ignored_are_refused(tmp_path, args):
    """`./run.sh train EVAL_ONLY=1` trained for hours (the argument was never read); `./run.sh data 1.5` ended in
    Python's int() traceback and `data -3` downloaded no shard without a word. Each is now one line, exit 2, at once."""
    r = run_sh(project_copy(tmp_path), *args, timeout=30)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert ("usage: ./run.sh " if args[0] in ("eval", "data") else "takes no arguments") in r.stderr, r.stderr


# Counts each rank's gradient all-reduces (one per step: the first big one of a step, Muon's come after it, smaller)
# and prints the count as the rank exits.
COUNT_STEPS = """import os
if "RANK" in os.environ:
    import torch.distributed as dist
    n, size, reduce, exit_ = [0], [], dist.all_reduce, os._exit
    def all_reduce(t, *args, **kwargs):
        size[:] = size or ([t.numel()] if t.numel() > 1000 else [])
        n[0] += size == [t.numel()]
        return reduce(t, *args, **kwargs)
    dist.all_reduce = all_reduce
    os._exit = lambda code: (os.write(1, f"rank{os.environ['RANK']} gradient_all_reduces:{n[0]}\\n".encode()),
                             exit_(code))
"""


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, corpus):
    """Two `./run.sh train` launches on 2 processes at once in one project copy: "ddp" left alone, "stop" sent
    SIGTERM (to torchrun, as a scheduler does) once its log shows step 4 of 12."""
    project = project_copy(tmp_path_factory.mktemp("ddp"))
    (project / "hook").mkdir()
    (project / "hook" / "sitecustomize.py").write_text(COUNT_STEPS)
    env = {**TINY, "NPROC": "2", "TTT_ENABLED": "0", "PYTHONPATH": str(project / "hook")}
    jobs = [(*sh_command(project, "train", **env, RUN_ID="ddp"), "", 0),
            (*sh_command(project, "train", **env, RUN_ID="stop"), "step:4/12 train_loss", signal.SIGTERM)]
    return project, env, *run_signalled(jobs)


def test_train_launches_torchrun_for_several_processes(ddp):
    project, _, r, _ = ddp
    assert r.returncode == 0, r.stdout[-3000:]
    assert "world_size:2" in r.stdout and final_line(r.stdout)
    assert (project / "runs/ddp/final_model.int6.ptz").is_file()


def test_sigterm_to_torchrun_stops_every_rank_after_one_step_and_resume_equals_uninterrupted(ddp):
    """torchrun passes SIGTERM to both ranks, which reach it at different moments: they agree (on the vote summed
    by the loss all-reduce, read every 4 steps) to stop after step 8, both after exactly 8 steps; rank 0 writes
    one checkpoint and the stop line; torchrun's own exception is one line; exit 143. RESUME=1 ends as "ddp"."""
    project, env, plain, r = ddp
    assert r.returncode == 143 and "Traceback" not in r.stdout, r.stdout[-3000:]
    step = 12 if "step:12/12 train_loss" in r.stdout else 8  # 8, unless this test's reader lagged 4 steps behind
    ckpt = f"runs/stop/checkpoints/ckpt_{step:07d}.pt"  # RUNS_DIR=runs, in the project
    stop = f"stopped: SIGTERM at step {step}/12; checkpoint {ckpt}; continue with RESUME=1"
    assert [l for l in r.stdout.splitlines() if l.startswith(("stopped:", "torchrun:", "error"))] == \
        [stop, "torchrun: stopped by SIGTERM; the workers were passed it (their lines are above)"], r.stdout[-3000:]
    assert sorted(re.findall(r"rank\d gradient_all_reduces:\d+", r.stdout)) == \
        [f"rank0 gradient_all_reduces:{step}", f"rank1 gradient_all_reduces:{step}"], r.stdout[-3000:]
    assert [p.name for p in (project / ckpt).parent.iterdir()] == [Path(ckpt).name]
    resumed = run_sh(project, "train", **env, RUN_ID="stop", RESUME="1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume:{ckpt} step:{step}" in resumed.stdout
    assert final_line(resumed.stdout) == final_line(plain.stdout)


def test_several_processes_refuse_before_launch_and_report_a_rank_error_once(tmp_path, corpus):
    """NPROC>1: run.sh first makes every check one process can (DRY_RUN=1 WORLD_SIZE=N): a refusal is train_gpt.py's
    one line and no torchrun worker ever starts. After the launch, an error of one rank alone (rank 1 finds no
    tokenizer) is that rank's one line, without torchrun's log lines or ChildFailedError traceback."""
    project = project_copy(tmp_path)
    hook = tmp_path / "hook"  # marks that a torchrun worker started; takes rank 1's tokenizer away
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        f"import os\nif 'RANK' in os.environ:\n    open({str(hook / 'launched')!r}, 'a').close()\n"
        "if os.environ.get('RANK') == '1':\n    os.environ['TOKENIZER_PATH'] = '/nowhere/tokenizer.model'\n")
    no_train = tmp_path / "no_train"
    no_train.mkdir()
    shutil.copy2(SAMPLE / "fineweb_val_000000.bin", no_train)
    r = run_sh(project, "train", **{**TINY, "NPROC": "6", "DATA_PATH": str(no_train), "PYTHONPATH": str(hook)})
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"error: no fineweb_train_*.bin shards in DATA_PATH={no_train}\n")
    assert not (hook / "launched").exists()

    r = run_sh(project, "train", **{**TINY, "NPROC": "2", "PYTHONPATH": str(hook), "RUN_ID": "r"})
    assert r.returncode == 2 and r.stderr.startswith("error: rank 1: TOKENIZER_PATH=/nowhere/tokenizer.model does not"), \
        r.stderr[-3000:]
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert (hook / "launched").exists() and not (project / "runs/r/final_model.pt").exists()
