#!/usr/bin/env bash
# Regenerate every CPU number and plot of docs/performance.md, docs/masks.md and docs/document-balance.md (about 25 minutes; 2 cores):
#
#     bash bench/run_all.sh            # all benchmarks, then the report
#     bash bench/run_all.sh report     # only the tables and plots, from the committed JSON
#     KEEP_EXISTING=1 bash bench/run_all.sh   # skip the benchmarks whose JSON already exists
#
# with PYTHON / TORCHRUN pointing at the venv if they are not on PATH, e.g.
#     PYTHON=/work/venv/bin/python TORCHRUN=/work/venv/bin/torchrun bash bench/run_all.sh
#
# One thread per rank; results in bench/results/*.json; tables and perf_*.png via bench/report.py.
# The GPU checks and benchmarks need a GPU and run on their own: bash bench/gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
export OMP_NUM_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
R=bench/results

run() {  # run <out.json> <nproc> <module> <args...>
  local out=$1 n=$2; shift 2
  if [[ -n "${KEEP_EXISTING:-}" && -f "$out" ]]; then echo "== keep $out"; return; fi
  echo "== torchrun --nproc-per-node $n -m $* --out $out"
  "$TORCHRUN" --standalone --nproc-per-node "$n" -m "$@" --out "$out"
}

if [[ "${1:-all}" != report ]]; then
  # 1. cost of CP: every registered strategy at 8K; the ring at 16K causal (the target case)
  for P in 2 4; do
    run $R/cost_p$P.json $P bench.cost --seq 8192 --causal both --repeats 3
  done
  run $R/cost_ring16k_p4.json 4 bench.cost --seq 16384 --causal causal --strategies ring --repeats 3
  # 2. load balance, zigzag vs contiguous
  for P in 2 4 8; do
    run $R/balance_p$P.json $P bench.balance --seq 8192 --repeats 3
  done
  # 3. peers: PyTorch's built-in CP (fwd+bwd), yunchang (fwd), per-rank memory at 32K
  run $R/peers_torch_p2.json 2 bench.peers --suite torch --seq 8192 --repeats 3
  run $R/peers_torch_p4.json 4 bench.peers --suite torch --seq 8192 16384 --repeats 3 --repeats-at 16384:2
  run $R/peers_yunchang_p2.json 2 bench.peers --suite yunchang --seq 8192 --repeats 3
  run $R/peers_yunchang_p4.json 4 bench.peers --suite yunchang --seq 8192 16384 --repeats 3 --repeats-at 16384:2
  MALLOC_MMAP_THRESHOLD_=131072 run $R/peers_memory_p4.json 4 bench.peers --suite memory --seq 32768 --repeats 1
  # 4. sequence-length scaling at P = 4 (time and per-rank peak memory)
  MALLOC_MMAP_THRESHOLD_=131072 run $R/scaling_p4.json 4 bench.scaling --seq 8192 16384 32768 65536
  # where the ring's time goes (P = 2: as many ranks as cores, so profiler times are work)
  run $R/profile_ring_p2.json 2 bench.profile_ring --seq 16384
  run $R/profile_ring_p4.json 4 bench.profile_ring --seq 16384
  # masks: packed documents and a window (docs/masks.md), and the host cost of planning them
  run $R/masks_p4.json 4 bench.masks --repeats 5
  # packed documents of mixed lengths: whole-row zigzag vs DocumentZigzag (docs/document-balance.md)
  run $R/document_balance_p4.json 4 bench.document_balance --repeats 5
  if [[ -z "${KEEP_EXISTING:-}" || ! -f $R/plan_cost.json ]]; then "$PY" -m bench.plan_cost --out $R/plan_cost.json; fi
fi
"$PY" -m bench.report
