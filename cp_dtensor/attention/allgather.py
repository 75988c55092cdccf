"""All-gather K/V attention (Llama 3's context parallelism): gather every key, keep the local queries.

Forward, for each group of K/V heads (``kv_heads_per_gather`` heads at a time, to cap the memory of
the gathered sequence; all heads at once by default):

1. all-gather the group's local K/V over the cp axis: ``(B, g, L, D)``, the ranks' shards
   concatenated in rank order (rank 0's runs, then rank 1's, ...);
2. the matching query heads attend to it in the blocks that
   ``plan_blocks(own runs, all ranks' runs, causal)`` plans, so causal masking follows the global
   positions of any layout without reordering the gathered K/V (see Note [Causal load balance] in
   :mod:`cp_dtensor.positions.blocks`).

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
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.profiler import record_function

from cp_dtensor.attention.registry import Strategy, register
from cp_dtensor.attention.ring import RingPlan
from cp_dtensor.comm.collectives import all_gather, group_size, reduce_scatter
from cp_dtensor.local.block_loop import backward_blocks, forward_blocks
from cp_dtensor.local.kernels import accum_dtype
from cp_dtensor.local.logits import BoundLogits, LogitSpec
from cp_dtensor.local.merge import add_sinks, sink_grad
from cp_dtensor.positions.layout import Run
from cp_dtensor.positions.masks import MaskSpec, positions
from cp_dtensor.positions.tiles import KernelCall

if TYPE_CHECKING:
    from cp_dtensor.attention.call import AttentionCall

__all__ = ["ALLGATHER", "AllGatherKV", "AllGatherOptions", "allgather_backward", "allgather_forward"]


@dataclass(frozen=True)
class _GatherPlan:
    group: dist.ProcessGroup | None
    q_runs: list[Run]  # this rank's runs
    kv_runs: list[Run]  # every rank's runs, in rank order: the gathered K/V
    causal: bool
    scale: float
    kv_heads_per_gather: int
    mask: MaskSpec | None = None
    logits: LogitSpec | None = None

    def bound_logits(self, q_heads: slice) -> BoundLogits | None:
        """The logit spec of the query heads ``q_heads`` at the positions of the local and the gathered tokens."""
        if self.logits is None or not self.logits.tiled:
            return None
        heads = self.logits.for_heads(q_heads.start, q_heads.stop - q_heads.start)
        return heads.bind(positions(self.q_runs), positions(self.kv_runs))

    @property
    def sinks(self) -> torch.Tensor | None:
        """The sink logits ``(H,)``, or ``None``."""
        return None if self.logits is None else self.logits.sinks

    def calls(self) -> list[KernelCall]:
        """The kernel calls of the local queries against the gathered K/V (a ring of one rank plans them)."""
        one_rank = RingPlan.one_rank(self.q_runs, self.kv_runs, causal=self.causal, scale=self.scale, mask=self.mask)
        return one_rank.calls(0)

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


def allgather_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _GatherPlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on local tensors.

    Returns:
        ``(out, lse)``: ``out`` ``(B, H, S, D)`` in ``q``'s dtype, ``lse`` ``(B, H, S)`` in fp32 (fp64 for fp64).
    """
    calls, acc = plan.calls(), accum_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)  # (B, H, S, D)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)  # (B, H, S)
    for q_heads, kv_heads in plan.head_groups(q.shape[1], k.shape[1]):
        with record_function("cp_dtensor.allgather.gather_kv"):
            k_full, v_full = _gather_kv(k[:, kv_heads], v[:, kv_heads], plan)
        with record_function("cp_dtensor.allgather.attend"):
            merged = torch.zeros(q.shape[2], dtype=torch.bool)  # host: rows merged into (see forward_blocks)
            out_h, lse_h = out[:, q_heads], lse[:, q_heads]
            forward_blocks(
                q[:, q_heads], k_full, v_full, calls, plan.scale, out_h, lse_h, merged, plan.bound_logits(q_heads)
            )
    if plan.sinks is not None:  # one correction after every block: Note [Attention sinks] in local/merge.py
        add_sinks(out, lse, plan.sinks)
    return out.to(q.dtype), lse


