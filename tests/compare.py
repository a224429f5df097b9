"""Runs side by side and against the published run: python tests/compare.py RUN [RUN ...] [--out PNG]
(or ./run.sh compare RUN [RUN ...]). Not part of the artifact; train_gpt.py never imports it.

RUN is a run folder (its train.log, or its only *.log) or a log file: ours, or one written by the
published script (the challenge's records). Prints one table: val_bpb at every validated step of every
run, the published value and each run's delta to it where the run is comparable, otherwise each run's
delta to the first run; then pre-TTT and final val_bpb, total bytes, training and evaluation time.
Comparable: a log of ours whose `config:` lines are the published configuration (published_config: any GPU
count, seed or LR shape), or a published-format log of a 25,000-step run.
Writes a PNG (default ./compare.png): val_bpb against step for every run with the published curve,
the deltas to it, and TTT's running val_bpb against chunk when the logs have TTT. Without matplotlib
the table still prints, with one line saying why there is no picture. Bad input: one line, exit 2.
"""
from __future__ import annotations

import math
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402  (its Hyperparameters: is a run of ours the published configuration?)

# The published run's val_bpb (float weights, standard eval) at steps 0, 500, ..., 25,000: the reference curve.
REF_VAL_BPB = tuple(map(float, """4.1043 1.3944 1.3250 1.2972 1.2655 1.2533 1.2456 1.2426 1.2393 1.2352 1.2305 1.2291
1.2295 1.2248 1.2256 1.2243 1.2210 1.2218 1.2200 1.2205 1.2176 1.2187 1.2163 1.2155 1.2175
1.2134 1.2096 1.2078 1.2054 1.2047 1.1990 1.1971 1.1951 1.1939 1.1890 1.1853 1.1826 1.1812
1.1771 1.1744 1.1689 1.1644 1.1615 1.1559 1.1507 1.1453 1.1387 1.1321 1.1243 1.1156 1.1088""".split()))
REF_EVERY = 500  # steps between the values of REF_VAL_BPB
REF_STEPS = REF_EVERY * (len(REF_VAL_BPB) - 1)  # 25,000
# Other published figures (read off the published run's log): final line, bytes, training and evaluation time.
REF_FINAL = {"pre_ttt": None, "final": 1.09440207, "bytes_total": 14_496_936, "train_s": 12_509.3, "eval_s": 2_074.0}
REF_TTT = Path(__file__).with_name("pr644_ttt_curve.tsv")  # chunk, chunks_total, running_val_bpb, elapsed_s
NOISE = 0.001  # seed-to-seed spread of the published recipe's val_bpb
PICTURES = (".png", ".pdf", ".svg", ".jpg")  # what --out may name (matplotlib's formats)


