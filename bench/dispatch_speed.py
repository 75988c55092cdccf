"""Mask-aware dispatch against the ring: a forward + backward step on packed documents and on plain causal.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 -m bench.dispatch_speed \\
        --out bench/results/dispatch_speed.json

Cases (B = 1, fp32, ``--heads`` query heads, ``--kv-heads`` K/V heads of ``--head-dim``):

* ``documents``: ``--doc-tokens`` tokens in ``--docs`` documents of random lengths (multiples of
  ``2P``, so the per-document layout can also run), causal, zigzag layout and per-document layout;
* ``plain causal``: ``--causal-tokens`` tokens, zigzag (nothing for a mask to skip).

Per case the strategies run in turn, ``--repeats`` rounds (ranks meet at a barrier before and after
each step; rank 0's wall time between them is the step time), so load changes hit them alike; each
time is also a ratio to the ring of the same round (min / median / max). Per rank: bytes sent (counted)
and visible (query, key) pairs (the compute), reported as max / mean over ranks. Then the same
comparison predicted for H100s from the communication model (NVLink inside a node, InfiniBand across).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.harness import barrier, finish, gather_objects, init_rank, log, now, write_result
from cp_dtensor import DocumentZigzag, context_parallel_attention, count_comm, init_context_parallel_group
from cp_dtensor.estimate.comm_model import comm_bytes, dispatch_bytes
from cp_dtensor.estimate.planner import DEVICES
from cp_dtensor.positions.layout import shard_runs
from cp_dtensor.positions.masks import MaskSpec, positions

STRATEGIES = {
    "ring": {},
    "dispatch (pairwise)": {"schedule": "pairwise"},
    "dispatch (alltoall)": {"schedule": "alltoall"},
}


def packed_ids(tokens: int, docs: int, unit: int, seed: int) -> torch.Tensor:
    """``(1, tokens)`` ids of ``docs`` documents of random lengths, each a multiple of ``unit``."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, tokens // unit), docs - 1))
    lengths = [unit * (b - a) for a, b in zip([0, *cuts], [*cuts, tokens // unit])]
    return torch.repeat_interleave(torch.arange(docs), torch.tensor(lengths))[None]


def visible_pairs(mask: MaskSpec, runs: list) -> int:
    """Visible (query, key) pairs of one rank's queries: the compute it must do (intervals, no L x L)."""
    lo, hi = mask.row_intervals(positions(runs))
    return int((hi - lo + 1).clamp(min=0).sum())


def step(q, k, v, dout, group, strategy: str, kwargs: dict) -> float:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    name = "ring" if strategy == "ring" else "dispatch"
    barrier()
    start = time.perf_counter()
    out = context_parallel_attention(q, k, v, group, strategy=name, **kwargs)
    out.backward(dout)
    barrier()
    return time.perf_counter() - start


def predicted(mask: MaskSpec, all_runs: list, args, device_name: str, link: str) -> dict:
    """Step seconds on ``device_name`` from flops and the comm model, ring and dispatch, per rank max.

    bf16, the query heads and K/V heads of a Llama-3-8B layer (32 and 8 of 128); 50% of peak flops.
    ``overlap``: communication hidden under compute (the best case for the ring); ``serial``: added.
    """
    device = DEVICES[device_name]
    bandwidth = device.intra_node_gbps if link == "nvlink" else device.inter_node_gbps
    heads, kv_heads, head_dim, p = 32, 8, 128, len(all_runs)
    seq_len = sum(n for _, n in all_runs[0]) * p
    flops = [4 * heads * head_dim * visible_pairs(mask, runs) * 3.5 for runs in all_runs]
    compute = max(flops) / (device.peak_flops * 0.5)
    ring = comm_bytes(
        "ring", batch=1, seq_len=seq_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim, world_size=p,
        dtype=torch.bfloat16,
    ).total / bandwidth  # fmt: skip
    disp = (
        max(
            dispatch_bytes(mask, all_runs, r, batch=1, kv_heads=kv_heads, head_dim=head_dim, dtype=torch.bfloat16).total
            for r in range(p)
        )
        / bandwidth
    )
    return {
        "device": device_name,
        "link": link,
        "compute_s": compute,
        "ring_comm_s": ring,
        "dispatch_comm_s": disp,
        "speedup_overlap": max(compute, ring) / max(compute, disp),
        "speedup_serial": (compute + ring) / (compute + disp),
        # attention FLOP/s per GPU the step reaches (overlap model), as MagiAttention reports its runs
        "tflops_ring_overlap": max(flops) / max(compute, ring) / 1e12,
        "tflops_dispatch_overlap": max(flops) / max(compute, disp) / 1e12,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--doc-tokens", type=int, default=65536)
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--causal-tokens", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = now()
    init_rank()
    world = dist.get_world_size()
    ids = packed_ids(args.doc_tokens, args.docs, 2 * world, seed=0)
    per_document = DocumentZigzag.from_document_ids(ids)
    cases = {
        "documents, zigzag": (args.doc_tokens, "zigzag", {"document_ids": ids}),
        "documents, per-document layout": (args.doc_tokens, per_document, {"document_ids": ids}),
        "plain causal, zigzag": (args.causal_tokens, "zigzag", {}),
    }
    base_group = init_context_parallel_group(world)
    results = []
    gen = torch.Generator().manual_seed(0)
    for case, (tokens, layout, mask_kwargs) in cases.items():
        group = base_group.with_layout(layout)
        shape = (1, args.heads, tokens, args.head_dim)
        kv_shape = (1, args.kv_heads, tokens, args.head_dim)
        full = [torch.randn(s, generator=gen) for s in (shape, kv_shape, kv_shape, shape)]
        q, k, v, dout = (group.partition_sequence(t, seq_dim=2) for t in full)
        kwargs = {"causal": True, **mask_kwargs}
        mask = MaskSpec(causal=True, document_ids=mask_kwargs.get("document_ids"))
        all_runs = [shard_runs(tokens, world, r, group.layout) for r in range(world)]
        sent = {}
        for strategy, extra in STRATEGIES.items():
            with count_comm() as counter:
                step(q, k, v, dout, group, strategy, kwargs | extra)  # warm-up (plans cached), bytes counted
            sent[strategy] = gather_objects(counter.total_bytes)
        times = {s: [] for s in STRATEGIES}
        for _ in range(args.repeats):
            for strategy, extra in STRATEGIES.items():
                times[strategy].append(step(q, k, v, dout, group, strategy, kwargs | extra))
        pairs = [visible_pairs(mask, runs) for runs in all_runs]
        for strategy in STRATEGIES:
            ratios = [t / r for t, r in zip(times[strategy], times["ring"])]
            row = {
                "case": case,
                "tokens": tokens,
                "strategy": strategy,
                "seconds": {"min": min(times[strategy]), "median": statistics.median(times[strategy]),
                            "max": max(times[strategy])},
                "ratio_to_ring": {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)},
                "bytes_per_rank": sent[strategy],
                "bytes_max_over_mean": max(sent[strategy]) / max(1, statistics.mean(sent[strategy])),
                "pairs_max_over_mean": max(pairs) / statistics.mean(pairs),
            }  # fmt: skip
            results.append(row)
            log(row)
    # predictions for H100s: MagiAttention's document-causal setting, 8K tokens per GPU
    gpu = []
    for p, link in ((8, "nvlink"), (64, "infiniband")):
        tokens = 8192 * p
        gpu_ids = packed_ids(tokens, tokens // 2048, 2 * p, seed=1)  # documents of 2K tokens on average
        mask = MaskSpec(causal=True, document_ids=gpu_ids)
        runs = [shard_runs(tokens, p, r, "zigzag") for r in range(p)]
        gpu.append({"cp": p, "tokens": tokens, **predicted(mask, runs, args, "H100", link)})
        log(gpu[-1])
    config = {k: v for k, v in vars(args).items() if k != "out"}
    write_result(args.out, {"config": {**config, "world_size": world}, "results": results, "h100": gpu}, started)
    finish()


if __name__ == "__main__":
    main()
