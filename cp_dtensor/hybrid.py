"""Hybrid attention (USP): Ulysses inside groups of ``u`` ranks, a ring across the ``P / u`` groups.

The cp axis of a group built with ``init_context_parallel_group(cp_size, ulysses_size=u)`` is the
flattened ``("ring", "ulysses")`` sub-mesh: cp rank ``g * u + m`` is rank ``m`` of Ulysses group
``g``. Attention then runs in three moves:

1. all-to-all inside the Ulysses group (see Note [Ulysses all-to-all] in :mod:`cp_dtensor.ulysses`):
   each rank holds ``H / u`` heads of all the group's tokens, sorted by global position;
2. the ring of :mod:`cp_dtensor.ring` across groups, on the ``"ring"`` axis: ring rank ``g`` starts
   with the K/V of its group's tokens, and :class:`~cp_dtensor.ring.RingPlan` is given the group's
   runs (``q_runs``) and each peer group's runs (``kv_runs``) so that
   :func:`~cp_dtensor.blocks.plan_blocks` masks causally on global positions;
3. all-to-all back to the layout's token shards.

``u = 1`` is the ring (the all-to-all is a no-op), ``u = P`` is Ulysses (a ring of one rank).
Putting the Ulysses group on consecutive ranks puts the all-to-all, the heavier collective, on the
fastest links (one node), and the ring's point-to-point sends across nodes.
"""

from __future__ import annotations

import torch

from cp_dtensor.call import AttentionCall, run_strategy
from cp_dtensor.group import ContextParallelGroup
from cp_dtensor.ring import RingPlan
from cp_dtensor.ulysses import HeadExchange, attend_over_heads, check_heads

__all__ = ["hybrid_attention"]


def _group_runs(cp_group: ContextParallelGroup, seq_len: int, group_index: int, u: int):
    """Runs of the ``u`` cp ranks of Ulysses group ``group_index``, in Ulysses-rank order."""
    return tuple(tuple(cp_group.runs(seq_len, group_index * u + m)) for m in range(u))


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cp_group: ContextParallelGroup,
    *,
    causal: bool = False,
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    seq_len: int | None = None,
    validate: bool = False,
    debug_check: bool = False,
) -> torch.Tensor:
    """Exact attention: Ulysses all-to-all within groups of ``u`` ranks, ring attention across groups.

    Args:
        q: Local queries ``(B, H, S_local, D)`` (``cp_group.partition_sequence(q, seq_dim=2)``), or a
            DTensor sharded ``Shard(2)`` on the cp mesh, in natural order
            (``distribute_tensor``): moved into the layout and back, one all-to-all per tensor
            (see Note [Re-laying out a DTensor] in :mod:`cp_dtensor.sharding`). ``u`` must divide ``H``.
        k: Local keys ``(B, H_kv, S_local, D)``; ``H_kv`` divides ``H`` (GQA). If ``u`` does not
            divide ``H_kv`` the K/V heads are repeated ``u / gcd(H_kv, u)`` times.
        v: Local values, same shape as ``k``.
        cp_group: A group built with ``init_context_parallel_group(cp_size, ulysses_size=u)``.
        causal: Causal masking on GLOBAL positions.
        scale: Softmax scale; default ``D ** -0.5``.
        document_ids: Packed documents, as in :func:`cp_dtensor.ring_attention`.
        window: Sliding window ``(left, right)``, as in :func:`cp_dtensor.ring_attention`.
        seq_len: Real tokens of a padded sequence, as in :func:`cp_dtensor.ring_attention`.
        validate: Check that all ranks agree on the call first, as in :func:`cp_dtensor.ring_attention`.
        debug_check: Re-check the output against fp64 attention, as in :func:`cp_dtensor.ring_attention`.

    Returns:
        The local output ``(B, H, S_local, D)`` in ``q``'s dtype (a DTensor if ``q`` was one).
        Differentiable with respect to ``q``, ``k`` and ``v``.

    Raises:
        ValueError: ``cp_group`` has no Ulysses axis, ``u`` does not divide ``H``, or as
            :func:`cp_dtensor.ring_attention`.
    """
    return run_strategy(
        "hybrid_attention",
        _attend,
        q,
        k,
        v,
        cp_group,
        causal=causal,
        scale=scale,
        document_ids=document_ids,
        window=window,
        seq_len=seq_len,
        validate=validate,
        debug_check=debug_check,
    )


def _attend(call: AttentionCall) -> torch.Tensor:
    return attend_over_heads(call.q, call.k, call.v, *_make_plan(call))


def _make_plan(call: AttentionCall) -> tuple[HeadExchange, RingPlan]:
    cp_group, total = call.cp_group, call.seq_len
    u = cp_group.ulysses_size
    if u is None:
        raise ValueError(
            "hybrid attention needs a cp group with a Ulysses axis: build it with "
            "init_context_parallel_group(cp_size, ulysses_size=u), u dividing cp_size and the heads "
            "(u=1 is the ring, u=cp_size is Ulysses)."
        )
    check_heads(call.q.shape[1], u, "ulysses_size")
    ring_size, ring_rank = cp_group.ring_mesh.size(), cp_group.ring_mesh.get_local_rank()
    assert cp_group.rank == ring_rank * u + cp_group.ulysses_mesh.get_local_rank(), "Ulysses groups are consecutive"
    exchange = HeadExchange(
        group=cp_group.ulysses_mesh.get_group() if u > 1 else None,
        member_runs=_group_runs(cp_group, total, ring_rank, u),
    )
    plan = RingPlan(
        group=cp_group.ring_mesh.get_group() if ring_size > 1 else None,
        rank=ring_rank,
        size=ring_size,
        q_runs=exchange.runs,
        kv_runs=lambda src: HeadExchange(None, _group_runs(cp_group, total, src, u)).runs,
        causal=call.causal,
        scale=call.scale,
        mask=call.mask,
    )
    return exchange, plan