def ref_val_bpb(step: int) -> float | None:
    """The published val_bpb at `step`, if its log has one (every 500 steps)."""
    return REF_VAL_BPB[step // REF_EVERY] if step % REF_EVERY == 0 and 0 <= step <= REF_STEPS else None


def published_config(hp: "tg.Hyperparameters") -> bool:
    """Model, batch, ITERATIONS, WARMDOWN_ITERS as published, full validation, no cap (any GPU count, LR shape)."""
    ref, same = tg.Hyperparameters(), ("train_batch_tokens", "iterations", "warmdown_iters", "max_wallclock_seconds",
                                       "val_max_tokens")
    return hp.model_signature() == ref.model_signature() and all(getattr(hp, k) == getattr(ref, k) for k in same)


def logged_config_is_published(config: dict[str, str]) -> bool:
    """A log's `config:KNOB=value` lines (all of them, as train_gpt.py prints them) name the published config."""
    if set(config) != {f.name.upper() for f in tg.dataclasses.fields(tg.Hyperparameters)}:
        return False  # another version's knobs, or not the whole header
    try:
        return published_config(tg.Hyperparameters.from_env({**config, "EVAL_ONLY": "0"}))
    except tg.UserError:
        return False
SUMMARY = (("pre_ttt", "pre-TTT", "bpb"), ("final", "final", "bpb"), ("bytes_total", "bytes", "bytes"),
           ("train_s", "train_s", "s"), ("eval_s", "eval_s", "s"))  # key, row label, format

NUM = r"(\d+(?:\.\d+)?|nan|inf)"  # as our logs and the published script's print them
VAL = re.compile(rf"^step:(\d+)/(\d+) val_loss:\S+ val_bpb:{NUM}")
STEP_TIME = re.compile(r"^step:\d+/\d+ .*\btrain_time:(\d+)ms")
TTT = (re.compile(rf"^ttt_chunk:(\d+)/(\d+) running_val_bpb:{NUM}"),  # ours
       re.compile(rf"^\s*ttt_chunk \[(\d+)/(\d+)\] bpb={NUM} time={NUM}s"))  # the published script's
PRE_TTT = re.compile(rf"^(?:pre_ttt_eval|final_int6_roundtrip_exact) .*\bval_bpb:{NUM}")
FINAL = re.compile(rf"^\S+_exact .*\bval_bpb:{NUM}")  # the last *_exact line is the submission's score
BYTES = re.compile(r"^bytes_model:\d+ bytes_code:\d+ bytes_total:(\d+)|^Total submission size[^:]*: (\d+) bytes")
OUR_EVAL = re.compile(r"^final_int6_zstd-22_roundtrip .*\beval:(\d+)ms")  # pre-TTT + final evaluation
THEIR_EVAL = re.compile(r"^(final_|legal_ttt)\S* .*\beval_time:(\d+)ms")


class CompareError(Exception):
    """Bad input: reported as one line, exit 2."""


@dataclass
class Run:
    log: Path
    name: str
    ours: bool = False
    iterations: int = 0
    seed: str = ""
    val: dict[int, float] = field(default_factory=dict)
    ttt: list[tuple[int, int, float]] = field(default_factory=list)  # (chunk, chunks, running val_bpb)
    comparable: bool = False
    summary: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(REF_FINAL))


def find_log(arg: str) -> Path:
    p = Path(arg)
    if p.is_dir():
        logs = [p / "train.log"] if (p / "train.log").is_file() else sorted(p.glob("*.log"))
        if len(logs) != 1:
            held = f" (it holds {', '.join(l.name for l in logs)}: name one)" if logs else ""
            raise CompareError(f"run folder {p} has no train.log{held}")
        return logs[0]
    if not p.is_file():
        raise CompareError(f"no such run folder or log: {p}")
    return p


