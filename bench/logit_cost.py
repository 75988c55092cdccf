"""What soft-capping, a score function and sinks cost in one attention block, against plain attention.

    OMP_NUM_THREADS=1 python -m bench.logit_cost --out bench/results/logit_cost.json

One process, one causal block of ``L`` queries and keys (what a ring step computes), forward and
backward through :func:`cp_dtensor.local.kernels.block_forward` / ``block_backward``:

* ``plain``: the fused CPU flash kernel;
* ``sinks``: the fused kernel and the one correction after it (``add_sinks``, ``sink_grad``);
* ``softcap``: the tiled kernel of :mod:`cp_dtensor.local.logits` with ``tanh`` capping;
* ``softcap + alibi``: the same with an ALiBi ``score_mod`` on global positions.

The variants run in turn, ``--repeats`` rounds, so load changes hit them alike; each time is a
ratio to ``plain`` of the same round, reported as min / median / max.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.harness import init_rank, now, write_result
from cp_dtensor.local.kernels import block_backward, block_forward
from cp_dtensor.local.logits import LogitSpec
from cp_dtensor.local.merge import add_sinks, sink_grad


def alibi_for(num_heads: int):
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)])

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return alibi


def step(q, k, v, dout, spec: LogitSpec | None) -> None:
    """One forward and backward of a causal block with ``spec``'s logits (``None``: plain)."""
    pos = torch.arange(q.shape[2])
    logits = None if spec is None else spec.bind(pos, pos)
    out, lse = block_forward(q, k, v, causal=True, scale=q.shape[-1] ** -0.5, logits=logits)
    if spec is not None and spec.sinks is not None:
        out, lse = out.float(), lse.clone()
        add_sinks(out, lse, spec.sinks)
    block_backward(dout, q, k, v, out, lse, causal=True, scale=q.shape[-1] ** -0.5, logits=logits)
    if spec is not None and spec.sinks is not None:
        sink_grad(dout, out, lse, spec.sinks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = now()
    init_rank()  # one thread, the load at the start (no process group: one process)
    torch.manual_seed(0)
    results = []
    for seq_len in args.seq_lens:
        q, k, v, dout = (torch.randn(1, args.heads, seq_len, args.head_dim) for _ in range(4))
        variants = {
            "plain": None,
            "sinks": LogitSpec(sinks=torch.linspace(-2, 2, args.heads)),
            "softcap": LogitSpec(softcap=30.0),
            "softcap + alibi": LogitSpec(softcap=30.0, score_mod=alibi_for(args.heads)),
        }
        times = {name: [] for name in variants}
        step(q, k, v, dout, None)  # warm-up
        for _ in range(args.repeats):
            for name, spec in variants.items():
                start = time.perf_counter()
                step(q, k, v, dout, spec)
                times[name].append(time.perf_counter() - start)
        for name in variants:
            ratios = [t / p for t, p in zip(times[name], times["plain"])]
            row = {
                "seq_len": seq_len,
                "variant": name,
                "seconds_median": statistics.median(times[name]),
                "ratio_min": min(ratios),
                "ratio_median": statistics.median(ratios),
                "ratio_max": max(ratios),
            }
            results.append(row)
            print(json.dumps(row))
    config = {"heads": args.heads, "head_dim": args.head_dim, "repeats": args.repeats, "seq_lens": args.seq_lens}
    write_result(args.out, {"config": config, "results": results}, started)


if __name__ == "__main__":
    main()
