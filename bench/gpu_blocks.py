"""GPU block efficiency: every virtual rank's ring kernels and merges on ONE GPU vs one flash call.

    python -m bench.gpu_blocks                       # one GPU: seq 32K-128K, heads 32, head_dim 128, bf16
    python -m bench.gpu_blocks --dry-run             # CPU, tiny sizes: checks the script runs and agrees

A ring over P ranks does, on rank r, the kernel calls that :func:`cp_dtensor.positions.blocks.plan_blocks` plans
for r's zigzag shard against each visiting K/V block, merges each result with
:func:`cp_dtensor.local.merge.merge_into`, and in the backward accumulates the blocks' gradients in fp32.
Multi-rank NCCL needs several GPUs, so this script measures the kernels only: it runs all P virtual
ranks' calls one after another on one GPU (the shards are sliced beforehand, communication is left out)
and compares their summed time with ONE flash call on the whole sequence (the same
``cp_dtensor.local.kernels`` path, causal), forward and forward + backward, alternating A B A B, timed with
CUDA events. ``efficiency = time(full call) / time(sum of all ranks' blocks)``; the P ranks of a real
ring run in parallel, so the slowest rank's share (``max_rank_share``) is also reported (ideal 1 / P).
TFLOP/s count the useful causal work, ``4 B H S^2 D / 2`` forward and 2.5x that backward, for both.

Legend: ``B`` batch, ``H`` heads, ``S`` sequence length, ``D`` head dim.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from cp_dtensor.local.kernels import accum_dtype, block_backward, block_forward
from cp_dtensor.local.merge import merge_into
from cp_dtensor.positions.blocks import plan_blocks
from cp_dtensor.positions.layout import shard_runs

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Timer:
    """CUDA events on a GPU, ``perf_counter`` on CPU; ``elapsed()`` in seconds after ``stop()``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self.b.record()
        else:
            self.t1 = time.perf_counter()

    def elapsed(self) -> float:
        if self.cuda:
            self.b.synchronize()
            return self.a.elapsed_time(self.b) / 1e3
        return self.t1 - self.t0


def _shard(x: torch.Tensor, runs) -> torch.Tensor:
    return torch.cat([x[:, :, s : s + n] for s, n in runs], dim=2).contiguous()


