#!/usr/bin/env bash
# The GPU check of one device session: <= 8 minutes on one H100/H200, every compilation included, then ONE summary
# table (tests/gpu_check_table.py; also $OUT/gpu_check_table.md). Compiling the 27 M model takes 60-75 s per process
# there, so each step's limit is that plus its work; the steps run most important first, and the whole script stops
# starting steps once GPU_CHECK_BUDGET_S (460 s, setup included) is spent. A step that fails or runs out of time
# leaves the others' results and its own rows say so. Steps, limits (LIMIT_<STEP>=seconds overrides one):
#   1. bench_train (110 s): tests/bench.py train --profile --memory at the seed config, compiled, bf16: first each
#      attention kernel alone at the run's shapes (seconds, before compiling), then compile + priming time, steady
#      step ms, tokens/s, peak memory, the 20 most expensive CUDA kernels of one step, what an eager forward of 2
#      sequences keeps for the backward (by dtype), then what is held between steps and which lines hold one step's
#      peak (one more step, allocator history on).
#   2. bench_peer (100 s): the published script (PEER_SCRIPT=path; without it the rows say "not run") on the same
#      data and batch: its compile + warm-up, step ms, tokens/s, peak memory, then its TTT seconds per chunk.
#   3. bench_ttt (90 s): TTT at the seed config, 10 epochs, 32,768-token chunks: steady seconds per chunk, ours
#      (compiled) and the straightforward reference (eager, CUDA), both scores, the full split for 1 and 8 GPUs.
#   4. pipeline (100 s): train_gpt.py end to end: a short training run -> artifact -> TTT evaluation; its graph
#      count and graph breaks (by regions: the training step, scoring from 0, sliding scoring, the TTT step).
#   5. eval_only (50 s): EVAL_ONLY of that artifact: the same final line, and whether it found the compiled code of
#      step 4 in the compile cache ($OUT/compile_cache, shared by every step).
#   6. bench_train_graph (100 s, with what is left): step 1's bench compiled as one graph (COMPILE=graph, as the
#      published script compiles) instead of by regions: compile + priming, step ms, tokens/s, peak memory beside
#      step 1's. (Step 1 times each attention kernel alone, so the two kernels are compared there.)
#   7. bench_train_budget (100 s, with what is left): step 1's bench with ACTIVATION_BUDGET=0.9 (the compiled graphs
#      keep ~40% fewer activations and redo elementwise work): compile + priming, step ms, tokens/s, peak memory.
# Data: DATA_PATH/TOKENIZER_PATH if set, else FineWeb where `./run.sh data` puts it, else the test suite's generated
# corpus (tests/corpus.py, built once into tests/.cache). Our steps score at most VAL_MAX_TOKENS (65,537: two TTT
# chunks); the published script validates its whole split (fine on the corpus' 56 k tokens, minutes on FineWeb's).
# A missing zstandard is installed from device/*.whl. To prepare a lent device (no internet there), in the repo:
#   mkdir -p device && python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d device zstandard
# then run `tests/gpu_check.sh` there with device/ (and tests/.cache, to skip building the corpus) carried; both are
# git-ignored. The published script is not part of this project: copy it beside the repo and set PEER_SCRIPT.
# Any knob can be overridden through the environment (tests/test_gpu_check.py rehearses this script on the CPU with
# tiny knobs). Output: stdout, $OUT/gpu_check.log (every step's output between its start and rc lines).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-460}
LOG="$OUT/gpu_check.log"
mkdir -p "$OUT"
: > "$LOG"
if ! "$PY" -c "import zstandard" 2>/dev/null && ls device/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site device/*.whl && export PYTHONPATH=/tmp/site
fi
if [ -z "${DATA_PATH:-}" ] && [ -f data/datasets/fineweb10B_sp1024/fineweb_val_000000.bin ]; then
  DATA_PATH=data/datasets/fineweb10B_sp1024 TOKENIZER_PATH=${TOKENIZER_PATH:-data/tokenizers/fineweb_1024_bpe.model}
fi
corpus='import sys; sys.path.insert(0, "tests"); import corpus; print(corpus.cached())'  # built once, in tests/.cache
DATA_PATH=${DATA_PATH:-$("$PY" -c "$corpus" | tail -1)}
export PYTHONUNBUFFERED=1 DATA_PATH TOKENIZER_PATH=${TOKENIZER_PATH:-$DATA_PATH/tokenizer.model}
export TORCHINDUCTOR_CACHE_DIR="$PWD/$OUT/compile_cache" COMPILE_CACHE_DIR="$PWD/$OUT/compile_cache"
step() {  # step NAME LIMIT command...: run it under min(LIMIT, budget left), log everything, report its exit status
  local name=$1 limit=$2 var="LIMIT_${1^^}" left=$((BUDGET - SECONDS)) t=$SECONDS
  shift 2
  limit=${!var:-$limit}
  if ((left < 10)); then
    echo "gpu_check:$name skipped:budget_spent" | tee -a "$LOG"
    return
  fi
  ((limit > left)) && limit=$left
  echo "gpu_check:$name start:$(date +%T) limit:${limit}s" | tee -a "$LOG"
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"  # timeout signals the step's whole process group
  echo "gpu_check:$name rc:${PIPESTATUS[0]} secs:$((SECONDS - t))" | tee -a "$LOG"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
bench_knobs=(PRIME_STEPS="${PRIME_STEPS:-3}" BENCH_STEPS="${BENCH_STEPS:-10}")
step bench_train 110 env "${bench_knobs[@]}" "$PY" tests/bench.py train --profile --memory
step bench_peer 100 env "${bench_knobs[@]}" "$PY" tests/bench.py peer
step bench_ttt 90 env BENCH_SEED_CONFIG=1 TTT_EPOCHS="${BENCH_TTT_EPOCHS:-10}" \
  VAL_MAX_TOKENS="${VAL_MAX_TOKENS:-65537}" "$PY" tests/bench.py ttt
run_knobs=(RUNS_DIR="$OUT/runs" ITERATIONS="${ITERATIONS:-20}" WARMDOWN_ITERS="${WARMDOWN_ITERS:-5}"
           VAL_LOSS_EVERY="${VAL_LOSS_EVERY:-0}" TRAIN_BATCH_TOKENS="${TRAIN_BATCH_TOKENS:-196608}"
           PRIME_STEPS="${RUN_PRIME_STEPS:-3}" VAL_MAX_TOKENS="${VAL_MAX_TOKENS:-65537}")
rm -rf "$OUT/runs/gpu_check" "$OUT/runs/gpu_check_eval"
step pipeline 100 env "${run_knobs[@]}" RUN_ID=gpu_check "$PY" train_gpt.py
step eval_only 50 env "${run_knobs[@]}" RUN_ID=gpu_check_eval EVAL_ONLY=1 \
  ARTIFACT="$OUT/runs/gpu_check/final_model.int6.ptz" "$PY" train_gpt.py
step bench_train_graph 100 env "${bench_knobs[@]}" COMPILE="$([ "${COMPILE:-auto}" = 0 ] && echo 0 || echo graph)" \
  "$PY" tests/bench.py train
step bench_train_budget 100 env "${bench_knobs[@]}" ACTIVATION_BUDGET=0.9 "$PY" tests/bench.py train
"$PY" tests/gpu_check_table.py "$LOG" | tee "$OUT/gpu_check_table.md"
