"""All-gather K/V attention (Llama 3's context parallelism): gather every key, keep the local queries.

Forward, for each group of K/V heads (``kv_heads_per_gather`` heads at a time, to cap the memory of
the gathered sequence; all heads at once by default):

1. all-gather the group's local K/V over the cp axis: ``(B, g, L, D)``, the ranks' shards
   concatenated in rank order (rank 0's runs, then rank 1's, ...);
2. the matching query heads attend to it in the blocks that
   ``plan_blocks(own runs, all ranks' runs, causal)`` plans, so causal masking follows the global
   positions of any layout without reordering the gathered K/V (see Note [Causal load balance] in
   :mod:`cp_dtensor.blocks`).

Backward, for each head group: gather K/V again (recomputed rather than kept, so the memory cap
holds in the backward too), accumulate ``dQ`` locally and ``dK``/``dV`` of the WHOLE sequence in
fp32, and reduce-scatter them: every rank receives the sum of all ranks' gradients for its shard.

It sends as many bytes as the ring (the reduce-scatter even one hop fewer), but exposes them: the
gather precedes the compute instead of overlapping it. Its strengths are simplicity, any mask over
the full key range, and small K/V under GQA.

Legend: ``B`` batch, ``H`` query heads, ``H_kv`` K/V heads, ``g`` K/V heads per gather, ``S`` local
sequence length, ``L = P * S``, ``D`` head dim, ``N`` suffix: one entry per rank on dim 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.profiler import record_function

from cp_dtensor.collectives import all_gather, group_size, reduce_scatter
from cp_dtensor.debug import check_call, recheck_output
from cp_dtensor.group import ContextParallelGroup
from cp_dtensor.kernels import accum_dtype, block_backward
from cp_dtensor.layout import Run
from cp_dtensor.masks import MaskSpec
from cp_dtensor.ring import Call, RingPlan, ring_forward
from cp_dtensor.sharding import from_local_like, local_inputs

__all__ = ["allgather_kv_attention"]


@dataclass(frozen=True)
class _GatherPlan:
    group: dist.ProcessGroup | None
    q_runs: list[Run]  # this rank's runs
    kv_runs: list[Run]  # every rank's runs, in rank order: the gathered K/V
    causal: bool
    scale: float
    kv_heads_per_gather: int
    mask: MaskSpec | None = None

    def one_step(self) -> RingPlan:
        """One rank's view of the gathered K/V: a ring of a single step plans (and masks) the blocks."""
        return RingPlan(None, 0, 1, self.q_runs, lambda _: self.kv_runs, self.causal, self.scale, self.mask)

    def head_groups(self, num_heads: int, num_kv_heads: int) -> list[tuple[slice, slice]]:
        """``(query heads, K/V heads)`` of each gather; each K/V head serves ``H / H_kv`` query heads."""
        per_kv = num_heads // num_kv_heads
        groups = []
        for start in range(0, num_kv_heads, self.kv_heads_per_gather):
            stop = min(start + self.kv_heads_per_gather, num_kv_heads)
            groups.append((slice(start * per_kv, stop * per_kv), slice(start, stop)))
        return groups


def _gather_kv(k: torch.Tensor, v: torch.Tensor, plan: _GatherPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, g, S, D)`` local K and V -> ``(B, g, P * S, D)`` each, ranks' shards in rank order."""
    kv_N = all_gather(torch.stack([k, v]), plan.group)  # (P, 2, B, g, S, D)
    kv = kv_N.permute(1, 2, 3, 0, 4, 5).flatten(3, 4)  # (2, B, g, P * S, D)
    return kv[0], kv[1]


def _attend_backward(dout, q, k, v, out, lse, calls: list[Call], scale: float):
    """Per-block backward over the gathered K/V: ``dq`` in ``q``'s dtype, ``dk``/``dv`` in fp32.

    Like :func:`cp_dtensor.ring.ring_backward` with one step, except that ``dk``/``dv`` stay in the
    accumulation dtype: the reduce-scatter sums them over the ranks before they are rounded.
    """
    acc = accum_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)  # (B, h, S, D)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)  # (B, g, P * S, D)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    for blk, mask in calls:
        dq_b, dk_b, dv_b = block_backward(
            dout[:, :, blk.q], q[:, :, blk.q], k[:, :, blk.kv], v[:, :, blk.kv],
            out[:, :, blk.q], lse[:, :, blk.q], causal=blk.causal, scale=scale, mask=mask,
        )
        dq[:, :, blk.q] += dq_b
        dk[:, :, blk.kv] += dk_b
        dv[:, :, blk.kv] += dv_b
    return dq.to(q.dtype), dk, dv