class VirtualRing:
    """The P ranks' shards and the forward / backward work of each, on one device."""

    def __init__(self, q, k, v, dout, size: int, scale: float) -> None:
        seq_len = q.shape[2]
        self.size, self.scale = size, scale
        self.runs = [shard_runs(seq_len, size, r, "zigzag") for r in range(size)]
        self.q, self.k, self.v, self.dout = ([_shard(t, rr) for rr in self.runs] for t in (q, k, v, dout))
        self.plans = [
            [plan_blocks(self.runs[r], self.runs[(r - s) % size], True) for s in range(size)] for r in range(size)
        ]
        self.out: list[torch.Tensor] = [None] * size
        self.lse: list[torch.Tensor] = [None] * size

    def forward(self, r: int) -> None:
        """Rank ``r``'s forward: every step's block calls and merges."""
        q = self.q[r]
        acc = accum_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
        merged = torch.zeros(q.shape[2], dtype=torch.bool)  # as the ring: which rows have a block already
        for step, blocks in enumerate(self.plans[r]):
            src = (r - step) % self.size
            for blk in blocks:
                bo, bl = block_forward(
                    q[:, :, blk.q],
                    self.k[src][:, :, blk.kv],
                    self.v[src][:, :, blk.kv],
                    causal=blk.causal,
                    scale=self.scale,
                )
                merge_into(out[:, :, blk.q], lse[:, :, blk.q], bo, bl, first=not bool(merged[blk.q].any()))
                merged[blk.q] = True
        self.out[r], self.lse[r] = out.to(q.dtype), lse

    def backward(self, r: int, dk_acc: list[torch.Tensor], dv_acc: list[torch.Tensor]) -> torch.Tensor:
        """Rank ``r``'s backward: block gradients, dq kept, dk / dv added to the visiting block's fp32
        accumulator (as the ring's travelling accumulator does). Returns dq."""
        q, out, lse, dout = self.q[r], self.out[r], self.lse[r], self.dout[r]
        dq = torch.zeros(q.shape, dtype=accum_dtype(q.dtype), device=q.device)
        for step, blocks in enumerate(self.plans[r]):
            src = (r - step) % self.size
            for blk in blocks:
                dq_b, dk_b, dv_b = block_backward(
                    dout[:, :, blk.q],
                    q[:, :, blk.q],
                    self.k[src][:, :, blk.kv],
                    self.v[src][:, :, blk.kv],
                    out[:, :, blk.q],
                    lse[:, :, blk.q],
                    causal=blk.causal,
                    scale=self.scale,
                )
                dq[:, :, blk.q] += dq_b
                dk_acc[src][:, :, blk.kv] += dk_b
                dv_acc[src][:, :, blk.kv] += dv_b
        return dq

    def accumulators(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Fresh fp32 dk / dv accumulators, one per rank's block."""
        acc = accum_dtype(self.k[0].dtype)
        return (
            [torch.zeros(t.shape, dtype=acc, device=t.device) for t in self.k],
            [torch.zeros(t.shape, dtype=acc, device=t.device) for t in self.v],
        )


def causal_flops(b: int, h: int, s: int, d: int) -> tuple[float, float]:
    """Useful forward and backward FLOPs of causal attention (two matmuls, half the pairs; bwd 2.5x)."""
    fwd = 4.0 * b * h * s * s * d / 2
    return fwd, 2.5 * fwd


def measure(seq_len: int, size: int, args, device: torch.device) -> dict:
    """Alternate one full flash call and all virtual ranks' blocks; return timings and ratios."""
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (1, args.heads, seq_len, args.head_dim)
    q, k, v, dout = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(4))
    scale = args.head_dim**-0.5
    ring = VirtualRing(q, k, v, dout, size, scale)
    timer = Timer(device)
    rows = {"full_fwd": [], "full_bwd": [], "blocks_fwd": [], "blocks_bwd": [], "max_rank_fwd": [], "max_rank_bwd": []}

    def full():
        timer.start()
        out, lse = block_forward(q, k, v, causal=True, scale=scale)
        timer.stop()
        t_fwd = timer.elapsed()
        timer.start()
        grads = block_backward(dout, q, k, v, out, lse, causal=True, scale=scale)
        timer.stop()
        return t_fwd, timer.elapsed(), out, grads

    def blocks():
        per_fwd, per_bwd = [], []
        for r in range(size):
            timer.start()
            ring.forward(r)
            timer.stop()
            per_fwd.append(timer.elapsed())
        dk_acc, dv_acc = ring.accumulators()
        dqs = []
        for r in range(size):
            timer.start()
            dqs.append(ring.backward(r, dk_acc, dv_acc))
            timer.stop()
            per_bwd.append(timer.elapsed())
        return per_fwd, per_bwd, dqs, dk_acc, dv_acc

    # warm-up, and agreement of the merged blocks with the full call
    _, _, out_full, (dq_full, dk_full, dv_full) = full()
    _, _, dqs, dk_acc, dv_acc = blocks()
    err = {
        "out": max(
            (ring.out[r].float() - _shard(out_full, ring.runs[r]).float()).abs().max().item() for r in range(size)
        ),
        "dq": max((dqs[r] - _shard(dq_full, ring.runs[r]).float()).abs().max().item() for r in range(size)),
        "dk": max((dk_acc[r] - _shard(dk_full, ring.runs[r]).float()).abs().max().item() for r in range(size)),
        "dv": max((dv_acc[r] - _shard(dv_full, ring.runs[r]).float()).abs().max().item() for r in range(size)),
    }
    del out_full, dq_full, dk_full, dv_full, dqs, dk_acc, dv_acc
    for _ in range(args.repeats):
        t_fwd, t_bwd, *_ = full()
        rows["full_fwd"].append(t_fwd)
        rows["full_bwd"].append(t_bwd)
        per_fwd, per_bwd, *_ = blocks()
        rows["blocks_fwd"].append(sum(per_fwd))
        rows["blocks_bwd"].append(sum(per_bwd))
        rows["max_rank_fwd"].append(max(per_fwd))
        rows["max_rank_bwd"].append(max(per_bwd))
    fwd_flops, bwd_flops = causal_flops(*shape)

    def stats(xs):
        return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "n": len(xs)}

    full_fb = [a + b for a, b in zip(rows["full_fwd"], rows["full_bwd"])]
    blocks_fb = [a + b for a, b in zip(rows["blocks_fwd"], rows["blocks_bwd"])]
    max_fb = [a + b for a, b in zip(rows["max_rank_fwd"], rows["max_rank_bwd"])]
    return {
        "seq_len": seq_len,
        "P": size,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "dtype": args.dtype,
        "max_abs_err": err,
        "seconds": {name: stats(xs) for name, xs in rows.items()},
        "efficiency_fwd": stats([f / b for f, b in zip(rows["full_fwd"], rows["blocks_fwd"])]),
        "efficiency_fwd_bwd": stats([f / b for f, b in zip(full_fb, blocks_fb)]),
        "max_rank_share_fwd_bwd": stats([m / b for m, b in zip(max_fb, blocks_fb)]),
        "tflops_fwd_bwd_full": stats([(fwd_flops + bwd_flops) / t / 1e12 for t in full_fb]),
        "tflops_fwd_bwd_blocks": stats([(fwd_flops + bwd_flops) / t / 1e12 for t in blocks_fb]),
        "kernel_calls_per_rank": [sum(len(b) for b in plan) for plan in ring.plans],
    }


