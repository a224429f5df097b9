"""tests/gpu_check.sh rehearsed on the CPU with tiny knobs (COMPILE=0): the step order, the one summary table with
every row, and a step that runs out of time leaving the others and the table. Never timing: the GPU measures."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, clean_env

sys.path.insert(0, str(ROOT / "tests"))
import gpu_check_table  # noqa: E402  (tests/gpu_check_table.py)

TINY_CHECK = dict(TINY, NUM_LAYERS="2", VE_LAYERS="1", XSA_LAYERS="1", TTT_FREEZE_BLOCKS="1", TRAIN_BATCH_TOKENS="1024",
                  MICRO_BATCH_SEQS="4", VAL_MAX_TOKENS="3000", COMPILE="0", ITERATIONS="2", WARMDOWN_ITERS="1",
                  PRIME_STEPS="1", BENCH_STEPS="1", RUN_PRIME_STEPS="0", BENCH_TTT_EPOCHS="1", TTT_EPOCHS="1")
LABELS = ["step bench_train", "step bench_peer", "step bench_ttt", "step pipeline", "step eval_only",
          "step bench_train_graph", "step bench_train_budget", "goal 1: training tokens/s >= 1.25x published, peak memory <= published",
          "goal 2: TTT s/chunk <= 0.5x published",
          "goal 3: compile + priming <= 40 s, EVAL_ONLY reuses the compiled code", "training step (ms)", "training tokens/s", "training peak memory (MiB)",
          "compile + priming (s)", "attention kernel (SDPA_BACKEND)",
          "one graph (COMPILE=graph): compile + priming (s); step ms; tokens/s; peak memory (MiB)",
          "ACTIVATION_BUDGET=0.9: compile + priming (s); step ms; tokens/s; peak memory (MiB)"] + \
    [f"attention alone, {k}: fwd+bwd ms per call; per step" for k in gpu_check_table.ATTENTION_KERNELS] + [
          "TTT s/chunk, 10 epochs (ours steady; published eager, warm-up included)",
          "TTT s/chunk, straightforward reference (eager)", "TTT full split (1,893 chunks), 1 GPU (s)",
          "TTT full split, 8 GPUs (s, lower bound)", "TTT val_bpb ours / reference",
          "pipeline (train, artifact, TTT): graphs / graph breaks",
          "pipeline (train, artifact, TTT): val_bpb, eval time",
          "EVAL_ONLY of its artifact: graphs / graph breaks", "EVAL_ONLY of its artifact: val_bpb, eval time",
          "EVAL_ONLY compile cache: warm at start; FX graph hits/misses",
          "memory held between steps (MiB): all (weights, optimizer state, EMA)", "memory at one step's peak (MiB)",
          "kept for the backward, eager: MiB per sequence; GiB at the micro-batch; float32 MiB of 2"] + \
    [f"peak holder {i}" for i in range(1, 9)] + [f"kernel {i}" for i in range(1, 21)]
SAVED_LABEL = "kept for the backward, eager: MiB per sequence; GiB at the micro-batch; float32 MiB of 2"
TTT_LABELS = [l for l in LABELS if l.startswith("TTT")]
GOAL_LABELS = [l for l in LABELS if l.startswith("goal ")]


def rows_of(table: str) -> dict[str, list[str]]:
    """{label: its 4 cells}: exactly the rows of LABELS, in that order, under the header."""
    lines = table.strip().splitlines()
    assert lines[:2] == ["| check | train_gpt.py | published script | ours / published |", "|---|---|---|---|"]
    cells = [[c.strip() for c in l[1:-1].split("|")] for l in lines[2:]]
    assert [c[0] for c in cells] == LABELS and all(len(c) == 4 for c in cells)
    return {c[0]: c for c in cells}


def test_rehearsal_runs_every_step_in_order_and_ends_with_the_full_table(tmp_path):
    """bench_ttt gets a 1-second limit (LIMIT_BENCH_TTT): it times out, the steps after it still run, and its rows
    say so; without PEER_SCRIPT the published script's rows say "not run"; the profile's 20 rows come from the
    bench_train step, the pipeline's from train_gpt.py's own lines."""
    env = clean_env(**TINY_CHECK, OUT=str(tmp_path), PYTHON=sys.executable, LIMIT_BENCH_TTT="1")
    env.pop("PEER_SCRIPT", None)
    r = subprocess.run(["bash", str(ROOT / "tests" / "gpu_check.sh")], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    log = (tmp_path / "gpu_check.log").read_text()
    assert re.findall(r"^gpu_check:(\w+) start:", log, re.M) == list(gpu_check_table.STEPS)
    rcs = dict(re.findall(r"^gpu_check:(\w+) rc:(\d+)", log, re.M))
    assert rcs == {"bench_train": "0", "bench_peer": "0", "bench_ttt": "124", "pipeline": "0", "eval_only": "0",
                   "bench_train_graph": "0", "bench_train_budget": "0"}
    table = (tmp_path / "gpu_check_table.md").read_text()
    assert table.strip() in r.stdout
    rows = rows_of(table)
    assert rows["step bench_ttt"][1].startswith("timed out") and rows["step pipeline"][1].startswith("ok")
    assert rows[GOAL_LABELS[0]][1] == "not measured: published script not run"
    assert rows[GOAL_LABELS[1]][1].startswith("not measured: bench_ttt timed out after ")
    for label in ("training step (ms)", "training tokens/s", "compile + priming (s)", TTT_LABELS[0]):
        assert rows[label][2] == "not run (PEER_SCRIPT unset)" and rows[label][3] == "", rows[label]
    assert float(rows["training step (ms)"][1]) > 0 and float(rows["training tokens/s"][1]) > 0
    assert all(rows[l][1].startswith("timed out") for l in TTT_LABELS)
    assert all(re.fullmatch(r"[\d.]+% of the step, [\d.]+ ms: \S.*", rows[f"kernel {i}"][1]) for i in range(1, 21))
    final = re.search(r"^final_int6_zstd-22_roundtrip val_loss:\S+ val_bpb:(\S+)", log, re.M).group(1)
    assert rows["pipeline (train, artifact, TTT): val_bpb, eval time"][1].startswith(final + ", ")
    assert rows["EVAL_ONLY of its artifact: val_bpb, eval time"][1].startswith(final + ", ")
    assert rows["pipeline (train, artifact, TTT): graphs / graph breaks"][1] == "not compiled"
    assert rows["memory at one step's peak (MiB)"][1] == rows["peak holder 1"][1] == "not run (CUDA only)"
    assert re.fullmatch(r"[\d.]+; [\d.]+; [\d.]+", rows[SAVED_LABEL][1]), rows[SAVED_LABEL]  # measured on any device
    # step 1 ran torch's choice (the CPU's flash kernel); step 6 the bench again (eager here: COMPILE=0 stays 0)
    assert rows["attention kernel (SDPA_BACKEND)"][1] == "flash_attention (auto)"
    assert re.fullmatch(r"[\d.]+; [\d.]+; \d+ \([\d.]+x step 1's\); nan",
                        rows["one graph (COMPILE=graph): compile + priming (s); step ms; tokens/s; peak memory (MiB)"][1])
    # each kernel alone: the CPU runs its flash kernel only; a step calls it 2 layers x 2 forwards (8 sequences by 4)
    alone = {k: rows[f"attention alone, {k}: fwd+bwd ms per call; per step"][1] for k in gpu_check_table.ATTENTION_KERNELS}
    ms, per_step = map(float, alone["flash_attention"].split("; "))
    assert ms > 0 and per_step == pytest.approx(4 * ms, rel=0.01, abs=0.1), alone
    assert alone["cudnn_attention"] == alone["efficient_attention"] == "not supported here"


def test_table_of_a_gpu_log_with_the_peer_and_a_failed_step():
    """The lines a GPU run prints (as tests/bench.py and train_gpt.py write them): ratios ours / published, the
    graph count and cache hits, and a failed step's rows naming its exit status."""
    log = "\n".join([
        "gpu_check:bench_train start:10:00:00 limit:110s", "config:SDPA_BACKEND=auto",
        "device:cuda name:NVIDIA H100 80GB HBM3 world_size:1 cpu_threads:16 autocast:bf16 attention:cudnn_attention "
        "sdpa_backend:auto", "bench_train_primed compile_and_priming_s:70.0",
        "bench_attention kernel:cudnn_attention supported:1 fwd_bwd_ms:4.10 calls_per_step:88 per_step_ms:360.8 "
        "seqs:48 seq_len:2048 dtype:bfloat16", "bench_attention kernel:flash_attention supported:1 fwd_bwd_ms:5.00 "
        "calls_per_step:88 per_step_ms:440.0 seqs:48 seq_len:2048 dtype:bfloat16",
        "bench_train machine:x step_ms:600.0 tok_s:1310720 peak_mem_mib:40000",
        "bench_profile_top rank:1 share:20.0% ms:120.00 calls:88 name:triton_per_fused_a b",
        "bench_memory between_steps_mib:520 weights_mib:103 optimizer_state_mib:310 ema_mib:103 step_peak_mib:26000 "
        "trace_events:900", "bench_memory_top rank:1 mib:24000 where:train_gpt.py:866 train_step via compiled code",
        "bench_saved_for_backward seqs:2 seq_len:2048 autocast:bf16 total_mib:1470.4 per_seq_mib:735.2 "
        "at_micro_batch_48_gib:34.46 bfloat16_mib:926.6 float32_mib:543.8", "gpu_check:bench_train rc:0 secs:100",
        "gpu_check:bench_peer start:10:01:40 limit:100s", "bench_peer machine:x step_ms:750.0 tok_s:1048576 "
        "peak_mem_mib:24000 compile_and_priming_s:60.0 steps:10", "bench_peer_ttt chunks:2 epochs:10 ttt_s:2.60 "
        "s_per_chunk:1.300 (eager)", "gpu_check:bench_peer rc:0 secs:90",
        "gpu_check:bench_ttt start:10:03:10 limit:90s", "boom", "gpu_check:bench_ttt rc:1 secs:20",
        "gpu_check:pipeline start:10:03:30 limit:100s", "compile_cache: dir:/x warm:0",
        "compile: graphs:9 graph_breaks:0",
        "final_int6_zstd-22_roundtrip val_loss:4.0 val_bpb:2.5 eval:9000ms", "gpu_check:pipeline rc:0 secs:95",
        "gpu_check:eval_only skipped:budget_spent",
        "gpu_check:bench_train_graph start:10:05:10 limit:100s", "config:COMPILE=graph",
        "bench_train_primed compile_and_priming_s:95.5",
        "bench_train machine:x step_ms:750.0 tok_s:1048576 peak_mem_mib:39000",
        "gpu_check:bench_train_graph rc:0 secs:80",
        "gpu_check:bench_train_budget start:10:06:30 limit:60s", "config:ACTIVATION_BUDGET=0.9",
        "bench_train_primed compile_and_priming_s:50.0",
        "bench_train machine:x step_ms:630.0 tok_s:1248305 peak_mem_mib:20000",
        "gpu_check:bench_train_budget rc:0 secs:60"])
    rows = rows_of(gpu_check_table.table(log))
    assert rows["training tokens/s"][1:] == ["1310720", "1048576", "1.25"]
    assert rows["training step (ms)"][3] == "0.80" and rows["training peak memory (MiB)"][3] == "1.67"
    assert rows["compile + priming (s)"][1:3] == ["70.0", "60.0"]
    assert rows[TTT_LABELS[0]][1:] == ["failed (rc 1) after 20 s", "1.300", ""]
    assert rows["TTT val_bpb ours / reference"][1] == "failed (rc 1) after 20 s"
    assert rows["pipeline (train, artifact, TTT): graphs / graph breaks"][1] == "9 / 0"
    assert rows["pipeline (train, artifact, TTT): val_bpb, eval time"][1] == "2.5, 9000ms"
    assert rows["step eval_only"][1] == rows["EVAL_ONLY compile cache: warm at start; FX graph hits/misses"][1] == "skipped (budget spent)"
    assert rows["kernel 1"][1] == "20.0% of the step, 120.00 ms: triton_per_fused_a b" and rows["kernel 2"][1] == "—"
    assert rows["memory held between steps (MiB): all (weights, optimizer state, EMA)"][1] == "520 (103, 310, 103)"
    assert rows["memory at one step's peak (MiB)"][1] == "26000"
    assert rows["peak holder 1"][1] == "24000 MiB: train_gpt.py:866 train_step via compiled code"
    assert rows["peak holder 2"][1] == "—"
    assert rows[SAVED_LABEL][1] == "735.2; 34.46; 543.8"
    assert rows["attention kernel (SDPA_BACKEND)"][1] == "cudnn_attention (auto)"
    assert rows["one graph (COMPILE=graph): compile + priming (s); step ms; tokens/s; peak memory (MiB)"][1] == \
        "95.5; 750.0; 1048576 (0.80x step 1's); 39000"
    assert rows["ACTIVATION_BUDGET=0.9: compile + priming (s); step ms; tokens/s; peak memory (MiB)"][1] == \
        "50.0; 630.0; 1248305 (0.95x step 1's); 20000"
    assert rows["attention alone, cudnn_attention: fwd+bwd ms per call; per step"][1] == "4.10; 360.8"
    assert rows["attention alone, flash_attention: fwd+bwd ms per call; per step"][1] == "5.00; 440.0"
    assert rows["attention alone, efficient_attention: fwd+bwd ms per call; per step"][1] == "missing in the log"
    assert [rows[l][1] for l in GOAL_LABELS] == ["NOT met (tokens/s 1.25x, peak memory 1.67x)",
                                                 "not measured: bench_ttt failed (rc 1) after 20 s",
                                                 "not measured: eval_only skipped (budget spent)"]


