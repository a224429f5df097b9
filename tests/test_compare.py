"""Reproduction at a glance: the published val_bpb curve on the validation lines of a run of the published
configuration (train_gpt.published_config, ref_suffix), and tests/compare.py (`./run.sh compare`): parsing
our logs and the published script's, the table for two real runs, the picture, bad input."""
from __future__ import annotations

import json
import struct
import sys

import pytest

import compare
from conftest import SAMPLE, TINY, final_line, tg
from test_shell import project_copy, run_sh
from test_training import ok, run_concurrently

# Two real runs of ours (seeds 7 and 8): validation at steps 0, 2 and 4, TTT over 3 chunks.
MINI = {**TINY, "ITERATIONS": "4", "WARMDOWN_ITERS": "2", "VAL_LOSS_EVERY": "2", "VAL_MAX_TOKENS": "3000"}

# A short log in the published script's format (its line shapes, made-up numbers): a 25,000-step run cut
# after step 1,000, then its final evaluation with TTT timed only on the chunk lines.
PUBLISHED_FORMAT = """\
step:0/25000 val_loss:6.9301 val_bpb:4.1044 train_time:0ms step_avg:0.02ms
step:1/25000 train_loss:6.9314 train_time:490ms step_avg:490.00ms
step:500/25000 val_loss:2.3550 val_bpb:1.3950 train_time:250000ms step_avg:500.00ms
step:750/25000 val_loss:2.3000 val_bpb:1.3600 train_time:375000ms step_avg:500.00ms
step:1000/25000 val_loss:2.2300 val_bpb:1.3240 train_time:500100ms step_avg:500.10ms
final_int6_roundtrip val_loss:2.2500 val_bpb:1.3300 eval_time:30000ms
final_int6_roundtrip_exact val_loss:2.25001234 val_bpb:1.33001234
Total submission size int6+zstd-22: 14500000 bytes
  ttt_chunk [1/1893] bpb=1.150000 time=1.7s
  ttt_chunk [11/1893] bpb=1.110000 time=12.5s
  ttt_chunk [1893/1893] bpb=1.099900 time=2000.0s
final_int6_zstd-22_roundtrip_exact val_bpb:1.09990000
"""


def hp(**env) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env({k: str(v) for k, v in env.items()})


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two real runs (in parallel) -> [(run folder, completed process)]."""
    runs = tmp_path_factory.mktemp("runs")
    jobs = [({**MINI, "SEED": seed, "RUNS_DIR": str(runs), "RUN_ID": f"seed{seed}"}, 0) for seed in (7, 8)]
    return [(runs / f"seed{env['SEED']}", ok(r)) for (env, _), r in zip(jobs, run_concurrently(*jobs))]


@pytest.fixture
def published_log(tmp_path):
    folder = tmp_path / "record"
    folder.mkdir()
    (folder / "train_seed42.log").write_text(PUBLISHED_FORMAT)
    return folder


# ---------------------------------------------------------------------------------------------- reference

def test_published_config_is_the_published_run_on_any_schedule_shape_or_gpu_count():
    assert compare.published_config(hp())  # the defaults are the published run
    for same in (dict(WARMDOWN_SHAPE="linear", WARMUP_STEPS=0), dict(MICRO_BATCH_SEQS=24), dict(SEED=1337),
                 dict(VAL_LOSS_EVERY=100, EMA_DECAY=0.99, TTT_ENABLED=0)):
        assert compare.published_config(hp(**same)), same
    for other in (dict(NUM_LAYERS=12), dict(MLP_HIDDEN=1024), dict(BOS_MASK=1), dict(TRAIN_BATCH_TOKENS=393216),
                  dict(TRAIN_SEQ_LEN=1024), dict(ITERATIONS=20000), dict(WARMDOWN_ITERS=12000),
                  dict(MAX_WALLCLOCK_SECONDS=600), dict(VAL_MAX_TOKENS=1000000)):
        assert not compare.published_config(hp(**other)), other


def test_reference_curve_only_at_published_steps():
    assert len(compare.REF_VAL_BPB) == 51  # the published log's, spot checks
    assert [compare.REF_VAL_BPB[i] for i in (0, 1, 10, 30, 50)] == [4.1043, 1.3944, 1.2305, 1.1990, 1.1088]
    assert [compare.ref_val_bpb(s) for s in (0, 5000, 25000)] == [4.1043, 1.2305, 1.1088]
    for step in (250, 4999, 25500, -500):
        assert compare.ref_val_bpb(step) is None, step


def header(**env) -> str:
    """The `config:` lines train_gpt.py's log_header writes for these knobs."""
    h = hp(**env)
    return "".join(f"config:{f.name.upper()}={getattr(h, f.name)}\n" for f in tg.dataclasses.fields(h))


