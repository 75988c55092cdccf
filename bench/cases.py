"""One attention call, timed the same way for every contender: a CP strategy on every rank, or one
process's fused SDPA on the whole sequence (the baseline every cost is divided by).

Legend: ``B`` batch, ``H`` heads, ``S`` sequence length (``S_local`` on a rank), ``D`` head dim.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from bench.harness import DTYPES, PeakRSS, Stopwatch, barrier, gather_objects, make_inputs, rank
from bench.instrument import kernel_time

# Extra arguments of init_context_parallel_group that a strategy needs (applied when accepted).
GROUP_KWARGS: dict[str, dict[str, int]] = {"hybrid": {"ulysses_size": 2}}


@dataclass(frozen=True)
class Case:
    """One attention problem.

    Attributes:
        seq_len: Global sequence length ``S``.
        heads: Query (and K/V) heads ``H``.
        head_dim: ``D``.
        causal: Causal masking.
        dtype: ``"float32"``, ``"bfloat16"``...
        batch: ``B``.
        seed: Seed of the inputs (see :func:`bench.harness.make_tensor`).
    """

    seq_len: int
    heads: int = 8
    head_dim: int = 64
    causal: bool = True
    dtype: str = "float32"
    batch: int = 1
    seed: int = 0

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Global ``(B, H, S, D)``."""
        return (self.batch, self.heads, self.seq_len, self.head_dim)

    def inputs(self, runs) -> dict[str, torch.Tensor]:
        """``q``, ``k``, ``v``, ``dout`` at the given runs of positions."""
        return make_inputs(self.shape, runs, seed=self.seed, dtype=DTYPES[self.dtype])

    def full_inputs(self) -> dict[str, torch.Tensor]:
        """The whole sequence (the single-process baseline's inputs)."""
        return self.inputs([(0, self.seq_len)])

    def as_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)


def strategy_groups(cp_size: int, names, layout: str = "zigzag") -> dict[str, object]:
    """A :class:`~cp_dtensor.ContextParallelGroup` per strategy name, or the error that prevented it."""
    from cp_dtensor import init_context_parallel_group

    accepted = inspect.signature(init_context_parallel_group).parameters
    base = init_context_parallel_group(cp_size=cp_size, layout=layout, device_type="cpu")
    groups: dict[str, object] = {}
    for name in names:
        extra = {k: v for k, v in GROUP_KWARGS.get(name, {}).items() if k in accepted}
        try:
            groups[name] = (
                init_context_parallel_group(cp_size=cp_size, layout=layout, device_type="cpu", **extra)
                if extra
                else base
            )
        except ValueError as err:  # e.g. a ulysses_size that does not divide cp_size
            groups[name] = f"{type(err).__name__}: {err}"
    return groups


def _leaves(inp: dict[str, torch.Tensor], backward: bool) -> list[torch.Tensor]:
    return [inp[n].detach().clone().requires_grad_(backward) for n in "qkv"]