def test_goals_are_read_off_the_measured_rows():
    """Issue 19's goals: tokens/s >= 1.25x and peak <= the published script's, TTT <= 0.5x its seconds per chunk,
    compile + priming <= 40 s with EVAL_ONLY finding every graph in the cache; each just met or just missed."""
    def log(tok=1250000, peak=24000, ttt="0.650", primed="40.0", misses=0):
        return "\n".join([
            "gpu_check:bench_train start:1 limit:110s", f"bench_train_primed compile_and_priming_s:{primed}",
            f"bench_train machine:x step_ms:600.0 tok_s:{tok} peak_mem_mib:{peak}", "gpu_check:bench_train rc:0 secs:9",
            "gpu_check:bench_peer start:1 limit:100s", "bench_peer machine:x step_ms:750.0 tok_s:1000000 "
            "peak_mem_mib:24000 compile_and_priming_s:60.0 steps:10", "bench_peer_ttt chunks:2 epochs:10 ttt_s:2.60 "
            "s_per_chunk:1.300 (eager)", "gpu_check:bench_peer rc:0 secs:9",
            "gpu_check:bench_ttt start:1 limit:90s", f"bench_ttt_extrapolation ours_s_per_chunk:{ttt}",
            "gpu_check:bench_ttt rc:0 secs:9", "gpu_check:eval_only start:1 limit:50s",
            f"compile_cache: fx_graph_hits:11 misses:{misses} aot_autograd_hits:11 misses:{misses}",
            "gpu_check:eval_only rc:0 secs:9"])
    met = [rows_of(gpu_check_table.table(log()))[l][1] for l in GOAL_LABELS]
    assert met == ["met (tokens/s 1.25x, peak memory 1.00x)", "met (0.50x the published seconds per chunk)",
                   "met (40.0 s; EVAL_ONLY FX graph hits 11, misses 0)"], met
    missed = [rows_of(gpu_check_table.table(log(1249000, 24001, "0.651", "40.1", 1)))[l][1] for l in GOAL_LABELS]
    assert all(m.startswith("NOT met (") for m in missed), missed
    for kw in (dict(tok=1249000), dict(peak=24001)):
        assert rows_of(gpu_check_table.table(log(**kw)))[GOAL_LABELS[0]][1].startswith("NOT met"), kw
    for kw in (dict(primed="40.1"), dict(misses=1)):
        assert rows_of(gpu_check_table.table(log(**kw)))[GOAL_LABELS[2]][1].startswith("NOT met"), kw


