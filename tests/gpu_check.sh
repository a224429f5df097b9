#!/usr/bin/env bash
# The GPU checks of one device session, in one go (~8 min on one H100; every step has its own time limit,
# so a slow or failing step still leaves the others' results):
#   1. the real pipeline on the seed architecture, compiled: 100 steps, artifact, TTT
#   2. EVAL_ONLY of that artifact: must print the same final line
#   3. training throughput and peak memory at the seed config   (tests/bench.py train)
#   4. TTT at the seed config on 4 chunks, ours vs straightforward, extrapolated to the full split
# Data: DATA_PATH/TOKENIZER_PATH if set, else FineWeb where `./run.sh data` puts it, else the test suite's generated
# corpus (tests/corpus.py, built once into tests/.cache). A missing zstandard is installed from device/*.whl. To
# prepare a lent device (no internet there), in the repo:
#   mkdir -p device && python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d device zstandard
# then run `tests/gpu_check.sh` there with device/ carried (it is git-ignored). Any knob can be overridden through the
# environment (e.g. tiny knobs to try this script on a CPU). Output: stdout and $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if ! python3 -c "import zstandard" 2>/dev/null && ls device/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site device/*.whl && export PYTHONPATH=/tmp/site
fi
if [ -z "${DATA_PATH:-}" ] && [ -f data/datasets/fineweb10B_sp1024/fineweb_val_000000.bin ]; then
  DATA_PATH=data/datasets/fineweb10B_sp1024 TOKENIZER_PATH=${TOKENIZER_PATH:-data/tokenizers/fineweb_1024_bpe.model}
fi
DATA_PATH=${DATA_PATH:-$(python3 -c "import sys; sys.path.insert(0, 'tests'); import corpus; print(corpus.cached())" | tail -1)}
export PYTHONUNBUFFERED=1 DATA_PATH TOKENIZER_PATH=${TOKENIZER_PATH:-$DATA_PATH/tokenizer.model}
step() {  # step NAME SECONDS command...: run it under a time limit, log everything, report its exit status
  local name=$1 secs=$2
  shift 2
  echo "gpu_check:$name start:$(date +%T)" | tee -a "$OUT/gpu_check.log"
  timeout "$secs" "$@" 2>&1 | tee -a "$OUT/gpu_check.log"
  echo "gpu_check:$name rc:${PIPESTATUS[0]} end:$(date +%T)" | tee -a "$OUT/gpu_check.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/gpu_check.log"
run_knobs=(RUNS_DIR="$OUT/runs" ITERATIONS="${ITERATIONS:-100}" WARMDOWN_ITERS="${WARMDOWN_ITERS:-30}"
           VAL_LOSS_EVERY="${VAL_LOSS_EVERY:-50}" TRAIN_BATCH_TOKENS="${TRAIN_BATCH_TOKENS:-196608}")
step train 200 env "${run_knobs[@]}" RUN_ID=gpu_check python3 train_gpt.py
step eval_only 100 env "${run_knobs[@]}" RUN_ID=gpu_check_eval EVAL_ONLY=1 \
  ARTIFACT="$OUT/runs/gpu_check/final_model.int6.ptz" python3 train_gpt.py
grep -h "^final_int6_zstd-22_roundtrip_exact" "$OUT"/runs/gpu_check*/train.log | uniq -c | tee -a "$OUT/gpu_check.log"
step bench_train 120 env BENCH_STEPS="${BENCH_STEPS:-10}" python3 tests/bench.py train
step bench_ttt 150 env BENCH_SEED_CONFIG=1 VAL_MAX_TOKENS="${BENCH_VAL_TOKENS:-131073}" python3 tests/bench.py ttt
step rope_probe 120 python3 tests/gpu_rope_probe.py  # issue 13: which RoPE table the compiled seed run used
