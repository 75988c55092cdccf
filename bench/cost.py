"""Cost of context parallelism on CPU: the work CP adds, as a ratio (the limit is 1.0).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 -m bench.cost \
        --seq 8192 16384 --out bench/results/cost_p4.json

For each sequence length and masking, alternating A B A B in the same processes:

* A: rank 0 runs the fused SDPA on the whole sequence (forward, then backward) while the other ranks
  wait in a barrier; its CPU seconds are the baseline.
* B: every rank runs each registered strategy (``cp_dtensor.STRATEGIES``, read at run time) on its
  shard; the sum of the ranks' CPU seconds (``time.process_time``: all threads of the process, user
  and system, so the communication threads count) is the cost.

Reported per repeat: ``sum(ranks' CPU s) / baseline CPU s`` for the forward and for forward + backward,
the same ratio for the block kernels alone (how much of the cost is the kernels being less efficient on
smaller blocks), and the max error of the gathered output and gradients against the baseline. CPU
seconds, not wall time, are the figure: with more ranks than cores the ranks share the cores.
"""

from __future__ import annotations

import argparse

from bench.cases import (
    Case,
    aggregate,
    cp_call,
    gathered_errors,
    strategy_groups,
    time_baseline,
    time_call,
)
from bench.harness import RESULTS, finish, gather_objects, init_rank, log, now, rank, summary, world_size, write_result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--causal", choices=["both", "causal", "full"], default="both")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per case (after one warm-up)")
    p.add_argument("--repeats-at", type=str, default="", help="per-length repeats, e.g. 16384:2,32768:1")
    p.add_argument("--forward-only", action="store_true", help="time the forward alone (no backward)")
    p.add_argument("--strategies", nargs="*", default=None, help="default: every registered strategy")
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def run_case(case: Case, groups: dict, repeats: int, backward: bool) -> dict:
    """Warm up, check agreement, then alternate baseline and strategies ``repeats`` times."""
    full = case.full_inputs() if rank() == 0 else None
    local = {name: case.inputs(g.runs(case.seq_len)) for name, g in groups.items() if not isinstance(g, str)}
    entry: dict = {"case": case.as_dict(), "backward": backward, "baseline": [], "strategies": {}}
    _, want = time_baseline(case, full, backward=backward)  # warm-up, and the reference result
    for name, group in groups.items():
        if isinstance(group, str):
            entry["strategies"][name] = {"error": group}
            continue
        try:
            _, got = time_call(cp_call(_fn(name), group, case.causal), (), local[name], backward=backward)
            entry["strategies"][name] = {"max_abs_err": gathered_errors(group, got, want), "reps": []}
        except Exception as err:  # a strategy that cannot run this case is reported, not fatal
            entry["strategies"][name] = {"error": f"{type(err).__name__}: {err}"}
    del want
    for _ in range(repeats):
        base, _ = time_baseline(case, full, backward=backward)
        entry["baseline"].append(base)
        for name, res in entry["strategies"].items():
            if "error" in res:
                continue
            timing, _ = time_call(cp_call(_fn(name), groups[name], case.causal), (), local[name], backward=backward)
            res["reps"].append(aggregate(gather_objects(timing)))
    if rank() == 0:
        _ratios(entry)
    return entry


def _ratios(entry: dict) -> None:
    base = entry["baseline"]
    for res in entry["strategies"].values():
        if "error" in res:
            continue
        pairs = list(zip(res["reps"], base))
        res["ratio_fwd"] = summary([r["fwd_cpu_sum"] / b["fwd_cpu"] for r, b in pairs])
        res["kernel_ratio_fwd"] = summary([r["kernel_fwd_sum"] / b["fwd_cpu"] for r, b in pairs])
        if entry["backward"]:
            res["ratio_fwd_bwd"] = summary([r["cpu_sum"] / b["cpu"] for r, b in pairs])
            res["kernel_ratio_fwd_bwd"] = summary([r["kernel_sum"] / b["cpu"] for r, b in pairs])
            # where the rest goes: the calling thread outside the kernels, and the other threads (gloo)
            res["main_other_ratio_fwd_bwd"] = summary(
                [(r["main_thread_cpu_sum"] - r["kernel_sum"]) / b["cpu"] for r, b in pairs]
            )
            res["comm_threads_ratio_fwd_bwd"] = summary(
                [(r["cpu_sum"] - r["main_thread_cpu_sum"]) / b["cpu"] for r, b in pairs]
            )
        res["wall_speedup"] = summary([b["wall"] / r["wall_max"] for r, b in pairs])


def _fn(name: str):
    from cp_dtensor.attention.api import STRATEGIES

    return STRATEGIES[name]


def _repeats_at(spec: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in (item.split(":") for item in spec.split(",") if item)}


def main(argv=None) -> None:
    args = parse_args(argv)
    init_rank()
    started = now()
    from cp_dtensor.attention.api import STRATEGIES

    names = args.strategies or list(STRATEGIES)
    groups = strategy_groups(world_size(), names, layout=args.layout)
    causals = {"both": [True, False], "causal": [True], "full": [False]}[args.causal]
    reps_at = _repeats_at(args.repeats_at)
    cases = []
    for seq_len in args.seq:
        for causal in causals:
            case = Case(seq_len, args.heads, args.head_dim, causal, args.dtype)
            log(f"cost: P={world_size()} {case}")
            entry = run_case(case, groups, reps_at.get(seq_len, args.repeats), backward=not args.forward_only)
            cases.append(entry)
            for name, res in entry["strategies"].items() if rank() == 0 else ():
                log(f"  {name}: " + (res.get("error") or f"fwd+bwd {res.get('ratio_fwd_bwd')} fwd {res['ratio_fwd']}"))
    out = args.out or RESULTS / f"cost_p{world_size()}.json"
    write_result(
        out,
        {
            "benchmark": "cost",
            "world_size": world_size(),
            "layout": args.layout,
            "strategies": names,
            "cases": cases,
        },
        started,
    )


if __name__ == "__main__":
    main()
    finish()