FAKE_PEER = '''import json, os
knobs = {k: os.environ.get(k) for k in ("NUM_KV_HEADS", "MLP_HIDDEN", "LATE_QAT", "ITERATIONS", "WARMUP_STEPS",
                                        "TRAIN_BATCH_TOKENS", "DATA_PATH")}
knobs["cwd"] = os.getcwd()
json.dump(knobs, open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "knobs.json"), "w"))
for step in range(1, int(knobs["ITERATIONS"]) + 1):
    ms = 1000 + 600 * step + (300 if step == 1 else 0)  # the first step is slower: not in the steady time
    print(f"step:{step}/{knobs['ITERATIONS']} train_loss:6.9 train_time:{ms}ms step_avg:1.0ms")
print("peak memory allocated: 23940 MiB reserved: 25000 MiB")
print("ttt_sliding:start chunks=2 chunk_tokens=32768")
print("ttt_sliding:done val_loss=2.1 val_bpb=1.2 elapsed=2.6s")
'''


def test_bench_peer_runs_the_published_script_with_the_published_knobs_and_reads_its_lines(tmp_path):
    """PEER_SCRIPT (here a stand-in that prints the published script's log lines): run in a scratch folder with the
    published run's knobs, BENCH_STEPS + 2 iterations after PRIME_STEPS warm-up steps; the steady step time comes
    from its logged train_time between the second and the last step, then its peak memory and TTT s/chunk."""
    fake = tmp_path / "peer.py"
    fake.write_text(FAKE_PEER)
    env = clean_env(**dict(TINY_CHECK, PEER_SCRIPT=str(fake), PRIME_STEPS="3", BENCH_STEPS="4"))
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "bench.py"), "peer"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    log = r.stdout
    knobs = json.loads((tmp_path / "knobs.json").read_text())
    assert {k: knobs[k] for k in ("NUM_KV_HEADS", "MLP_HIDDEN", "LATE_QAT", "ITERATIONS", "WARMUP_STEPS")} == \
        {"NUM_KV_HEADS": "4", "MLP_HIDDEN": "1536", "LATE_QAT": "0", "ITERATIONS": "6", "WARMUP_STEPS": "3"}
    assert knobs["TRAIN_BATCH_TOKENS"] == "1024" and knobs["DATA_PATH"] == TINY["DATA_PATH"]
    assert not knobs["cwd"].startswith(str(ROOT))  # its logs/ and final_model.* go to a scratch folder
    [line] = [l for l in log.splitlines() if l.startswith("bench_peer machine:")]
    assert " step_ms:600.0 tok_s:1707 peak_mem_mib:23940 " in line and line.endswith(" steps:4"), line
    assert "bench_peer_ttt chunks:2 epochs:10 ttt_s:2.60 s_per_chunk:1.300 " in log
    table = gpu_check_table.table("gpu_check:bench_peer start:x\n" + log + "\ngpu_check:bench_peer rc:0 secs:9")
    assert "| training step (ms) | not run | 600.0 |  |" in table