def time_call(
    fn: Callable[..., torch.Tensor],
    args: tuple,
    inp: dict[str, torch.Tensor],
    *,
    backward: bool,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    memory: bool = False,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Run ``fn(q, k, v, *args)`` (and its backward) once on this rank and time it.

    ``context()`` is entered around the forward and the backward, outside the timed region (for a
    peer that patches torch while it runs, see :mod:`bench.torch_cp_adapter`). With ``memory``, the
    peak resident memory above the start is recorded too (:class:`bench.harness.PeakRSS`).

    Returns:
        ``(timing, result)``: CPU and wall seconds of the forward and of forward + backward, the block
        kernels' thread seconds; ``result`` holds ``out`` and, with ``backward``, ``dq``, ``dk``, ``dv``.
    """
    q, k, v = _leaves(inp, backward)
    dout = inp["dout"]
    rss = PeakRSS() if memory else contextlib.nullcontext()
    with context(), torch.set_grad_enabled(backward), kernel_time() as kt:
        barrier()
        with rss:
            watch = Stopwatch()
            out = fn(q, k, v, *args)
            fwd_cpu, fwd_wall = watch.lap()
            if backward:
                out.backward(dout)
            cpu, wall = watch.lap()
            main_cpu = watch.thread()
    timing = {
        "fwd_cpu": fwd_cpu,
        "fwd_wall": fwd_wall,
        "cpu": cpu,
        "wall": wall,
        "main_thread_cpu": main_cpu,
        "kernel_fwd": kt.seconds["fwd"],
        "kernel_bwd": kt.seconds["bwd"],
        "kernel_calls": sum(kt.calls.values()),
    }
    if memory:
        timing["peak_rss_bytes"] = rss.peak_bytes
        timing["rss_start_bytes"] = rss.start_bytes
    result = {"out": out.detach()}
    if backward:
        result.update(dq=q.grad, dk=k.grad, dv=v.grad)
    return timing, result


def cp_call(fn: Callable[..., torch.Tensor], group, causal: bool) -> Callable[..., torch.Tensor]:
    """``fn`` as a function of ``(q, k, v)`` only."""
    return lambda q, k, v: fn(q, k, v, group, causal=causal)


def sdpa(causal: bool) -> Callable[..., torch.Tensor]:
    """One process's fused SDPA (the CPU flash kernel) on the whole sequence."""
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def time_baseline(case: Case, full: dict[str, torch.Tensor] | None, *, backward: bool):
    """Fused SDPA on the whole sequence on rank 0 while the other ranks wait; ``(timing, result)``
    on rank 0, ``(None, None)`` elsewhere."""
    barrier()
    timing = result = None
    if rank() == 0:
        q, k, v = _leaves(full, backward)
        with torch.set_grad_enabled(backward):
            watch = Stopwatch()
            out = sdpa(case.causal)(q, k, v)
            fwd_cpu, fwd_wall = watch.lap()
            if backward:
                out.backward(full["dout"])
            cpu, wall = watch.lap()
        timing = {"fwd_cpu": fwd_cpu, "fwd_wall": fwd_wall, "cpu": cpu, "wall": wall}
        result = {"out": out.detach()}
        if backward:
            result.update(dq=q.grad, dk=k.grad, dv=v.grad)
    barrier()
    return timing, result


def aggregate(per_rank: list[dict[str, float]]) -> dict[str, object]:
    """Sum of CPU seconds, slowest rank's wall seconds, kernel max / mean over the ranks."""
    kernels = [r["kernel_fwd"] + r["kernel_bwd"] for r in per_rank]
    mean_kernel = sum(kernels) / len(kernels)
    return {
        "cpu_sum": sum(r["cpu"] for r in per_rank),
        "fwd_cpu_sum": sum(r["fwd_cpu"] for r in per_rank),
        "wall_max": max(r["wall"] for r in per_rank),
        "fwd_wall_max": max(r["fwd_wall"] for r in per_rank),
        "kernel_sum": sum(kernels),
        "kernel_fwd_sum": sum(r["kernel_fwd"] for r in per_rank),
        "kernel_max_over_mean": max(kernels) / mean_kernel if mean_kernel > 0 else None,
        "main_thread_cpu_sum": sum(r.get("main_thread_cpu", float("nan")) for r in per_rank),
        "per_rank": per_rank,
    }


def gather_full(group, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's outputs / gradients put back in global order (on every rank)."""
    return {name: group.gather_sequence(t.contiguous(), seq_dim=2) for name, t in local.items()}


def max_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max absolute difference per tensor name present in both."""
    return {n: (got[n].double() - want[n].double()).abs().max().item() for n in want if n in got}


def gathered_errors(group, local: dict[str, torch.Tensor], want: dict[str, torch.Tensor] | None):
    """Gather a strategy's local results and compare them with rank 0's baseline (rank 0 gets the dict)."""
    full = gather_full(group, local)
    errors = max_errors(full, want) if rank() == 0 else None
    return gather_objects(errors)[0]