def test_our_log_is_comparable_when_its_config_lines_are_the_published_run(tmp_path):
    val = "step:0/25000 val_loss:6.9000 val_bpb:4.1042 train_time:0ms step_avg:0.00ms\n"
    for env, comparable in ((dict(SEED=1337), True), (dict(ITERATIONS=20000, WARMDOWN_ITERS=10000), False),
                            (dict(EVAL_STRIDE=0, TTT_ENABLED=0), True), (dict(VAL_MAX_TOKENS=1000), False)):
        log = tmp_path / "train.log"
        log.write_text(header(**env) + val)
        assert compare.parse_log(log).comparable is comparable, env
    log.write_text("".join(l + "\n" for l in header().splitlines() if "SEED=" not in l) + val)
    assert not compare.parse_log(log).comparable  # not the whole header: not known to be the published run


# ---------------------------------------------------------------------------------------------- parsing

def test_parse_our_logs_agrees_with_the_run(two_runs):
    for folder, r in two_runs:
        run = compare.parse_log(compare.find_log(str(folder)))
        sub = json.loads((folder / "submission.json").read_text())
        printed = {int(l.split()[0].split(":")[1].split("/")[0]): float(l.split("val_bpb:")[1].split()[0])
                   for l in r.stdout.splitlines() if " val_loss:" in l and l.startswith("step:")}
        assert run.ours and not run.comparable and run.iterations == 4 and run.name == folder.name
        assert run.val == printed and sorted(printed) == [0, 2, 4]
        assert all("ref_val_bpb" not in l for l in r.stdout.splitlines())  # not the published configuration
        assert run.summary["final"] == float(final_line(r.stdout).split("val_bpb:")[1]) == sub["val_bpb"]
        assert run.summary["pre_ttt"] == sub["pre_ttt_val_bpb"]
        assert run.summary["bytes_total"] == sub["bytes_total"]
        assert abs(run.summary["train_s"] - sub["wallclock_seconds"]) <= 0.5
        assert abs(run.summary["eval_s"] - sub["eval_time_seconds"]) <= 0.051
        assert [(c, n) for c, n, _ in run.ttt] == [(1, 3), (2, 3), (3, 3)]
        assert abs(run.ttt[-1][2] - sub["val_bpb"]) < 1e-6  # the last running score is the final one


def test_parse_published_format(published_log):
    run = compare.parse_log(compare.find_log(str(published_log)))  # the folder's only *.log
    assert not run.ours and run.comparable and run.iterations == 25000 and run.name == "train_seed42"
    assert run.val == {0: 4.1044, 500: 1.3950, 750: 1.3600, 1000: 1.3240}
    assert run.ttt == [(1, 1893, 1.15), (11, 1893, 1.11), (1893, 1893, 1.0999)]
    assert run.summary == {"pre_ttt": 1.33001234, "final": 1.0999, "bytes_total": 14500000, "train_s": 500.1,
                           "eval_s": 2030.0}  # 30 s roundtrip + 2,000 s of TTT from its chunk lines
    other = published_log / "train_seed42.log"
    other.write_text(PUBLISHED_FORMAT.replace("/25000 ", "/20000 "))
    assert not compare.parse_log(other).comparable  # another run length: no reference
    ours = published_log / "ours.log"
    ours.write_text("config:SEED=1\n" + PUBLISHED_FORMAT)
    assert not compare.parse_log(ours).comparable  # ours: only what train_gpt marked with ref_val_bpb
    ours.write_text("config:SEED=1\n" + PUBLISHED_FORMAT.replace("step_avg:500.00ms\n", "step_avg:500.00ms "
                                                                 "ref_val_bpb:1.3944 delta:+0.0006\n", 1))
    assert compare.parse_log(ours).comparable


# ---------------------------------------------------------------------------------------------- table

def rows(text: str) -> dict[str, list[str]]:
    return {l.split()[0]: l.split()[1:] for l in text.splitlines() if l.strip()}


def test_table_of_two_runs(two_runs):
    (fa, ra), (fb, rb) = two_runs
    a, b = (compare.parse_log(compare.find_log(str(f))) for f in (fa, fb))
    text = compare.table([a, b])
    table = rows(text)
    assert table["step"] == ["A", "B", "B-A"]  # no reference column: not the published configuration
    for step in (0, 2, 4):
        va, vb = a.val[step], b.val[step]
        assert table[str(step)] == [f"{va:.4f}", f"{vb:.4f}", f"{vb - va:+.4f}"]
    fa_, fb_ = a.summary["final"], b.summary["final"]
    assert table["final"] == [f"{fa_:.4f}", f"{fb_:.4f}", f"{fb_ - fa_:+.4f}"]
    ba, bb = a.summary["bytes_total"], b.summary["bytes_total"]
    assert table["bytes"] == [f"{ba:.0f}", f"{bb:.0f}", f"{bb - ba:+.0f}"]
    assert set(table) >= {"pre-TTT", "train_s", "eval_s"} and "seed 8" in text


