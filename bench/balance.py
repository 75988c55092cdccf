"""Causal load balance of the ring: max / mean over ranks of the time inside the block kernels.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 -m bench.balance \
        --seq 8192 --out bench/results/balance_p4.json

The zigzag and contiguous layouts alternate in the same processes (A B A B) on the same global
inputs, causal, forward + backward. Each rank's figure is the thread CPU seconds spent inside
``block_forward`` / ``block_backward`` (see :mod:`bench.instrument`): the work a rank must do before
the ring can move on, independent of how the ranks share the cores. Next to it, the planned figure:
(query, key) pairs per rank from :func:`cp_dtensor.positions.blocks.plan_blocks` (1.0 is perfect balance; the
contiguous layout's is ``(2P - 1) / P``, see Note [Causal load balance]).
"""

from __future__ import annotations

import argparse

from bench.cases import Case, cp_call, time_call
from bench.harness import RESULTS, finish, gather_objects, init_rank, log, now, rank, summary, world_size, write_result

LAYOUTS = ("zigzag", "contiguous")


def planned_pairs(seq_len: int, size: int, layout: str) -> list[int]:
    """(query, key) pairs each rank computes over a whole causal ring, from the block planner."""
    from cp_dtensor.positions.blocks import block_pairs, plan_blocks
    from cp_dtensor.positions.layout import shard_runs

    runs = [shard_runs(seq_len, size, r, layout) for r in range(size)]
    return [
        sum(block_pairs(b) for step in range(size) for b in plan_blocks(runs[r], runs[(r - step) % size], True))
        for r in range(size)
    ]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[8192])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--strategy", default="ring")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    init_rank()
    started = now()
    from cp_dtensor import ContextParallelGroup, init_context_parallel_group
    from cp_dtensor.attention.api import STRATEGIES

    fn, size = STRATEGIES[args.strategy], world_size()
    base = init_context_parallel_group(cp_size=size, device_type="cpu")
    groups = {layout: ContextParallelGroup(mesh=base.mesh, layout=layout) for layout in LAYOUTS}
    cases = []
    for seq_len in args.seq:
        case = Case(seq_len, args.heads, args.head_dim, causal=True)
        log(f"balance: P={size} {case}")
        local = {layout: case.inputs(g.runs(seq_len)) for layout, g in groups.items()}
        for layout, g in groups.items():  # warm-up
            time_call(cp_call(fn, g, True), (), local[layout], backward=True)
        reps: dict[str, list] = {layout: [] for layout in LAYOUTS}
        for _ in range(args.repeats):
            for layout, g in groups.items():
                timing, _ = time_call(cp_call(fn, g, True), (), local[layout], backward=True)
                reps[layout].append(gather_objects(timing))
        entry = {"case": case.as_dict(), "layouts": {}}
        for layout in LAYOUTS:
            pairs = planned_pairs(seq_len, size, layout)
            kernel = [[r["kernel_fwd"] + r["kernel_bwd"] for r in rep] for rep in reps[layout]]
            entry["layouts"][layout] = {
                "kernel_max_over_mean": summary([max(k) / (sum(k) / len(k)) for k in kernel]),
                "cpu_max_over_mean": summary(
                    [max(c) / (sum(c) / len(c)) for c in ([r["cpu"] for r in rep] for rep in reps[layout])]
                ),
                "planned_max_over_mean": max(pairs) / (sum(pairs) / len(pairs)),
                "planned_pairs": pairs,
                "kernel_seconds_per_rank": kernel,
                "wall_max": summary([max(r["wall"] for r in rep) for rep in reps[layout]]),
            }
            log(
                f"  {layout}: kernel max/mean {entry['layouts'][layout]['kernel_max_over_mean']}"
                f" planned {entry['layouts'][layout]['planned_max_over_mean']:.3f}"
            )
        cases.append(entry)
    out = args.out or RESULTS / f"balance_p{size}.json"
    if rank() == 0:
        write_result(
            out, {"benchmark": "balance", "world_size": size, "strategy": args.strategy, "cases": cases}, started
        )


if __name__ == "__main__":
    main()
    finish()
