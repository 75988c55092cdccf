#!/usr/bin/env bash
# Everything this project checks and measures on ONE GPU, in one go (about 4 minutes on an H100 / H200):
#
#   bash bench/gpu_run.sh [OUT_DIR]          # default OUT_DIR: bench/results/gpu
#
# 1. tests/test_kernels.py: the CUDA kernel paths (flash fp16/bf16, efficient fp32 and head_dim > 256,
#    the explicit path for fp64 and masked tiles) against fp64 full attention.
# 2. bench.gpu_check: every strategy through the production path on one NCCL rank, fp32/bf16/fp16,
#    causal, full, packed documents and a window, forward and backward, against fp64.
# 3. The training job on the GPU (bf16 autocast): the default recall task, and --packed 4 --seq-len 1024.
# 4. bench.gpu_blocks: every virtual rank's block kernels and merges vs one flash call (32K-128K, P 4 and 8).
# 5. bench.memory_measure: estimated vs measured peak memory (torch.cuda.max_memory_allocated), bf16.
#
# All output goes to OUT_DIR/gpu_run.log; each step's JSON to OUT_DIR. Exit status 1 if any step failed.
# STEPS="kernels gpu_check" bash bench/gpu_run.sh runs only the steps named.
set -u -o pipefail
OUT_DIR=${1:-bench/results/gpu}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu_run.log
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
status=0
step() {
    local name=$1 limit=$2
    shift 2
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
    echo "=== $name: $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
    [ "$rc" = 0 ] || status=1
}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } 2>&1 | tee -a "$LOG"
step kernels 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py
step gpu_check 240 torchrun --standalone --nproc-per-node 1 -m bench.gpu_check
step train 240 torchrun --standalone --nproc-per-node 1 -m cp_dtensor.training --cp 1 --dtype bfloat16 \
    --log-every 100 --out "$OUT_DIR/train_bf16.json"
step train_packed 240 torchrun --standalone --nproc-per-node 1 -m cp_dtensor.training --cp 1 --dtype bfloat16 \
    --packed 4 --seq-len 1024 --log-every 100 --out "$OUT_DIR/train_packed_bf16.json"
step gpu_blocks 300 python3 -m bench.gpu_blocks --out "$OUT_DIR/gpu_blocks.json"
step memory 300 python3 -m bench.memory_measure --sweep --seq-lens 16384 65536 131072 --cp-sizes 1 \
    --dtype bf16 --out "$OUT_DIR/memory_gpu.json"
echo "gpu_run: status $status" | tee -a "$LOG"
exit $status