def test_peak_holders_replays_the_allocator_trace():
    """The peak of live bytes over an allocator trace (from the bytes live before it), and what was alive at that
    moment summed by the innermost train_gpt.py frame (flagged when inductor's generated code allocated it), else
    the innermost frame; frees after the peak do not count, nor allocations made after it."""
    import bench  # tests/bench.py
    ours = lambda line, fn: {"filename": "/x/train_gpt.py", "line": line, "name": fn}
    gen = {"filename": "/tmp/torchinductor_u/ab/cabc.py", "line": 9, "name": "call"}
    lib = {"filename": "/site/torch/optim/adamw.py", "line": 5, "name": "_step"}
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": [gen, ours(866, "train_step")]},
        {"action": "alloc", "addr": 2, "size": 50, "frames": [ours(870, "train_step")]},
        {"action": "alloc", "addr": 3, "size": 30, "frames": [gen, ours(866, "train_step")]},
        {"action": "free_requested", "addr": 2, "size": 50, "frames": []},
        {"action": "free_completed", "addr": 2, "size": 50, "frames": []},
        {"action": "alloc", "addr": 4, "size": 60, "frames": [lib]},  # peak: 1000 + 100 + 30 + 60 + 5
        {"action": "alloc", "addr": 7, "size": 5, "frames": [gen]},  # the backward: no train_gpt.py frame
        {"action": "free_requested", "addr": 1, "size": 100, "frames": []},
        {"action": "alloc", "addr": 5, "size": 7, "frames": []},
        {"action": "free_requested", "addr": 4, "size": 60, "frames": []},
        {"action": "alloc", "addr": 6, "size": 120, "frames": [lib]},  # 1000 + 30 + 5 + 7 + 120 < the peak
    ]
    peak, held = bench.peak_holders(trace, baseline=1000)
    assert peak == 1195
    assert held == [("train_gpt.py:866 train_step via compiled code", 130), ("adamw.py:5 _step", 60),
                    ("cabc.py:9 call via compiled code", 5)]
    assert bench.peak_holders(trace, baseline=1000, top=1)[1] == held[:1]
    assert bench.peak_holders([], baseline=5) == (5, [])
