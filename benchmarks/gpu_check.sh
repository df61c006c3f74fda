#!/bin/sh
# minitp on a GPU machine, in one go (make gpu-check):
#   1. the test suite with the CuPy backend: serially, then 2 and 4 ranks sharing the GPU(s)
#      (rank r takes GPU r % count, so ranks share one GPU when there is only one);
#   2. every tutorial and train_gpt's --check on three meshes, with MINITP_DEVICE=gpu and 4 ranks sharing it;
#   3. the GPT block benchmark in CuPy float32: forward+backward time and achieved FLOP/s against the
#      GPU's FP32 peak and its measured big-GEMM rate, at the CPU bench's size and at a GPU-sized one,
#      plus strong scaling with t ranks sharing the GPU;
#   4. all-reduce bandwidth of CuPy buffers staged through the host (the default), then passed straight
#      to MPI (MINITP_CUDA_AWARE_MPI=1) -- which only works if the MPI was built with CUDA support; the
#      PyPI MPICH is not, so that step is expected to fail there, and says so.
# Needs CuPy: the one installed, else pip install cupy-cuda12x (the [gpu] extra); make gpu-check WHEELS=DIR
# on a machine without network (benchmarks/gpu_venv.sh). Writes benchmarks/results/gpu/*.md and a
# log of everything to benchmarks/results/gpu/gpu_check.log. Exits non-zero if a required step fails.
#
# Usage: benchmarks/gpu_check.sh        (PYTHON, OUT and QUICK=1 -- step 0 only -- may be set; defaults: the venv's. The launcher is
# minitp.launcher's, as everywhere: $MPIEXEC, else the venv's, else PATH's; then $MPIEXEC_FLAGS)
set -u
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/gpu}
export PYTHON OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
status=0

step() {  # step NAME REQUIRED COMMAND...: run, log, remember a failure of a required step
  name=$1; required=$2; shift 2
  echo "== $name: $*" | tee -a "$LOG"
  "$@" >> "$LOG" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then echo "   ok" | tee -a "$LOG"
  elif [ "$required" = yes ]; then echo "   FAILED (exit $rc): see $LOG" | tee -a "$LOG"; status=1
  else echo "   failed (exit $rc), as expected without a CUDA-aware MPI: see $LOG" | tee -a "$LOG"
  fi
}

if ! "$PYTHON" -c "from minitp import backend; r = backend.gpu_unavailable_reason(); print(r or 'GPU ok'); raise SystemExit(1 if r else 0)" | tee -a "$LOG"; then
  echo "no usable GPU: nothing to check" | tee -a "$LOG"
  exit 1
fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"

# 0. the quick step (issue 23), first, so that a short lease gets it: the fused kernels against their numpy
# definitions (float32, float64), then the block at the issue's three shapes against PyTorch on CUDA (TF32
# off) idiomatic (F.linear, SDPA) and as minitp writes it, and blockwise vs dense attention vs SDPA.
# QUICK=1 stops after it (a few minutes).
step "fused kernels against their definitions" yes "$PYTHON" -m pytest -q tests/test_kernels.py tests/test_blockwise_attention.py
step "block at three shapes vs PyTorch on CUDA" yes "$PYTHON" benchmarks/speed_shapes.py --device gpu --repeats 5 --out "$OUT"
step "blockwise vs dense attention vs SDPA" yes "$PYTHON" benchmarks/attention.py --device gpu --no-bytes --out "$OUT"
if [ "${QUICK:-0}" = 1 ]; then
  echo "QUICK=1: reports $OUT/speed_shapes.md, $OUT/attention.md; log: $LOG" | tee -a "$LOG"
  exit $status
fi

# 1. the tests on the GPU: the device fixture runs every device-parametrized test on CuPy too (with a GPU
# conftest.py uses real CuPy, not the stand-in). MINITP_DEVICE=gpu is not set: the tests that build
# numpy inputs would then meet CuPy weights and be refused by minitp's own device check.
step "tests, serial, CuPy" yes "$PYTHON" -m pytest -q -m "parallel[1]"
step "tests, 2 and 4 ranks sharing the GPU" yes tests/run-mpi 2 4

# 2. the tutorials as a learner runs them, every array on the GPU (4 ranks sharing it), and train_gpt's
# proof on three meshes: each ends in its own check against the serial result
launcher=$("$PYTHON" -m minitp.launcher 4)
for tutorial in tutorials/*.py; do
  case $tutorial in
    */train_gpt.py | */train_gpt_options.py) continue ;;
    */pipeline.py) args="--picture ${TMPDIR:-/tmp}/pipeline_schedules.png" ;;
    *) args="" ;;
  esac
  step "tutorial $tutorial on CuPy, 4 ranks" yes env MINITP_DEVICE=gpu $launcher "$PYTHON" "$tutorial" $args
done
for mesh in "--tp 2 --dp 2" "--pp 2 --tp 2 --microbatches 2" "--cp 2 --tp 2" "--tp 2 --dp 2 --dtype fp16" \
            "--pp 2 --dp 2 --microbatches 2 --dtype fp16" "--dp 4 --zero 3 --dtype fp16"; do
  step "train_gpt --check $mesh on CuPy" yes env MINITP_DEVICE=gpu $launcher "$PYTHON" tutorials/train_gpt.py $mesh --check
done

# 3. the block: the CPU bench's size, then one large enough to fill a GPU; scaling with ranks sharing it
step "block at the CPU size, scaling t=1,2,4, staged all-reduce" yes \
  "$PYTHON" benchmarks/speed.py --device gpu --no-torch --gemm-size 8192 --repeats 10 \
  --tp 1 2 4 --bandwidth-ranks 2 4 --out "$OUT/cpu-size"
step "block at s=2048, b=8, h=2048, a=16" yes \
  "$PYTHON" benchmarks/speed.py --device gpu --no-torch --gemm-size 8192 --repeats 10 \
  --block 2048 8 2048 16 --tp --bandwidth-ranks --out "$OUT/large"

# 3b. mixed precision: float32 and fp16 (tensor cores) steps and bytes per rank, the step's TFLOP/s against the
# measured fp16 GEMM rate (bf16 is skipped: CuPy has no bfloat16)
step "mixed precision: float32 vs fp16" yes env MINITP_DEVICE=gpu "$PYTHON" benchmarks/precision.py --out "$OUT"

# 4. CUDA-aware MPI: device buffers straight to MPI (may crash a non-CUDA MPI: not required)
step "CUDA-aware all-reduce" no env MINITP_CUDA_AWARE_MPI=1 \
  "$PYTHON" benchmarks/speed.py --device gpu --no-torch --gemm-size 1024 --repeats 3 \
  --block 256 4 512 8 --tp --bandwidth-ranks 2 --out "$OUT/cuda-aware"

echo "reports: $OUT/cpu-size/speed.md, $OUT/large/speed.md, $OUT/cuda-aware/speed.md; log: $LOG" | tee -a "$LOG"
exit $status
