"""The production path on one GPU (NCCL, one rank) against fp64 full attention: every strategy, masks, dtypes.

    torchrun --standalone --nproc-per-node 1 -m bench.gpu_check              # CUDA + NCCL
    torchrun --standalone --nproc-per-node 1 -m bench.gpu_check --cpu        # the same checks on CPU + gloo

One GPU cannot run a multi-rank NCCL ring (NCCL refuses two ranks on one device), so the ring's
communication is tested on CPU ranks (tests/); this script checks what only a GPU exercises: the CUDA
kernels inside the production path (flash for fp16/bf16, memory-efficient for fp32, the explicit
per-tile path for masked tiles), device placement of masks and positions, NCCL set-up through
:func:`~cp_dtensor.init_context_parallel_group`, and the module and model on CUDA. Each case runs
``context_parallel_attention`` forward and backward and compares output and gradients with
:func:`cp_dtensor.reference.full_attention` in fp64 on the same inputs under the same dense mask.

Tolerances, relative to the largest reference value: fp32 ``1e-5`` (TF32 is off; summation order
only), bf16 ``2e-2`` (8 mantissa bits), fp16 ``4e-3`` (11 bits). Exits 1 on the first failure.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

import cp_dtensor.reference as reference
from cp_dtensor import ContextParallelAttention, context_parallel_attention, init_context_parallel_group
from cp_dtensor.attention.api import STRATEGIES

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float64: 1e-10}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (0 when both are 0)."""
    scale = want.abs().max().item()
    return (got.double().cpu() - want).abs().max().item() / (scale or 1.0)


def check_case(group, device, *, strategy, dtype, causal, mask, seq, heads=(4, 2), dim=64) -> float:
    """One attention call forward + backward against the fp64 oracle; returns the worst relative error."""
    h, h_kv = heads
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, h, seq, dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, h_kv, seq, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(2, h, seq, dim, generator=gen, dtype=torch.float64)
    kwargs = {}
    if mask == "documents":
        lengths = [max(1, n * seq // 1024) for n in (100, 7, 300, 500, 117)]  # shorter and longer than a tile
        kwargs["document_ids"] = reference.document_ids_from_lengths(lengths, seq)[None].expand(2, seq)
    elif mask == "window":
        kwargs["window"] = (127, 0)
    leaves = [x.to(device, dtype).requires_grad_() for x in (q, k, v)]
    attn_kw = {n: (t.to(device) if torch.is_tensor(t) else t) for n, t in kwargs.items()}
    out = context_parallel_attention(*leaves, group, strategy=strategy, causal=causal, **attn_kw)
    out.backward(dout.to(device, dtype))
    dense = reference.make_mask(2, seq, causal=causal, **kwargs).dense(seq)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want = reference.full_attention(*ref_leaves, mask=dense)
    want_grads = torch.autograd.grad(want, ref_leaves, dout)
    errs = [rel_err(out.detach(), want.detach())] + [rel_err(x.grad, g) for x, g in zip(leaves, want_grads)]
    assert all(torch.isfinite(x).all() for x in (out, *(leaf.grad for leaf in leaves)))
    return max(errs)


def check_module(group, device, dtype) -> float:
    """ContextParallelAttention on the device vs the same weights in fp64 on CPU (RoPE, GQA, causal)."""
    torch.manual_seed(0)
    module = ContextParallelAttention(128, 8, group, num_kv_heads=2, causal=True).double()
    x = torch.randn(2, 512, 128, dtype=torch.float64)
    want = module(x)
    got = module.to(device, dtype)(x.to(device, dtype))
    return rel_err(got.detach(), want.detach())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run on CPU with gloo (to check the script itself)")
    p.add_argument("--seq", type=int, default=None, help="tokens per case (default 1024 on GPU, 512 on CPU)")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device_type = "cpu" if args.cpu else "cuda"
    group = init_context_parallel_group(1, device_type=device_type)
    hybrid_group = init_context_parallel_group(1, device_type=device_type, ulysses_size=1)
    device = torch.device("cpu") if args.cpu else torch.device("cuda", torch.cuda.current_device())
    name = "cpu" if args.cpu else torch.cuda.get_device_name()
    print(f"gpu_check on {name}, torch {torch.__version__}, backend {dist.get_backend()}", flush=True)
    seq = args.seq or (512 if args.cpu else 1024)
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if not args.cpu else [])
    failures = 0
    for strategy in STRATEGIES:
        for dtype in dtypes:
            for causal, mask in ((True, None), (False, None), (True, "documents"), (True, "window")):
                g = hybrid_group if strategy == "hybrid" else group
                err = check_case(g, device, strategy=strategy, dtype=dtype, causal=causal, mask=mask, seq=seq)
                ok = err <= TOLERANCE[dtype]
                failures += not ok
                print(
                    f"{'ok ' if ok else 'FAIL'} {strategy:9s} {str(dtype):15s} causal={causal!s:5s} "
                    f"mask={mask!s:9s} rel err {err:.2e} (tol {TOLERANCE[dtype]:.0e})",
                    flush=True,
                )
    for dtype in dtypes:
        err = check_module(group, device, dtype)
        ok = err <= 5 * TOLERANCE[dtype]  # one more rounding per projection and RoPE
        failures += not ok
        print(f"{'ok ' if ok else 'FAIL'} ContextParallelAttention {dtype}: rel err {err:.2e}", flush=True)
    print(f"gpu_check: {failures} failure(s)")
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