def test_table_against_the_published_run(two_runs, published_log):
    a = compare.parse_log(compare.find_log(str(two_runs[0][0])))
    table = rows(compare.table([a, compare.parse_log(compare.find_log(str(published_log)))]))
    assert table["step"] == ["A", "B", "ref", "B-ref"]
    assert table["0"][1:] == ["4.1044", "4.1043", "+0.0001"]
    assert table["500"] == ["-", "1.3950", "1.3944", "+0.0006"]
    assert table["750"] == ["-", "1.3600", "-", "-"]  # the published log has no value there
    assert table["1000"][1:] == ["1.3240", "1.3250", "-0.0010"]
    assert table["final"][1:] == ["1.0999", "1.0944", "+0.0055"]
    assert table["bytes"][1:] == ["14500000", "14496936", "+3064"]
    assert table["eval_s"][1:] == ["2030.0", "2074.0", "-44.0"]


# ---------------------------------------------------------------------------------------------- picture, CLI

def test_picture_is_a_png_with_a_panel_per_view(two_runs, published_log, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "c.png"
    assert compare.main([str(two_runs[0][0]), str(published_log), "--out", str(out)]) == 0
    assert f"compare: picture {out}" in capsys.readouterr().out
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (3 * 416, 320)  # val_bpb, delta to the published curve, TTT
    compare.main([str(two_runs[0][0]), "--out", str(out)])
    assert struct.unpack(">II", out.read_bytes()[16:24]) == (2 * 416, 320)  # nothing to compare with: no delta


def test_without_matplotlib_the_table_still_prints(two_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails as if not installed
    out = tmp_path / "c.png"
    assert compare.main([str(f) for f, _ in two_runs] + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert any(l.startswith("final ") for l in printed) and not out.exists()
    assert printed[-1].startswith("compare: no picture: matplotlib is not installed")


def test_bad_input_is_one_line_exit_2(two_runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "two").mkdir()
    for name in ("a.log", "b.log"):
        (tmp_path / "two" / name).write_text(PUBLISHED_FORMAT)
    no_val = tmp_path / "eval_only.log"
    no_val.write_text("config:SEED=1\neval_only artifact:x.ptz bytes:1\nfinal_int6_zstd-22_roundtrip_exact "
                      "val_loss:1 val_bpb:1\n")
    good = str(two_runs[0][0])
    cases = {(good, str(tmp_path / "missing")): "no such run folder or log",
             (str(tmp_path / "empty"),): "has no train.log",
             (str(tmp_path / "two"),): "it holds a.log, b.log",
             (good, str(no_val)): "has no validation lines",
             (): "usage:", (good, "--out"): "--out needs a file name", (good, "--bogus"): "usage:",
             (good, "--out", str(tmp_path / "no" / "c.png")): "does not exist",
             (good, "--out", str(tmp_path / "c.xyz")): "name a picture file ending in .png",  # matplotlib's traceback
             (good, "--out", str(tmp_path)): f"e.g. --out {tmp_path / 'compare.png'}"}  # a folder: IsADirectoryError
    for args, why in cases.items():
        assert compare.main(list(args)) == 2, args
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, (args, captured)
        assert captured.err.startswith("error: ") and why in captured.err, (args, captured.err)


def test_a_diverged_run_still_gets_its_picture_and_an_unwritable_one_is_one_line(tmp_path, capsys):
    """A run that diverged logs val_bpb nan or inf (and a TTT over no chunks 1/0): the picture's axis limits were
    NaN (ValueError) and the chunk fraction divided by zero. A picture that cannot be written is one line, exit 2."""
    pytest.importorskip("matplotlib")
    log = tmp_path / "diverged.log"
    log.write_text("config:SEED=1\nstep:0/8 val_loss:6.9 val_bpb:4.1000 train_time:0ms\n"
                   "step:4/8 val_loss:nan val_bpb:nan train_time:9ms\nstep:8/8 val_loss:inf val_bpb:inf "
                   "train_time:20ms\nttt_chunk:1/0 running_val_bpb:nan chunks_per_s:1.00 eta:0s\n")
    out = tmp_path / "c.png"
    assert compare.main([str(log), "--out", str(out)]) == 0, capsys.readouterr().err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "nan" in capsys.readouterr().out
    assert compare.main([str(log), "--out", "/proc/c.png"]) == 2  # /proc takes no new file, not even root's
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot write the picture /proc/c.png"), err


def test_run_sh_compare(two_runs, tmp_path):
    """docs/reproduce.md's command in a copy of the project: the table, and the picture in ./compare.png."""
    pytest.importorskip("matplotlib")  # run.sh would install it into this interpreter otherwise
    project = project_copy(tmp_path)
    r = run_sh(project, "compare", *(str(f) for f, _ in two_runs))
    assert r.returncode == 0, r.stderr[-3000:]
    assert rows(r.stdout)["step"] == ["A", "B", "B-A"] and r.stdout.rstrip().endswith("compare: picture compare.png")
    assert (project / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
