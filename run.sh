#!/usr/bin/env bash
# run.sh — one entry point for every job: ./run.sh [smoke|test|data [N]|train|eval ARTIFACT|compare RUN...|bench WHAT]
#   smoke (default)  end to end on the CPU in minutes, no download: tokenizer + shards from Python's own
#                    docstrings (tests/corpus.py; the downloaded FineWeb if present), train, artifact, TTT, final line
#   test             the test suite (what CI runs)
#   data [N]         download the sp1024 tokenizer, the validation split and N train shards (default 80)
#   train            the seed's 25k-step run on all visible GPUs (override any knob through the environment)
#   eval ARTIFACT    score an artifact without training (EVAL_ONLY)
#   compare RUN...   runs (folders or train.logs, ours or the published script's) against each other and the
#                    published run: a table and compare.png (--out FILE): tests/compare.py
#   bench WHAT       train [--profile] [--memory] (tokens/s, step ms, memory), peer, ttt, artifact: tests/bench.py
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

setup() {  # a virtualenv that reuses an already installed torch (e.g. the CUDA build on a GPU node)
  if [ ! -x "$PY" ]; then
    python3 -m venv --system-site-packages "$VENV" 2>/dev/null || {  # no ensurepip (python3-venv not installed):
      rm -rf "$VENV"                                                 # the system's pip still installs into it
      python3 -m venv --system-site-packages --without-pip "$VENV"
    }
  fi
  has torch || pip_install "${TORCH_SPEC:-torch==2.13.0}"
  has numpy sentencepiece zstandard || pip_install -r requirements.txt
  if [ "${1:-}" = test ]; then
    has pytest xdist || pip_install pytest pytest-xdist
    has huggingface_hub || pip_install huggingface_hub ||
      echo "run.sh: huggingface_hub could not be installed; the tests of './run.sh data' will be skipped" >&2
    has matplotlib || pip_install matplotlib ||
      echo "run.sh: matplotlib could not be installed; the picture tests of './run.sh compare' will be skipped" >&2
  fi
}

has() {  # the packages are installed (found, not imported: importing torch alone takes seconds, on every call)
  "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" \
    "$@" 2>/dev/null
}

pip_install() {
  if ! "$PY" -m pip --version >/dev/null 2>&1; then
    echo "run.sh: $PY has no pip to install $*: install python3-pip (or python3-venv), then rm -rf $VENV and rerun" >&2
    exit 2
  fi
  "$PY" -m pip install -q "$@"
}

