"""Sequence-length scaling at fixed P: time and per-rank peak memory of one causal attention layer.

    MALLOC_MMAP_THRESHOLD_=131072 OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 \
        -m bench.scaling --seq 8192 16384 32768 65536 --out bench/results/scaling_p4.json

For each length (ascending; stops at the first that fails, e.g. out of memory), every rank builds only
its shard (heads 8, head_dim 64, fp32 by default), runs the strategy's causal forward + backward and
records its wall and CPU seconds, its resident memory at the start of the call (the inputs) and the peak above
it during the call. The CPU seconds of the same layer in one process are O(L^2) and are not re-measured
here (``bench.cost`` has them side by side up to 16K); the length at which the measured per-rank
memory would fill the machine is extrapolated in ``bench.report`` from the per-token slope.

Memory per rank vs P, measured on the transformer model, is the memory harness's
(``bench.memory_measure``, results in ``bench/results/memory_cpu.json``).
"""

from __future__ import annotations

import argparse
import os

from bench.cases import Case, cp_call, time_call
from bench.harness import RESULTS, finish, gather_objects, init_rank, log, now, rank, summary, world_size, write_result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--strategy", default="ring")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    init_rank()
    started = now()
    from cp_dtensor import init_context_parallel_group
    from cp_dtensor.attention.api import STRATEGIES

    group = init_context_parallel_group(cp_size=world_size(), device_type="cpu")
    fn = cp_call(STRATEGIES[args.strategy], group, True)
    points = []
    for seq_len in sorted(args.seq):
        case = Case(seq_len, args.heads, args.head_dim, causal=True)
        log(f"scaling: P={world_size()} {case}")
        inp = case.inputs(group.runs(seq_len))
        reps = []
        try:
            for _ in range(args.repeats):
                timing, got = time_call(fn, (), inp, backward=True, memory=True)
                del got
                reps.append(gather_objects(timing))
        except Exception as err:  # the first length that does not run ends the sweep
            points.append({"case": case.as_dict(), "error": f"{type(err).__name__}: {err}"[:500]})
            break
        del inp
        point = {
            "case": case.as_dict(),
            "wall": summary([max(r["wall"] for r in rep) for rep in reps]),
            "cpu_sum": summary([sum(r["cpu"] for r in rep) for rep in reps]),
            "peak_rss_bytes_max_rank": summary([max(r["peak_rss_bytes"] for r in rep) for rep in reps]),
            "reps": reps,
        }
        points.append(point)
        peak_mib = point["peak_rss_bytes_max_rank"]["median"] / 2**20
        log(f"  wall {point['wall']['median']:.2f} s, peak above start {peak_mib:.0f} MiB")
    out = args.out or RESULTS / f"scaling_p{world_size()}.json"
    if rank() == 0:
        write_result(
            out,
            {
                "benchmark": "scaling",
                "world_size": world_size(),
                "strategy": args.strategy,
                "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                "points": points,
            },
            started,
        )


if __name__ == "__main__":
    main()
    finish()
