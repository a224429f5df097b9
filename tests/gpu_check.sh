#!/usr/bin/env bash
# The GPU checks of one device session, in one go (~8 min on one H100; every step has its own time limit, 560 s
# in all, so a slow or failing step still leaves the others' results). What each number is compared against:
#   1. train: the real pipeline on the seed architecture, compiled, bf16: 100 steps, artifact, TTT.
#      Its `compile: graphs:N graph_breaks:0` line: the model takes 4 graphs (training step,
#      scoring from position 0, sliding scoring, TTT step) plus a few for Newton-Schulz (matrix shapes).
#   2. eval_only: EVAL_ONLY of that artifact: the same final line as 1, and `compile: graphs:3 graph_breaks:0`.
#   3. eval_only_short: EVAL_ONLY on 20,481 validation tokens (one TTT chunk; the generated corpus has ~62 k, so
#      2 chunks, FineWeb 1,893): again `graphs:3` (a graph
#      per chunk or per length would grow here; the CPU suite checks the same with tests/test_gpu_path.py).
#   4. bench_train: throughput and peak memory at the seed config (tests/bench.py train), bf16. The seed: 500 ms
#      per 786,432-token step on 4xA100-40GB = 393 k tokens/s per A100; 21,231 MiB peak per GPU at 48 sequences
#      per micro-batch.
#   5. bench_train_fp32: the same with AUTOCAST=off (float32 with TF32 matmuls): must run; step time and peak
#      memory against 4.
#   6. bench_ttt: TTT at the seed config (a 32,768-token chunk is 16 sequences, so each TTT step is 16 x 2048)
#      on a few chunks, ours vs straightforward, extrapolated to the full split, with its peak memory
#      (`peak_mem_mib`). Compare `full_split_s_this_device` / 8 with #549's 408 s for a 3-epoch TTT on 8xH100
#      (this step runs 3 epochs for that; the seed's 10 epochs took 2,074 s of evaluation on 4xA100).
#   7. rope_probe: which RoPE table the published compiled run used (issue 13; tests/gpu_rope_probe.py).
# Data: DATA_PATH/TOKENIZER_PATH if set, else FineWeb where `./run.sh data` puts it, else the test suite's generated
# corpus (tests/corpus.py, built once into tests/.cache). A missing zstandard is installed from device/*.whl. To
# prepare a lent device (no internet there), in the repo:
#   mkdir -p device && python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d device zstandard
# then run `tests/gpu_check.sh` there with device/ carried (it is git-ignored). Any knob can be overridden through the
# environment (e.g. tiny knobs to try this script on a CPU, with COMPILE=1 AUTOCAST=bf16 for the GPU's path and
# TORCH_COMPILE_OVERRIDE_BACKENDS='>=0:aot_eager' to skip inductor's C++ builds: then 2-3 min on 2 cores).
# Output: stdout and $OUT/gpu_check.log (after step 3: each run's device/autocast line, graph count, final line).
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
corpus='import sys; sys.path.insert(0, "tests"); import corpus; print(corpus.cached())'  # built once, in tests/.cache
DATA_PATH=${DATA_PATH:-$(python3 -c "$corpus" | tail -1)}
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
eval_knobs=("${run_knobs[@]}" EVAL_ONLY=1 ARTIFACT="$OUT/runs/gpu_check/final_model.int6.ptz")
step train 200 env "${run_knobs[@]}" RUN_ID=gpu_check python3 train_gpt.py
step eval_only 55 env "${eval_knobs[@]}" RUN_ID=gpu_check_eval python3 train_gpt.py
step eval_only_short 40 env "${eval_knobs[@]}" RUN_ID=gpu_check_short VAL_MAX_TOKENS="${SHORT_VAL_TOKENS:-20481}" \
  python3 train_gpt.py
grep -H "^device:\|^compile:\|^final_int6_zstd-22_roundtrip_exact" "$OUT"/runs/gpu_check*/train.log | tee -a "$OUT/gpu_check.log"
bench_knobs=(PRIME_STEPS="${PRIME_STEPS:-3}" BENCH_STEPS="${BENCH_STEPS:-10}")
step bench_train 55 env "${bench_knobs[@]}" python3 tests/bench.py train
step bench_train_fp32 75 env "${bench_knobs[@]}" AUTOCAST=off python3 tests/bench.py train
step bench_ttt 85 env BENCH_SEED_CONFIG=1 TTT_EPOCHS="${BENCH_TTT_EPOCHS:-3}" VAL_MAX_TOKENS="${BENCH_VAL_TOKENS:-131073}" \
  python3 tests/bench.py ttt
step rope_probe 50 python3 tests/gpu_rope_probe.py  # issue 13: which RoPE table the compiled seed run used