gpus() { "$PY" -c "import torch; print(max(torch.cuda.device_count(), 1))"; }
# torchrun, without its own log lines and ChildFailedError traceback after a worker's error: train_gpt.py has
# printed that error once (exit 2); any other failure gets one line naming the rank and its exit code. A stop
# signal (SIGTERM to torchrun, which passes it on; or to the workers): the workers' exit status 128 + signal
# number (they have logged their stop line), torchrun's SignalException one line instead of a traceback.
# torchrun would die of a SIGUSR1 (a scheduler's early warning) and leave its workers running: it is a SIGTERM.
TORCHRUN='
import logging, os, signal, sys
from torch.distributed.run import main
signal.signal(signal.SIGUSR1, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
logging.disable(logging.ERROR)  # its loggers set their own levels (e.g. the warning on a SIGTERM)
try:
    main(sys.argv[1:])
except SignalException as e:
    print(f"torchrun: stopped by {e.sigval.name}; the workers were passed it (their lines are above)", file=sys.stderr)
    sys.exit(128 + e.sigval)
except ChildFailedError as e:
    rank, failure = e.get_first_failure()
    if failure.exitcode > 128:  # a worker stopped on a signal and said so
        sys.exit(failure.exitcode)
    if failure.exitcode != 2:
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        print(f"error: rank {rank} failed ({how}); its output is above", file=sys.stderr)
    sys.exit(2 if failure.exitcode == 2 else 1)
'
launch() {  # a plain process for one (so an error is just its one line); torchrun for several, after one process
  local n=${NPROC:-$(gpus)}  # ran every check it can make alone (config, batch split, tokenizer, shards, artifact)
  if [ "$n" -gt 1 ]; then
    DRY_RUN=1 WORLD_SIZE="$n" "$PY" train_gpt.py >/dev/null
    exec "$PY" -c "$TORCHRUN" --standalone --nproc_per_node="$n" train_gpt.py
  fi
  exec "$PY" train_gpt.py
}

no_args() {  # knobs are environment variables: an argument would be ignored, not obeyed
  [ $# -eq 0 ] || { echo "run.sh $cmd takes no arguments (got: $*); knobs are environment variables, e.g." \
    "ITERATIONS=100 ./run.sh $cmd" >&2; exit 2; }
}

cmd=${1:-smoke}
shift || true
case "$cmd" in
  test)
    setup test
    exec "$PY" -m pytest -q -n 2 --dist loadfile tests "$@"  # 2 workers, a test file each: ~3.5 min on 2 cores
    ;;
  smoke)
    no_args "$@"
    setup
    DATA=${SMOKE_DATA:-runs/smoke_data}
    if [ -f data/datasets/fineweb10B_sp1024/fineweb_val_000000.bin ] && [ -z "${SMOKE_DATA:-}" ]; then
      export DATA_PATH=data/datasets/fineweb10B_sp1024 TOKENIZER_PATH=data/tokenizers/fineweb_1024_bpe.model
      export VAL_MAX_TOKENS=${VAL_MAX_TOKENS:-65536}
    else
      "$PY" tests/corpus.py "$DATA"  # the test suite's generator; kept in $DATA, rebuilt when it changes
      export DATA_PATH="$DATA" TOKENIZER_PATH="$DATA/tokenizer.model"
    fi
    # A 4-block model of the same architecture; every stage of the real run, in about two minutes.
    export NUM_LAYERS=${NUM_LAYERS:-4} MODEL_DIM=${MODEL_DIM:-128} NUM_HEADS=${NUM_HEADS:-4} NUM_KV_HEADS=${NUM_KV_HEADS:-2}
    export MLP_HIDDEN=${MLP_HIDDEN:-384} VE_LAYERS=${VE_LAYERS:-2,3} XSA_LAYERS=${XSA_LAYERS:-2} TTT_FREEZE_BLOCKS=${TTT_FREEZE_BLOCKS:-1}
    export TRAIN_SEQ_LEN=${TRAIN_SEQ_LEN:-256} ROPE_TRAIN_SEQ_LEN=${ROPE_TRAIN_SEQ_LEN:-256}
    export TRAIN_BATCH_TOKENS=${TRAIN_BATCH_TOKENS:-8192} MICRO_BATCH_SEQS=${MICRO_BATCH_SEQS:-32}
    export ITERATIONS=${ITERATIONS:-100} WARMDOWN_ITERS=${WARMDOWN_ITERS:-40} WARMUP_STEPS=${WARMUP_STEPS:-10}
    export PRIME_STEPS=${PRIME_STEPS:-0} VAL_LOSS_EVERY=${VAL_LOSS_EVERY:-50} TRAIN_LOG_EVERY=${TRAIN_LOG_EVERY:-20}
    export EMA_DECAY=${EMA_DECAY:-0.95} VAL_MAX_TOKENS=${VAL_MAX_TOKENS:-16384} EVAL_STRIDE=${EVAL_STRIDE:-128}
    export TTT_CHUNK_TOKENS=${TTT_CHUNK_TOKENS:-2048} TTT_EPOCHS=${TTT_EPOCHS:-2} RUN_ID=${RUN_ID:-smoke_$(date +%Y%m%d_%H%M%S)}
    exec "$PY" train_gpt.py
    ;;
  data)
    [[ $# -le 1 && ${1:-80} =~ ^[0-9]+$ ]] || { echo "usage: ./run.sh data [N]  (N train shards, a whole number;" \
      "default 80, 0 = only the tokenizer and the validation shard)" >&2; exit 2; }
    setup
    has huggingface_hub || pip_install huggingface_hub
    "$PY" - "${1:-80}" <<'PYEOF'
# Resumable download of the challenge's sp1024 data into data/hf (HF_ENDPOINT is honoured), linked into
# the layout train_gpt.py reads (data/datasets/fineweb10B_sp1024, data/tokenizers); then every file is
# checked: the tokenizer loads with 1,024 pieces, every shard has the right header and exact size. A bad
# file is fetched again once; if it is still bad the run stops with one line naming it.
import os, sys, time
sys.path.insert(0, ".")
from huggingface_hub import hf_hub_download
import train_gpt as tg
n, repo, root = int(sys.argv[1]), "willdepueoai/parameter-golf", "data"
endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
shards = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(n)]
files = {"datasets/tokenizers/fineweb_1024_bpe.model": "tokenizers/fineweb_1024_bpe.model"}
files.update({f"datasets/datasets/fineweb10B_sp1024/{s}": f"datasets/fineweb10B_sp1024/{s}" for s in shards})
def fail(msg):  # one line, exit 2 like every other refusal of the project
    print(f"data: {msg}", file=sys.stderr)
    sys.exit(2)
