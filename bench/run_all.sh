#!/usr/bin/env bash
# Regenerate every number and plot of docs/performance.md (about 20-25 minutes on 2 cores):
#
#     bash bench/run_all.sh            # all benchmarks, then the report
#     bash bench/run_all.sh report     # only the tables and plots, from the committed JSON
#
# One thread per rank; results in bench/results/*.json; tables and perf_*.png via bench/report.py.
# The GPU script (bench/gpu_blocks.py) needs a GPU and is run on its own: python -m bench.gpu_blocks
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
export OMP_NUM_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
R=bench/results

run() {  # run <nproc> <module> <args...>
  local n=$1; shift
  echo "== torchrun --nproc-per-node $n -m $*"
  "$TORCHRUN" --standalone --nproc-per-node "$n" -m "$@"
}

if [[ "${1:-all}" != report ]]; then
  # 1. cost of CP: every registered strategy at 8K; the ring at 16K (the target case)
  for P in 2 4; do
    run $P bench.cost --seq 8192 --causal both --repeats 3 --out $R/cost_p$P.json
  done
  run 4 bench.cost --seq 16384 --causal both --strategies ring --repeats 3 --repeats-at 16384:3 --out $R/cost_ring16k_p4.json
  run 2 bench.cost --seq 16384 --causal causal --strategies ring --repeats 3 --out $R/cost_ring16k_p2.json
  # 2. load balance, zigzag vs contiguous
  for P in 2 4 8; do
    run $P bench.balance --seq 8192 --repeats 3 --out $R/balance_p$P.json
  done
  # 3. peers: PyTorch's built-in CP (fwd+bwd), per-rank memory at 32K, yunchang (fwd)
  for P in 2 4; do
    run $P bench.peers --suite torch --seq 8192 16384 --repeats 3 --repeats-at 16384:2 --out $R/peers_torch_p$P.json
    run $P bench.peers --suite yunchang --seq 8192 16384 --repeats 3 --out $R/peers_yunchang_p$P.json
  done
  MALLOC_MMAP_THRESHOLD_=131072 run 4 bench.peers --suite memory --seq 32768 --repeats 2 --out $R/peers_memory_p4.json
  # 4. sequence-length scaling at P = 4 (time and per-rank peak memory)
  MALLOC_MMAP_THRESHOLD_=131072 run 4 bench.scaling --seq 8192 16384 32768 65536 --out $R/scaling_p4.json
  # where the ring's time goes (P = 2: as many ranks as cores, so profiler times are work)
  run 2 bench.profile_ring --seq 16384 --out $R/profile_ring_p2.json
  run 4 bench.profile_ring --seq 16384 --out $R/profile_ring_p4.json
fi
"$PY" -m bench.report
