"""The work a mask lets the ring skip: packed documents and a sliding window, on CPU ranks.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 -m bench.masks \
        --out bench/results/masks_p4.json

Every figure is the SUM over the ranks of their CPU seconds (``time.process_time``: all threads of a
rank, so the gloo transfers count) for one ring attention call, forward + backward, one thread per
rank. Two experiments, each alternating its cases A B A B in the same processes:

* ``packed``: one sequence of ``--seq`` tokens packed with documents of ``--doc-len`` tokens
  (``document_ids``), causal, zigzag layout, against the same call without the documents (plain
  causal). The ratio ``packed / plain`` is the share of the causal work the ring still does.
* ``window``: a causal sliding window of ``--window`` tokens (``window=(w - 1, 0)``), contiguous
  layout, at each of ``--window-seq`` lengths, against plain causal at the same lengths. The ring
  stops after the neighbour's block (``RingPlan.num_steps`` = 2), so the cost grows ~linearly in L;
  plain causal grows ~quadratically.

Nothing here is checked for correctness (tests/test_masks.py and tests/test_reference_masks.py do
that); the inputs are unit-normal, drawn per shard (:func:`bench.harness.make_inputs`).
"""

from __future__ import annotations

import argparse

import torch

from bench.harness import (
    RESULTS,
    Stopwatch,
    barrier,
    finish,
    gather_objects,
    init_rank,
    log,
    make_inputs,
    now,
    summary,
    world_size,
    write_result,
)  # fmt: skip
from cp_dtensor import init_context_parallel_group, ring_attention
from cp_dtensor.attention.call import mask_spec
from cp_dtensor.attention.ring import make_plan
from cp_dtensor.positions.blocks import block_pairs
from cp_dtensor.positions.masks import document_ids_from_cu_seqlens


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=16384, help="length of the packed sequence")
    p.add_argument("--doc-len", type=int, default=512, help="tokens per packed document")
    p.add_argument("--window", type=int, default=512, help="sliding-window width w (tokens seen, itself included)")
    p.add_argument("--window-seq", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per case (after one warm-up call)")
    p.add_argument("--out", default=str(RESULTS / "masks.json"))
    return p.parse_args(argv)


Case = tuple  # (ContextParallelGroup, seq_len, mask keyword arguments of ring_attention)


def timed_call(case: Case, args: argparse.Namespace) -> float:
    """CPU seconds of ONE ring attention forward + backward on every rank, summed over the ranks."""
    group, seq_len, mask = case
    inp = make_inputs((1, args.heads, seq_len, args.head_dim), group.runs(seq_len), seed=0, dtype=torch.float32)
    q, k, v = (inp[n].requires_grad_() for n in "qkv")
    barrier()
    watch = Stopwatch()
    out = ring_attention(q, k, v, group, causal=True, **mask)
    out.backward(inp["dout"])
    cpu, _ = watch.lap()
    barrier()
    return sum(gather_objects(cpu))


def planned_work(case: Case) -> dict[str, int]:
    """What the ring's plan asks of the kernels: pairs over all ranks and steps, and the ring's steps.

    A masked tile is computed whole (its hidden pairs too), so it counts its full area; a causal
    diagonal call counts its triangle, as the fused kernel skips the rest.
    """
    group, seq_len, mask = case
    q_local = torch.empty(1, 1, seq_len // group.size, 1)
    plan = make_plan(group, seq_len // group.size, True, 1.0, mask_spec(group, q_local, causal=True, **mask))
    pairs = sum(block_pairs(call) for step in range(plan.num_steps) for call, _ in plan.calls(step))
    return {"kernel_pairs": sum(gather_objects(pairs)), "ring_steps": plan.num_steps}


def measure(cases: dict[str, Case], args: argparse.Namespace) -> dict[str, dict]:
    """One warm-up call per case, then ``repeats`` rounds of every case in turn (A B A B).

    Returns:
        Per case: the CPU seconds of every repeat with their min / median / max, and its planned work.
    """
    for case in cases.values():
        timed_call(case, args)  # warm-up: first-call allocations, the kernels' caches
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(args.repeats):
        for name, case in cases.items():
            seconds[name].append(timed_call(case, args))
            log(f"  repeat {rep}: {name:<28s} {seconds[name][-1]:8.2f} CPU s (sum over ranks)")
    return {
        name: {"cpu_s": {"per_repeat": seconds[name], **summary(seconds[name])}, **planned_work(case)}
        for name, case in cases.items()
    }


def packed_experiment(groups: dict, args: argparse.Namespace) -> dict:
    """Documents of ``doc_len`` tokens packed into ``seq`` tokens vs plain causal, zigzag."""
    cu_seqlens = torch.arange(0, args.seq + 1, args.doc_len)
    if cu_seqlens[-1] != args.seq:
        cu_seqlens = torch.cat([cu_seqlens, torch.tensor([args.seq])])  # a shorter last document
    ids = document_ids_from_cu_seqlens(cu_seqlens)[None]  # (1, L), global order, on every rank
    log(f"packed: L={args.seq}, {len(cu_seqlens) - 1} documents of {args.doc_len} tokens, zigzag")
    cases = measure(
        {
            "plain causal": (groups["zigzag"], args.seq, {}),
            "packed": (groups["zigzag"], args.seq, {"document_ids": ids}),
        },
        args,
    )
    packed, plain = cases["packed"], cases["plain causal"]
    ratios = [a / b for a, b in zip(packed["cpu_s"]["per_repeat"], plain["cpu_s"]["per_repeat"])]  # same round
    return {
        "seq_len": args.seq,
        "doc_len": args.doc_len,
        "layout": "zigzag",
        "cases": cases,
        "packed_over_plain_cpu_s": {"per_repeat": ratios, **summary(ratios)},
        "packed_over_plain_kernel_pairs": packed["kernel_pairs"] / plain["kernel_pairs"],
    }


def window_experiment(groups: dict, args: argparse.Namespace) -> dict:
    """A causal window of ``window`` tokens vs plain causal at each length, contiguous."""
    window = (args.window - 1, 0)
    log(f"window: w={args.window} (window={window}), L in {args.window_seq}, contiguous")
    cases = {}
    for n in args.window_seq:
        cases[f"plain causal L={n}"] = (groups["contiguous"], n, {})
        cases[f"window L={n}"] = (groups["contiguous"], n, {"window": window})
    cases = measure(cases, args)
    rows = [
        {"seq_len": n, "plain causal": cases[f"plain causal L={n}"], "window": cases[f"window L={n}"]}
        for n in args.window_seq
    ]
    return {"window": args.window, "window_arg": list(window), "layout": "contiguous", "rows": rows}


def main(argv=None) -> None:
    args = parse_args(argv)
    init_rank()
    started = now()
    P = world_size()
    groups = {
        layout: init_context_parallel_group(P, layout=layout, device_type="cpu") for layout in ("zigzag", "contiguous")
    }
    result = {
        "world_size": P,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "dtype": "float32",
        "batch": 1,
        "repeats": args.repeats,
        "figure": "sum over ranks of CPU seconds (time.process_time) of one ring_attention forward + backward",
        "packed": packed_experiment(groups, args),
        "window": window_experiment(groups, args),
    }
    ratio = result["packed"]["packed_over_plain_cpu_s"]
    log(f"packed / plain causal CPU s: median {ratio['median']:.3f} (min {ratio['min']:.3f}, max {ratio['max']:.3f})")
    write_result(args.out, result, started)
    finish()  # no gloo thread may still run when the interpreter exits (it aborts otherwise)


if __name__ == "__main__":
    main()