def fetch(i, remote, force=False):
    t0 = time.time()
    try:
        path = hf_hub_download(repo, remote, repo_type="dataset", local_dir=os.path.join(root, "hf"), force_download=force)
    except Exception as e:  # network, HTTP or disk errors all end the same way: one line, resumable
        why = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]
        fail(f"could not download {remote} from {endpoint} ({type(e).__name__}: {why}); is it reachable (a mirror: "
             f"HF_ENDPOINT=...)? Files already here are kept - rerun ./run.sh data {n} to resume")
    print(f"data:[{i}/{len(files)}] {remote} {os.path.getsize(path) / 1e6:.1f}MB {time.time() - t0:.1f}s", flush=True)
    return path
def check(path):
    try:
        if path.endswith(".model"):  # the run's own check: a SentencePiece model with VOCAB_SIZE=1024 pieces
            tg.load_tokenizer(tg.Hyperparameters(tokenizer_path=path))
            return None
        return None if len(tg.open_shard(path)) > 0 else f"shard {path} holds no tokens"
    except (tg.UserError, OSError, RuntimeError) as e:
        return str(e).splitlines()[0]
total = 0
for i, (remote, local) in enumerate(files.items(), 1):
    link = os.path.join(root, local)
    if os.path.isfile(link) and not os.path.islink(link):  # a file of its own (e.g. the official helper's): keep it
        if (why := check(link)):
            fail(f"{why} - {link} was not downloaded by this script; move it away and rerun ./run.sh data {n}")
        print(f"data:[{i}/{len(files)}] {link} already here", flush=True)
    else:
        path = fetch(i, remote)
        if check(path):  # corrupt or truncated copy on disk: fetch it once more from scratch
            path = fetch(i, remote, force=True)
            if (why := check(path)):
                fail(f"{why} - the copy at {endpoint} looks bad; delete {path} and rerun ./run.sh data {n}")
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.relpath(path, os.path.dirname(link)), link)
    total += 0 if local.endswith(".model") else len(tg.open_shard(link))
print(f"data:verified tokenizer + {len(shards)} shards ({n} train), {total:,} tokens in {root}/datasets/fineweb10B_sp1024")
PYEOF
    ;;
  train)
    no_args "$@"
    setup
    launch
    ;;
  eval)
    [ $# -eq 1 ] || { echo "usage: ./run.sh eval path/to/final_model.int6.ptz  (knobs: environment variables)" >&2
      exit 2; }
    setup
    log="$(dirname "$1")/train.log"
    if [ -f "$log" ]; then  # an artifact in a run folder: that run's knobs, unless the environment sets them
      while IFS='=' read -r k v; do
        case "$k" in RUN_ID|RESUME|EVAL_ONLY|ARTIFACT|DRY_RUN|DEVICE|COMPILE) continue ;; esac
        [ -n "${!k+x}" ] || export "$k=$v"
      done < <(sed -n 's/^config:\([A-Z][A-Z0-9_]*=.*\)$/\1/p' "$log" | sed 's/=True$/=1/; s/=False$/=0/')
      echo "eval: knobs from $log (the environment overrides them)"
    fi
    export EVAL_ONLY=1 ARTIFACT="$1"
    launch
    ;;
  compare)
    setup
    has matplotlib || (pip_install --retries 1 --timeout 10 matplotlib) ||
      echo "run.sh: matplotlib could not be installed; compare prints its table without the picture" >&2
    exec "$PY" tests/compare.py "$@"
    ;;
  bench)
    setup
    exec "$PY" tests/bench.py "$@"
    ;;
  *)
    echo "run.sh: unknown mode '$cmd'" >&2
    sed -n '2,11p' "$0" >&2
    exit 2
    ;;
esac
