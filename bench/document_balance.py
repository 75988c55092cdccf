"""Load balance of packed documents of mixed lengths: whole-row zigzag vs per-document zigzag.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 -m bench.document_balance \
        --out bench/results/document_balance_p4.json

One packed row of ``--seq`` tokens, causal with ``document_ids``, ring attention forward + backward,
fp32, under three layouts that alternate in the same processes (A B C A B C) on the same global
inputs: ``"zigzag"`` over the whole row, ``"contiguous"``, and :class:`cp_dtensor.DocumentZigzag`.
Two rows:

* ``half``: one document of ``L / 2`` tokens, then documents of ``--short`` tokens;
* ``random``: lengths drawn from an exponential distribution of mean ``--mean`` (seed 0), each
  padded with id ``-1`` tokens to a multiple of ``2P`` so that DocumentZigzag can split it. The
  same padded row is used for every layout.

Per layout: each rank's thread CPU seconds inside the block kernels (:mod:`bench.instrument`), as
max / mean over the ranks (1.0 is balanced), and the ratio of the slowest rank's kernel seconds to
whole-row zigzag's in the same round (below 1: the ring's critical path is shorter). Next to them
the exact forward work, visible (query, key) pairs per rank (a query at offset ``t`` of its document
sees ``t + 1`` keys), which the tile planner computes without waste on these rows up to the tile
edges. Correctness is tested in tests/test_masks.py and tests/test_layout.py, not here.
"""

from __future__ import annotations

import argparse
import random

import torch

from bench.cases import time_call
from bench.harness import (
    RESULTS,
    finish,
    gather_objects,
    init_rank,
    log,
    make_inputs,
    now,
    rank,
    summary,
    world_size,
    write_result,
)  # fmt: skip
from cp_dtensor import DocumentZigzag, init_context_parallel_group, ring_attention
from cp_dtensor.positions.layout import shard_positions


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=16384, help="tokens in the packed row (the random row is padded)")
    p.add_argument("--short", type=int, default=256, help="length of the short documents of the 'half' row")
    p.add_argument("--mean", type=int, default=1024, help="mean document length of the 'random' row")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "document_balance.json"))
    return p.parse_args(argv)


def rows(args: argparse.Namespace) -> dict[str, list[int]]:
    """Document lengths of each experiment's row, before :func:`padded_ids` pads each to a multiple of 2P."""
    half = [args.seq // 2] + [args.short] * ((args.seq - args.seq // 2) // args.short)
    rng, lengths = random.Random(0), []
    while sum(lengths) < args.seq:
        lengths.append(min(args.seq - sum(lengths), max(1, round(rng.expovariate(1 / args.mean)))))
    return {"half": half, "random": lengths}


def padded_ids(lengths: list[int], multiple: int) -> torch.Tensor:
    """``(L',)`` ids: document ``i`` then padding (-1) up to the next multiple of ``multiple``."""
    ids = []
    for i, n in enumerate(lengths):
        ids += [i] * n + [-1] * (-n % multiple)
    return torch.tensor(ids)


def visible_pairs(ids_L: torch.Tensor, positions: torch.Tensor) -> int:
    """Causal document attention's (query, key) pairs for these query positions."""
    starts = torch.ones_like(ids_L, dtype=torch.bool)
    starts[1:] = ids_L[1:] != ids_L[:-1]
    start_of = torch.cummax(torch.where(starts, torch.arange(len(ids_L)), 0), 0).values  # each token's run start
    seen = torch.where(ids_L >= 0, torch.arange(len(ids_L)) - start_of + 1, 0)
    return int(seen[positions].sum())


def document_call(group, ids_1L: torch.Tensor):
    """Ring attention of ``(q, k, v)`` under the causal mask of the documents ``ids_1L``."""
    return lambda q, k, v: ring_attention(q, k, v, group, causal=True, document_ids=ids_1L)


def main(argv=None) -> None:
    args = parse_args(argv)
    init_rank()
    started = now()
    size = world_size()
    base = init_context_parallel_group(cp_size=size, device_type="cpu")
    experiments = {}
    for name, lengths in rows(args).items():
        ids_L = padded_ids(lengths, 2 * size)
        seq_len = len(ids_L)
        layouts = {"zigzag": "zigzag", "contiguous": "contiguous", "documents": DocumentZigzag.from_document_ids(ids_L)}
        groups = {n: base.with_layout(lay) for n, lay in layouts.items()}
        ids_1L = ids_L[None]
        log(
            f"{name}: L={seq_len} ({seq_len - sum(lengths)} padding), {len(lengths)} documents, "
            f"longest {max(lengths)}, P={size}"
        )
        shape = (1, args.heads, seq_len, args.head_dim)
        local = {n: make_inputs(shape, g.runs(seq_len), seed=0, dtype=torch.float32) for n, g in groups.items()}

        for n, g in groups.items():  # warm-up (and the mask plans of each layout)
            time_call(document_call(g, ids_1L), (), local[n], backward=True)
        kernel: dict[str, list[list[float]]] = {n: [] for n in groups}
        for rep in range(args.repeats):
            for n, g in groups.items():
                timing, _ = time_call(document_call(g, ids_1L), (), local[n], backward=True)
                kernel[n].append([t["kernel_fwd"] + t["kernel_bwd"] for t in gather_objects(timing)])
            log(f"  repeat {rep}: " + ", ".join(f"{n} max {max(kernel[n][-1]):.2f} s" for n in groups))
        entry = {
            "seq_len": seq_len,
            "padding_tokens": seq_len - sum(lengths),
            "document_lengths": lengths,
            "layouts": {},
        }
        for n, lay in layouts.items():
            pairs = [visible_pairs(ids_L, shard_positions(seq_len, size, r, lay)) for r in range(size)]
            entry["layouts"][n] = {
                "visible_pairs_per_rank": pairs,
                "visible_pairs_max_over_mean": max(pairs) / (sum(pairs) / size),
                "kernel_max_over_mean": summary([max(k) / (sum(k) / size) for k in kernel[n]]),
                "kernel_max_over_zigzag_max": summary(
                    [max(k) / max(z) for k, z in zip(kernel[n], kernel["zigzag"])]  # the same round
                ),
                "kernel_seconds_per_rank": kernel[n],
            }
            log(
                f"  {n}: pairs max/mean {entry['layouts'][n]['visible_pairs_max_over_mean']:.3f}, kernel max/mean "
                f"{entry['layouts'][n]['kernel_max_over_mean']['median']:.3f}, slowest rank vs zigzag "
                f"{entry['layouts'][n]['kernel_max_over_zigzag_max']['median']:.3f}"
            )
        experiments[name] = entry
    if rank() == 0:
        write_result(
            args.out,
            {
                "benchmark": "document_balance",
                "world_size": size,
                "heads": args.heads,
                "head_dim": args.head_dim,
                "experiments": experiments,
            },
            started,
        )


if __name__ == "__main__":
    main()
    finish()
