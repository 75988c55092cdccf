"""Host cost of planning a masked ring: tiles classified from row intervals vs pair by pair.

    OMP_NUM_THREADS=1 python -m bench.plan_cost --out bench/results/plan_cost.json

Every masked attention call plans, on the host, which tiles of each ring step to skip, run without
a mask or run with one (Note [Skipping what the mask hides] in :mod:`cp_dtensor.positions.tiles`). This times
that plan for one rank (every step of :class:`cp_dtensor.attention.ring.RingPlan`, as ``ring_forward`` asks for
it) in two ways on the same inputs, alternating: the interval path that :func:`refine_block` takes
for causal / window / padding masks and contiguous documents, and the pair-by-pair path it falls
back to for ids that recur (forced here by hiding :meth:`MaskSpec.row_intervals`). Both plan the
same calls (tests/test_masks.py checks it). CPU seconds of this process, min / median / max.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from cp_dtensor.attention.ring import RingPlan
from cp_dtensor.positions.layout import shard_runs
from cp_dtensor.positions.masks import MaskSpec
from cp_dtensor.positions.tiles import TilePlanner
from cp_dtensor.reference import document_ids_from_lengths

CASES = [  # (name, L, P, document length or None, window or None)
    ("packed 1K, P=2, documents of 256", 1024, 2, 256, None),
    ("packed 16K, P=4, documents of 512", 16384, 4, 512, None),
    ("packed 64K, P=8, documents of 512", 65536, 8, 512, None),
    ("window 16K, P=4, w=512", 16384, 4, None, (511, 0)),
]


def plan_seconds(seq_len: int, size: int, spec: MaskSpec, pair_by_pair: bool) -> tuple[float, int]:
    """CPU seconds to build rank 0's plan for every step, and the number of kernel calls planned."""
    runs = [shard_runs(seq_len, size, r, "zigzag") for r in range(size)]
    original = MaskSpec.row_intervals
    if pair_by_pair:
        MaskSpec.row_intervals = lambda self, q_pos: None
    try:
        start = time.process_time()
        plan = RingPlan(
            group=None, rank=0, size=size, q_runs=runs[0], kv_runs=runs.__getitem__, causal=True, scale=1.0, mask=spec
        )
        planner = TilePlanner(spec)  # a new planner: the plans are made, not found in the cache
        calls = sum(len(planner.calls(runs[0], runs[-step % size], True)) for step in range(plan.num_steps))
        return time.process_time() - start, calls
    finally:
        MaskSpec.row_intervals = original


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", type=int, default=len(CASES), help="run only the first N cases")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name, seq_len, size, doc, window in CASES[: args.cases]:
        ids = None if doc is None else document_ids_from_lengths([doc] * (seq_len // doc), seq_len)[None]
        times, counts = {"intervals": [], "pair_by_pair": []}, set()
        for _ in range(args.repeats):
            for way in times:  # alternate A B A B; a fresh MaskSpec each time (nothing cached between)
                spec = MaskSpec(causal=True, document_ids=ids, window=window)
                seconds, calls = plan_seconds(seq_len, size, spec, way == "pair_by_pair")
                times[way].append(seconds)
                counts.add(calls)
        assert len(counts) == 1, f"the two paths planned different numbers of calls: {counts}"
        stats = {w: {"min": min(t), "median": statistics.median(t), "max": max(t)} for w, t in times.items()}
        ratio = [a / b for a, b in zip(times["pair_by_pair"], times["intervals"])]
        rows.append(
            {
                "case": name,
                "seq_len": seq_len,
                "P": size,
                "kernel_calls": calls,
                "cpu_s": stats,
                "speedup": {"min": min(ratio), "median": statistics.median(ratio), "max": max(ratio)},
            }
        )
        print(
            f"{name:36s} intervals {stats['intervals']['median'] * 1e3:7.1f} ms, pair by pair "
            f"{stats['pair_by_pair']['median'] * 1e3:7.1f} ms (x{statistics.median(ratio):.0f}), {calls} calls",
            flush=True,
        )
    if args.out:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
        Path(args.out).write_text(
            json.dumps(
                {
                    "benchmark": "plan_cost",
                    "command": "OMP_NUM_THREADS=1 python -m bench.plan_cost --out " + args.out,
                    "machine": {
                        "cpu_model": cpu,
                        "cpu_count": os.cpu_count(),
                        "platform": platform.platform(),
                        "loadavg_1m": os.getloadavg()[0],
                    },
                    "torch": torch.__version__,
                    "repeats": args.repeats,
                    "rows": rows,
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