def parse_log(log: Path) -> Run:
    """Every number the table and the picture need, from one log of ours or of the published script."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise CompareError(f"cannot read {log}: {e.strerror}") from None
    run = Run(log, log.parent.resolve().name if log.name == "train.log" else log.stem)
    their_eval_ms, ttt_s, ref_marked, config = [], 0.0, False, {}
    for line in lines:
        run.ours |= line.startswith("config:")
        if line.startswith("config:") and "=" in line:
            config.__setitem__(*line[len("config:"):].split("=", 1))
        if line.startswith("config:SEED="):
            run.seed = line.split("=", 1)[1]
        if m := VAL.match(line):
            run.val[int(m[1])], run.iterations = float(m[3]), int(m[2])
            ref_marked |= " ref_val_bpb:" in line  # how logs of earlier versions marked a published run
        if m := STEP_TIME.match(line):
            run.summary["train_s"] = int(m[1]) / 1000
        if (m := TTT[0].match(line) or TTT[1].match(line)) and int(m[2]) > 0:
            run.ttt.append((int(m[1]), int(m[2]), float(m[3])))
            ttt_s = float(m[4]) if m.re is TTT[1] else ttt_s
        for key, pattern in (("pre_ttt", PRE_TTT), ("final", FINAL), ("bytes_total", BYTES)):
            if (m := pattern.match(line)) and (key != "pre_ttt" or run.summary[key] is None):
                run.summary[key] = float(next(g for g in m.groups() if g is not None))
        if m := OUR_EVAL.match(line):
            run.summary["eval_s"] = int(m[1]) / 1000
        if m := THEIR_EVAL.match(line):
            their_eval_ms.append((m[1] == "legal_ttt", int(m[2])))
    if not run.val:
        raise CompareError(f"{log} has no validation lines (step:S/T val_loss:... val_bpb:...)")
    if not run.ours and (their_eval_ms or ttt_s):  # TTT timed on its chunk lines when no legal_ttt line says it
        timed_ttt = any(is_ttt for is_ttt, _ in their_eval_ms)
        run.summary["eval_s"] = sum(ms for _, ms in their_eval_ms) / 1000 + (0.0 if timed_ttt else ttt_s)
    run.comparable = ref_marked or logged_config_is_published(config) if run.ours else run.iterations == REF_STEPS
    return run


def letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"R{i + 1}"


def fmt(value, kind: str = "bpb", signed: bool = False) -> str:
    if value is None:
        return "-"
    sign = "+" if signed else ""
    return {"bpb": f"{value:{sign}.4f}", "bytes": f"{value:{sign}.0f}", "s": f"{value:{sign}.1f}"}[kind]


def table(runs: list[Run]) -> str:
    """Lines naming the runs, then one row per validated step and one per summary figure."""
    any_ref = any(r.comparable for r in runs)
    out = [f"{letter(i)}: {r.log}  ({'ours' if r.ours else 'published format'}, {r.iterations} steps"
           + (f", seed {r.seed}" if r.seed else "") + (", compared with ref" if r.comparable else "") + ")"
           for i, r in enumerate(runs)]
    out.append("ref: the published run (PR #644: 25,000 steps on 4xA100, final val_bpb 1.0944)" if any_ref else
               "ref: none - no run here has the published configuration, so deltas are to run A")
    deltas = [(i, "ref" if r.comparable else letter(0)) for i, r in enumerate(runs) if r.comparable or i > 0]
    head = ["step"] + [letter(i) for i in range(len(runs))] + (["ref"] if any_ref else [])
    head += [f"{letter(i)}-{base}" for i, base in deltas]

    def row(label: str, values: list, ref, kind: str) -> list[str]:
        base = {"ref": ref, letter(0): values[0]}
        cells = [label] + [fmt(v, kind) for v in values] + ([fmt(ref, kind)] if any_ref else [])
        for i, b in deltas:
            both = values[i] is not None and base[b] is not None
            cells.append(fmt(values[i] - base[b], kind, signed=True) if both else "-")
        return cells

    rows = [row(str(step), [r.val.get(step) for r in runs], ref_val_bpb(step), "bpb")
            for step in sorted({s for r in runs for s in r.val})]
    summary = [row(label, [r.summary[key] for r in runs], REF_FINAL[key], kind) for key, label, kind in SUMMARY]
    widths = [max(len(x[c]) for x in [head] + rows + summary) for c in range(len(head))]
    line = lambda cells: "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(cells, widths)))
    out += [line(head)] + [line(r) for r in rows] + ["-" * len(line(head))] + [line(r) for r in summary]
    out.append(f"delta = run minus {'ref (or run A)' if any_ref else 'run A'}: + is worse; "
               f"seed-to-seed noise of the published recipe is about +-{NOISE} val_bpb (small runs vary more)")
    return "\n".join(out)


def reference_ttt() -> list[tuple[int, int, float]]:
    rows = [l.split("\t") for l in REF_TTT.read_text().splitlines()[1:]]
    return [(int(c), int(n), float(b)) for c, n, b, _ in rows]


def plot(runs: list[Run], out: Path) -> str:
    """The picture; returns the line to print (where it went, or why there is none)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"compare: no picture: matplotlib is not installed ({e}); ./run.sh compare installs it"
    panels = ["val"] + ["delta"] * any(r.comparable for r in runs) + ["ttt"] * any(r.ttt for r in runs)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), dpi=80, squeeze=False)
    ax = dict(zip(panels, axes[0]))
    ref = dict(color="k", ls="--", lw=1.2)
    ax["val"].plot([i * REF_EVERY / REF_STEPS for i in range(len(REF_VAL_BPB))], REF_VAL_BPB, **ref,
                   label="published (25,000 steps)")
    for i, r in enumerate(runs):
        steps, style = sorted(r.val), dict(color=f"C{i}", marker="o", ms=3, lw=1.4)
        name = f"{letter(i)} {r.name}"
        ax["val"].plot([s / max(r.iterations, 1) for s in steps], [r.val[s] for s in steps], **style,
                       label=f"{name} ({r.iterations} steps)")
        if r.comparable:
            pts = [(s, r.val[s] - ref_val_bpb(s)) for s in steps if ref_val_bpb(s) is not None]
            ax["delta"].plot([s for s, _ in pts], [d for _, d in pts], **style, label=name)
        if r.ttt:
            ax["ttt"].plot([c / n for c, n, _ in r.ttt], [b for *_, b in r.ttt], color=f"C{i}", lw=1.4, label=name)
    ours = [(s, v) for r in runs for s, v in r.val.items() if math.isfinite(v)]  # a diverged run logs nan or inf
    later = [v for s, v in ours if s > 0] + list(REF_VAL_BPB[1:])
    low, high = min(later + [v for _, v in ours]), max(later)
    ax["val"].set_ylim(low - 0.03 * (high - low), high + 0.05 * (high - low))
    clipped = max(v for _, v in ours + [(0, REF_VAL_BPB[0])]) > high
    ax["val"].set(xlabel="step / ITERATIONS (top: step of a 25,000-step run)", ylabel="val_bpb",
                  title="val_bpb during training" + (" (step 0 above the frame)" if clipped else ""))
    ax["val"].secondary_xaxis("top", functions=(lambda x: x * REF_STEPS, lambda s: s / REF_STEPS))
    if "delta" in ax:
        ax["delta"].axhspan(-NOISE, NOISE, color="0.88", label=f"seed noise +-{NOISE}")
        ax["delta"].axhline(0, color="k", lw=0.8)
        ax["delta"].set(xlabel="step", ylabel="val_bpb - published", title="delta to the published curve")
    if "ttt" in ax:
        pub = reference_ttt()
        ax["ttt"].plot([c / n for c, n, _ in pub], [b for *_, b in pub], **ref, label="published (1,893 chunks)")
        ax["ttt"].set(xlabel="chunk / chunks", ylabel="running val_bpb", title="score-first TTT: running val_bpb")
    for a in ax.values():
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    try:
        fig.savefig(out)
    except OSError as e:
        raise CompareError(f"cannot write the picture {out}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return f"compare: picture {out}"


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    out, args = Path("compare.png"), list(argv)
    try:
        if "--out" in args:
            i = args.index("--out")
            if i + 1 >= len(args):
                raise CompareError("--out needs a file name, e.g. --out compare.png")
            out = Path(args.pop(i + 1))
            args.pop(i)
            if not out.parent.is_dir():
                raise CompareError(f"--out {out}: folder {out.parent} does not exist")
            if out.is_dir() or out.suffix.lower() not in PICTURES:
                raise CompareError(f"--out {out}: name a picture file ending in {', '.join(PICTURES)}, e.g. "
                                   f"--out {out / 'compare.png' if out.is_dir() else out.with_suffix('.png')}")
        if not args or any(a.startswith("-") for a in args):
            raise CompareError("usage: ./run.sh compare RUN [RUN ...] [--out compare.png] (RUN: a run folder or a log)")
        runs = [parse_log(find_log(a)) for a in args]
        print(table(runs), flush=True)
        print(plot(runs, out))
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `compare ... | head` ends quietly
    sys.exit(main(sys.argv[1:]))
