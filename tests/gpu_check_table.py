"""The summary table of tests/gpu_check.sh: python tests/gpu_check_table.py GPU_CHECK_LOG  (prints Markdown).

Reads the key:value lines that tests/bench.py and train_gpt.py print, per step (between a step's
`gpu_check:NAME start:` and `gpu_check:NAME rc:` lines). Every row is always printed: a value the log lacks
says why (not run, timed out, failed, skipped).
"""
from __future__ import annotations

import re
import sys

STEPS = ("bench_train", "bench_peer", "bench_ttt", "pipeline", "eval_only", "bench_train_graph",
         "bench_train_budget")
TOP = 20  # kernels of the profile
HOLDERS = 8  # places that hold the peak memory
ATTENTION_KERNELS = ("cudnn_attention", "flash_attention", "efficient_attention")  # as tests/bench.py names them


def sections(text: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """{step: its output lines}, {step: its status: ok Ns, timed out, failed (rc N), skipped}."""
    lines, status, cur = {}, {}, None
    for line in text.splitlines():
        m = re.match(r"^gpu_check:(\w+) (start|rc|skipped):(\S+)(?: secs:(\d+))?", line)
        if m and m.group(2) == "start":
            cur = m.group(1)
            lines[cur], status[cur] = [], "running (no rc line)"
        elif m and m.group(2) == "rc":
            rc, secs = int(m.group(3)), m.group(4)
            status[m.group(1)] = (f"ok, {secs} s" if rc == 0 else f"timed out after {secs} s" if rc in (124, 137)
                                  else f"failed (rc {rc}) after {secs} s")
            cur = None
        elif m:
            status[m.group(1)] = "skipped (budget spent)"
        elif cur:
            lines[cur].append(line)
    return lines, status


def fields(lines: list[str], prefix: str) -> dict[str, str] | None:
    """key:value pairs of the last line that starts with `prefix ` (None if there is none)."""
    found = [l for l in lines if l.startswith(prefix + " ")]
    return dict(re.findall(r"(\w+):(\S+)", found[-1])) if found else None


def goals(num, why, out: dict[str, list[str]]) -> list[tuple[str, str]]:
    """Issue 19's goals 1-3 read off the measured rows: met, NOT met (with the numbers), or why not measured."""
    def verdict(ok: bool, detail: str) -> str:
        return f"{'met' if ok else 'NOT met'} ({detail})"

    def missing(*pairs) -> str:  # (step, number): the first step whose number is missing says why
        step = next(s for s, v in pairs if v is None)
        return "not measured: " + ("published script not run" if step == "bench_peer" else f"{step} {why(step)}")

    tok, ptok = num("bench_train", "bench_train", "tok_s"), num("bench_peer", "bench_peer", "tok_s")
    mem, pmem = num("bench_train", "bench_train", "peak_mem_mib"), num("bench_peer", "bench_peer", "peak_mem_mib")
    pairs = (("bench_train", tok), ("bench_peer", ptok), ("bench_train", mem), ("bench_peer", pmem))
    one = verdict(tok / ptok >= 1.25 and mem <= pmem, f"tokens/s {tok / ptok:.2f}x, peak memory {mem / pmem:.2f}x") \
        if all(v is not None for _, v in pairs) else missing(*pairs)
    ttt, pttt = (num("bench_ttt", "bench_ttt_extrapolation", "ours_s_per_chunk"),
                 num("bench_peer", "bench_peer_ttt", "s_per_chunk"))
    two = verdict(ttt / pttt <= 0.5, f"{ttt / pttt:.2f}x the published seconds per chunk") \
        if ttt is not None and pttt is not None else missing(("bench_ttt", ttt), ("bench_peer", pttt))
    primed = num("bench_train", "bench_train_primed", "compile_and_priming_s")
    hits = [dict(re.findall(r"(\w+):(\S+)", l)) for l in out.get("eval_only", []) if " fx_graph_hits:" in l]
    if primed is None or not hits:
        three = missing(("bench_train", primed), ("eval_only", None))
    else:
        h, m = int(hits[-1]["fx_graph_hits"]), int(hits[-1]["misses"])
        three = verdict(primed <= 40 and h > 0 and m == 0, f"{primed:.1f} s; EVAL_ONLY FX graph hits {h}, misses {m}")
    return [("goal 1: training tokens/s >= 1.25x published, peak memory <= published", one),
            ("goal 2: TTT s/chunk <= 0.5x published", two),
            ("goal 3: compile + priming <= 40 s, EVAL_ONLY reuses the compiled code", three)]


def table(text: str) -> str:
    out, status = sections(text)

    def why(step: str) -> str:  # why a value of this step is not in the log
        if step not in status:
            return "not run"
        return "missing in the log" if status[step].startswith("ok") else status[step]

    def value(step: str, prefix: str, key: str) -> str | None:
        return (fields(out.get(step, []), prefix) or {}).get(key)

    def compared(label: str, step: str, ours: str | None, peer: str | None) -> str:
        """A row of ours beside the published script's (bench_peer), with their ratio when both were measured."""
        if peer is None:
            peer_skipped = any(" not_run:" in l for l in out.get("bench_peer", []))
            peer_cell = "not run (PEER_SCRIPT unset)" if peer_skipped else why("bench_peer")
        else:
            peer_cell = peer
        ratio = f"{float(ours) / float(peer):.2f}" if ours is not None and peer is not None else ""
        return f"| {label} | {ours if ours is not None else why(step)} | {peer_cell} | {ratio} |"

    def ours_only(label: str, cell: str) -> str:
        return f"| {label} | {cell} | | |"

    def num(step: str, prefix: str, key: str) -> float | None:
        try:
            return float(value(step, prefix, key))
        except (TypeError, ValueError):
            return None

    rows = ["| check | train_gpt.py | published script | ours / published |", "|---|---|---|---|"]
    rows += [ours_only(f"step {s}", status.get(s, "not run")) for s in STEPS]
    rows += [ours_only(label, cell) for label, cell in goals(num, why, out)]
    for label, prefix, key, peer_prefix, peer_key, step in (
            ("training step (ms)", "bench_train", "step_ms", "bench_peer", "step_ms", "bench_train"),
            ("training tokens/s", "bench_train", "tok_s", "bench_peer", "tok_s", "bench_train"),
            ("training peak memory (MiB)", "bench_train", "peak_mem_mib", "bench_peer", "peak_mem_mib", "bench_train"),
            ("compile + priming (s)", "bench_train_primed", "compile_and_priming_s", "bench_peer",
             "compile_and_priming_s", "bench_train")):
        rows.append(compared(label, step, value(step, prefix, key), value("bench_peer", peer_prefix, peer_key)))
    dev = [dict(re.findall(r"(\w+):(\S+)", l)) for l in out.get("bench_train", []) if l.startswith("device:")]
    dev = dev[-1] if dev and "attention" in dev[-1] else None
    rows.append(ours_only("attention kernel (SDPA_BACKEND)",
                          f"{dev['attention']} ({dev['sdpa_backend']})" if dev else why("bench_train")))
    one = fields(out.get("bench_train", []), "bench_train")
    for step, what in (("bench_train_graph", "one graph (COMPILE=graph)"),
                       ("bench_train_budget", "ACTIVATION_BUDGET=0.9")):
        run, primed = (fields(out.get(step, []), p) for p in ("bench_train", "bench_train_primed"))
        speed = f" ({float(run['tok_s']) / float(one['tok_s']):.2f}x step 1's)" if run and one else ""
        rows.append(ours_only(f"{what}: compile + priming (s); step ms; tokens/s; peak memory (MiB)",
                              f"{primed['compile_and_priming_s'] if primed else '?'}; {run['step_ms']}; {run['tok_s']}"
                              f"{speed}; {run['peak_mem_mib']}" if run else why(step)))
    alone = {f.get("kernel"): f for f in (dict(re.findall(r"(\w+):(\S+)", l)) for l in out.get("bench_train", [])
                                          if l.startswith("bench_attention "))}
    for name in ATTENTION_KERNELS:  # each kernel alone at the run's shapes (bench_train, before compiling)
        f = alone.get(name)
        cell = (f"{f['fwd_bwd_ms']}; {f['per_step_ms']}" if f and f["supported"] == "1" else "not supported here" if f
                else why("bench_train"))
        rows.append(ours_only(f"attention alone, {name}: fwd+bwd ms per call; per step", cell))
    rows.append(compared("TTT s/chunk, 10 epochs (ours steady; published eager, warm-up included)", "bench_ttt",
                         value("bench_ttt", "bench_ttt_extrapolation", "ours_s_per_chunk"),
                         value("bench_peer", "bench_peer_ttt", "s_per_chunk")))
    for label, key in (("TTT s/chunk, straightforward reference (eager)", "straightforward_s_per_chunk"),
                       ("TTT full split (1,893 chunks), 1 GPU (s)", "full_split_s_1gpu"),
                       ("TTT full split, 8 GPUs (s, lower bound)", "full_split_s_8gpu")):
        rows.append(ours_only(label, value("bench_ttt", "bench_ttt_extrapolation", key) or why("bench_ttt")))
    bpb = fields(out.get("bench_ttt", []), "bench_ttt")
    rows.append(ours_only("TTT val_bpb ours / reference",
                          f"{bpb['ours_bpb']} / {bpb['ref_bpb']}" if bpb else why("bench_ttt")))
    for step, label in (("pipeline", "pipeline (train, artifact, TTT)"), ("eval_only", "EVAL_ONLY of its artifact")):
        ran = status.get(step, "").startswith("ok")
        g = fields(out.get(step, []), "compile:")
        graphs = f"{g['graphs']} / {g['graph_breaks']}" if g else "not compiled" if ran else why(step)
        rows.append(ours_only(f"{label}: graphs / graph breaks", graphs))
        final = fields(out.get(step, []), "final_int6_zstd-22_roundtrip")
        rows.append(ours_only(f"{label}: val_bpb, eval time", f"{final['val_bpb']}, {final['eval']}" if final
                              else why(step)))
    cache = [l for l in out.get("eval_only", []) if l.startswith("compile_cache: ")]
    warm = fields([l for l in cache if " warm:" in l], "compile_cache:")
    hits = fields([l for l in cache if " fx_graph_hits:" in l], "compile_cache:")
    if warm:
        cell = f"warm:{warm['warm']}; " + (f"{hits['fx_graph_hits']}/{hits['misses']}" if hits else "no counts")
    else:
        cell = "not compiled" if status.get("eval_only", "").startswith("ok") else why("eval_only")
    rows.append(ours_only("EVAL_ONLY compile cache: warm at start; FX graph hits/misses", cell))
    mem, holders = fields(out.get("bench_train", []), "bench_memory"), \
        [l for l in out.get("bench_train", []) if l.startswith("bench_memory_top ")]
    no_mem = "not run (CUDA only)" if mem and "not_run" in mem else why("bench_train")
    mem = mem if mem and "not_run" not in mem else None  # measured, or the rows say why not
    rows.append(ours_only("memory held between steps (MiB): all (weights, optimizer state, EMA)",
                          f"{mem['between_steps_mib']} ({mem['weights_mib']}, {mem['optimizer_state_mib']}, "
                          f"{mem['ema_mib']})" if mem else no_mem))
    rows.append(ours_only("memory at one step's peak (MiB)", mem["step_peak_mib"] if mem else no_mem))
    saved = fields(out.get("bench_train", []), "bench_saved_for_backward")  # eager, any device
    at = next((v for k, v in (saved or {}).items() if k.startswith("at_micro_batch_")), "?")
    rows.append(ours_only("kept for the backward, eager: MiB per sequence; GiB at the micro-batch; float32 MiB of 2",
                          f"{saved['per_seq_mib']}; {at}; {saved.get('float32_mib', '0')}" if saved
                          else why("bench_train")))
    for i in range(HOLDERS):  # the place comes last: it holds spaces
        cell = (f"{fields([holders[i]], 'bench_memory_top')['mib']} MiB: {holders[i].split(' where:', 1)[1]}"
                if i < len(holders) else "—" if holders else no_mem)
        rows.append(ours_only(f"peak holder {i + 1}", cell))
    top = [l for l in out.get("bench_train", []) if l.startswith("bench_profile_top ")]
    for i in range(TOP):
        if i < len(top):  # the name comes last: it may hold spaces
            f, name = fields([top[i]], "bench_profile_top"), top[i].split(" name:", 1)[1][:80]
            rows.append(ours_only(f"kernel {i + 1}", f"{f['share']} of the step, {f['ms']} ms: {name}"))
        else:
            rows.append(ours_only(f"kernel {i + 1}", "—" if top else why("bench_train")))
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(open(sys.argv[1], encoding="utf-8", errors="replace").read()))