def allgather_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    plan: _GatherPlan,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward on local tensors (shapes as in :func:`allgather_forward`).

    Returns:
        ``(dq, dk, dv, dsinks)``: as :func:`cp_dtensor.attention.ring.ring_backward`.
    """
    dout = dout.contiguous()
    calls, num_ranks, acc = plan.calls(), group_size(plan.group), accum_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)  # (B, H, S, D)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    for q_heads, kv_heads in plan.head_groups(q.shape[1], k.shape[1]):
        with record_function("cp_dtensor.allgather.gather_kv"):
            k_full, v_full = _gather_kv(k[:, kv_heads], v[:, kv_heads], plan)
        # dK/dV of the whole sequence stay in fp32 until the reduce-scatter has summed the ranks' shares
        dk_full = torch.zeros(k_full.shape, dtype=acc, device=k.device)  # (B, g, L, D)
        dv_full = torch.zeros(v_full.shape, dtype=acc, device=v.device)
        with record_function("cp_dtensor.allgather.attend_backward"):
            backward_blocks(
                dout[:, q_heads],
                q[:, q_heads],
                k_full,
                v_full,
                out[:, q_heads],
                lse[:, q_heads],
                calls,
                plan.scale,
                (dq[:, q_heads], dk_full, dv_full),
                plan.bound_logits(q_heads),
            )
        # (2, B, g, P * S, D) -> (P, 2, B, g, S, D): entry r is rank r's shard of the gradient
        dkv_N = torch.stack([dk_full, dv_full]).unflatten(3, (num_ranks, -1)).permute(3, 0, 1, 2, 4, 5)
        with record_function("cp_dtensor.allgather.reduce_scatter"):
            dkv = reduce_scatter(dkv_N, plan.group)  # (2, B, g, S, D), summed over ranks
        dk[:, kv_heads], dv[:, kv_heads] = dkv[0], dkv[1]
    dsinks = None if plan.sinks is None else sink_grad(dout, out, lse, plan.sinks)
    return dq.to(q.dtype), dk, dv, dsinks


@dataclass(frozen=True)
class AllGatherOptions:
    """The all-gather strategy's own keyword arguments.

    Attributes:
        kv_heads_per_gather: K/V heads gathered at a time: the gathered buffers are
            ``2 * B * kv_heads_per_gather * L * D`` elements. ``None`` (default): all ``H_kv`` at once.
    """

    kv_heads_per_gather: int | None = None


class AllGatherKV(Strategy):
    """All-gather K/V (Llama 3's context parallelism) as a :class:`~cp_dtensor.attention.registry.Strategy`."""

    name = "allgather"
    function = "allgather_kv_attention"
    Options = AllGatherOptions

    def plan(self, call: AttentionCall) -> _GatherPlan:
        """The plan of ``call``: see :meth:`Strategy.plan <cp_dtensor.attention.registry.Strategy.plan>`."""
        cp_group, num_kv_heads = call.cp_group, call.k.shape[1]
        per_gather = call.options.kv_heads_per_gather
        if per_gather is None:
            per_gather = num_kv_heads
        if not isinstance(per_gather, int) or isinstance(per_gather, bool) or per_gather < 1:
            raise ValueError(
                f"kv_heads_per_gather must be a positive int (1 to H_kv = {num_kv_heads}) or None for all heads, "
                f"got {per_gather!r}."
            )
        return _GatherPlan(
            group=cp_group.process_group if cp_group.size > 1 else None,
            q_runs=cp_group.runs(call.seq_len),
            kv_runs=[run for r in range(cp_group.size) for run in cp_group.runs(call.seq_len, r)],
            causal=call.causal,
            scale=call.scale,
            kv_heads_per_gather=min(per_gather, num_kv_heads),
            mask=call.mask,
            logits=call.logits,
        )

    def forward(self, q, k, v, plan):
        """``(out, lse, saved)``: see :meth:`Strategy.forward <cp_dtensor.attention.registry.Strategy.forward>`."""
        return (*allgather_forward(q, k, v, plan), ())

    def backward(self, dout, q, k, v, out, lse, saved, plan):
        """``(dq, dk, dv, dsinks)``: see :meth:`Strategy.backward <cp_dtensor.attention.registry.Strategy.backward>`."""
        return allgather_backward(dout, q, k, v, out, lse, plan)


ALLGATHER = register(AllGatherKV())