def table(results: list[dict]) -> str:
    """A plain-text table of the medians."""
    head = (
        f"{'seq':>7} {'P':>3} {'eff fwd':>8} {'eff fwd+bwd':>12} {'max-rank share':>15}"
        f" {'TFLOP/s full':>13} {'TFLOP/s blocks':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['seq_len']:>7} {r['P']:>3} {r['efficiency_fwd']['median']:>8.3f}"
            f" {r['efficiency_fwd_bwd']['median']:>12.3f}"
            f" {r['max_rank_share_fwd_bwd']['median']:>15.3f} {r['tflops_fwd_bwd_full']['median']:>13.1f}"
            f" {r['tflops_fwd_bwd_blocks']['median']:>15.1f}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dry-run", action="store_true", help="CPU, seq 512, heads 2, head_dim 16, fp32, 1 repeat")
    p.add_argument("--out", default=None, help="JSON file (default: bench/results/gpu_blocks.json on a GPU)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.seq, args.ranks, args.heads, args.head_dim, args.dtype, args.repeats = [512], [2, 4], 2, 16, "float32", 1
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("No GPU: run with --dry-run to check the script on CPU.")
    results = []
    for seq_len in args.seq:
        for size in args.ranks:
            results.append(measure(seq_len, size, args, device))
            print(
                f"seq {seq_len} P {size}: efficiency fwd+bwd {results[-1]['efficiency_fwd_bwd']['median']:.3f}"
                f" err {results[-1]['max_abs_err']}",
                flush=True,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(table(results))
    payload = {
        "benchmark": "gpu_blocks",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m bench.gpu_blocks" + (" --dry-run" if args.dry_run else ""),
        "results": results,
    }
    out = args.out or (None if args.dry_run else Path(__file__).parent / "results" / "gpu_blocks.json")
    if out:
        Path(out).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