class _AllGatherKVAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _GatherPlan):
        one_step = plan.one_step()
        out = torch.empty_like(q)  # (B, H, S, D)
        lse = torch.empty(q.shape[:3], dtype=accum_dtype(q.dtype), device=q.device)  # (B, H, S)
        for q_heads, kv_heads in plan.head_groups(q.shape[1], k.shape[1]):
            with record_function("cp_dtensor.allgather.gather_kv"):
                k_full, v_full = _gather_kv(k[:, kv_heads], v[:, kv_heads], plan)
            with record_function("cp_dtensor.allgather.attend"):
                out[:, q_heads], lse[:, q_heads] = ring_forward(q[:, q_heads], k_full, v_full, one_step)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan: _GatherPlan = ctx.plan
        dout = dout.contiguous()
        calls, num_ranks = plan.one_step().calls(0), group_size(plan.group)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for q_heads, kv_heads in plan.head_groups(q.shape[1], k.shape[1]):
            with record_function("cp_dtensor.allgather.gather_kv"):
                k_full, v_full = _gather_kv(k[:, kv_heads], v[:, kv_heads], plan)
            with record_function("cp_dtensor.allgather.attend_backward"):
                dq[:, q_heads], dk_full, dv_full = _attend_backward(
                    dout[:, q_heads], q[:, q_heads], k_full, v_full, out[:, q_heads], lse[:, q_heads],
                    calls, plan.scale,
                )
            # (2, B, g, P * S, D) -> (P, 2, B, g, S, D): entry r is rank r's shard of the gradient
            dkv_N = torch.stack([dk_full, dv_full]).unflatten(3, (num_ranks, -1)).permute(3, 0, 1, 2, 4, 5)
            with record_function("cp_dtensor.allgather.reduce_scatter"):
                dkv = reduce_scatter(dkv_N, plan.group)  # (2, B, g, S, D), summed over ranks
            dk[:, kv_heads], dv[:, kv_heads] = dkv[0], dkv[1]
        return dq, dk, dv, None


def allgather_kv_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cp_group: ContextParallelGroup,
    *,
    causal: bool = False,
    scale: float | None = None,
    kv_heads_per_gather: int | None = None,
    document_ids: torch.Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    seq_len: int | None = None,
    validate: bool = False,
    debug_check: bool = False,
) -> torch.Tensor:
    """Exact attention over the whole sequence by all-gathering K/V; the queries stay local.

    Args:
        q: Local queries ``(B, H, S_local, D)`` (``cp_group.partition_sequence(q, seq_dim=2)``), or a
            DTensor sharded ``Shard(2)`` on the cp mesh, in natural order
            (``distribute_tensor``): moved into the layout and back, one all-to-all per tensor
            (see Note [Re-laying out a DTensor] in :mod:`cp_dtensor.sharding`).
        k: Local keys ``(B, H_kv, S_local, D)``; ``H_kv`` divides ``H`` (GQA); gathered un-expanded.
        v: Local values, same shape as ``k``.
        cp_group: The group from :func:`~cp_dtensor.init_context_parallel_group`, any layout.
        causal: Causal masking on GLOBAL positions.
        scale: Softmax scale; default ``D ** -0.5``.
        kv_heads_per_gather: K/V heads gathered at a time: the gathered buffers are
            ``2 * B * kv_heads_per_gather * L * D`` elements. Default: all ``H_kv`` at once.
        document_ids: Packed documents, as in :func:`cp_dtensor.ring_attention`.
        window: Sliding window ``(left, right)``, as in :func:`cp_dtensor.ring_attention`.
        seq_len: Real tokens of a padded sequence, as in :func:`cp_dtensor.ring_attention`.
        validate: Check that all ranks agree on the call first, as in :func:`cp_dtensor.ring_attention`.
        debug_check: Re-check the output against fp64 attention, as in :func:`cp_dtensor.ring_attention`.

    Returns:
        The local output ``(B, H, S_local, D)`` in ``q``'s dtype (a DTensor if ``q`` was one).
        Differentiable with respect to ``q``, ``k`` and ``v``.

    Raises:
        ValueError: ``kv_heads_per_gather`` is not a positive int, or as
            :func:`cp_dtensor.ring_attention`.
    """
    check_call("allgather_kv_attention", cp_group, q, k, v, validate=validate, debug_check=debug_check, causal=causal,
               scale=scale, kv_heads_per_gather=kv_heads_per_gather, document_ids=document_ids, window=window,
               seq_len=seq_len)
    q_l, k_l, v_l, like, total, scale, mask = local_inputs(
        q, k, v, cp_group, causal, scale, document_ids=document_ids, window=window, seq_len=seq_len
    )
    num_kv_heads = k_l.shape[1]
    if kv_heads_per_gather is None:
        kv_heads_per_gather = num_kv_heads
    if not isinstance(kv_heads_per_gather, int) or isinstance(kv_heads_per_gather, bool) or kv_heads_per_gather < 1:
        raise ValueError(
            f"kv_heads_per_gather must be a positive int (1 to H_kv = {num_kv_heads}) or None for all heads, "
            f"got {kv_heads_per_gather!r}."
        )
    plan = _GatherPlan(
        group=cp_group.process_group if cp_group.size > 1 else None,
        q_runs=cp_group.runs(total),
        kv_runs=[run for r in range(cp_group.size) for run in cp_group.runs(total, r)],
        causal=causal,
        scale=scale,
        kv_heads_per_gather=min(kv_heads_per_gather, num_kv_heads),
        mask=mask,
    )
    out = _AllGatherKVAttention.apply(q_l, k_l, v_l, plan)
    recheck_output("allgather_kv_attention", out, q_l, k_l, v_l, cp_group, debug_check=debug_check, scale=scale,
                   mask=mask)
    return from_local_like(out, like)
