"""Where the ring's time goes: ``torch.profiler`` over one causal forward + backward, every rank.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m bench.profile_ring \
        --seq 16384 --out bench/results/profile_ring_p2.json

After one warm-up call, profiles one call and keeps, per rank, the rows of the ring's own labels
(``cp_dtensor.ring.attn_block``, ``attn_block_backward``, ``merge``, ``comm_wait``, ``forward``,
``backward``) and the operators with the most self time. The profiler's times are wall time on the
rank's thread: run with no more ranks than cores (P = 2 here) for them to mean work.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench.cases import Case, cp_call, time_call
from bench.harness import RESULTS, finish, gather_objects, init_rank, log, now, rank, world_size, write_result

LABEL_PREFIX = "cp_dtensor."


def rows(prof, top: int) -> dict[str, list[dict]]:
    """The ``cp_dtensor.*`` labels and the ``top`` operators by self CPU time (seconds)."""
    events = prof.key_averages()

    def row(e):
        return {
            "name": e.key,
            "calls": e.count,
            "cpu_total_s": e.cpu_time_total / 1e6,
            "self_cpu_s": e.self_cpu_time_total / 1e6,
        }

    labels = sorted((row(e) for e in events if e.key.startswith(LABEL_PREFIX)), key=lambda r: -r["cpu_total_s"])
    ops = sorted((row(e) for e in events if not e.key.startswith(LABEL_PREFIX)), key=lambda r: -r["self_cpu_s"])
    return {"labels": labels, "top_ops": ops[:top]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--strategy", default="ring")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    init_rank()
    started = now()
    from cp_dtensor import init_context_parallel_group
    from cp_dtensor.attention.api import STRATEGIES

    group = init_context_parallel_group(cp_size=world_size(), device_type="cpu")
    case = Case(args.seq, args.heads, args.head_dim, causal=True)
    fn = cp_call(STRATEGIES[args.strategy], group, True)
    inp = case.inputs(group.runs(args.seq))
    log(f"profile: P={world_size()} {case}")
    time_call(fn, (), inp, backward=True)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        timing, _ = time_call(fn, (), inp, backward=True)
    mine = {"rank": rank(), "timing": timing, **rows(prof, args.top)}
    if rank() == 0:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top), flush=True)
        mine["table"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    every = gather_objects(mine)
    out = args.out or RESULTS / f"profile_ring_p{world_size()}.json"
    write_result(
        out,
        {
            "benchmark": "profile_ring",
            "world_size": world_size(),
            "strategy": args.strategy,
            "case": case.as_dict(),
            "ranks": every,
            "torch": torch.__version__,
        },
        started,
    )


if __name__ == "__main__":
    main()
    finish()
