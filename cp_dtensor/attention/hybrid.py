"""Hybrid attention (USP): Ulysses inside groups of ``u`` ranks, a ring across the ``P / u`` groups.

The cp axis of a group built with ``init_context_parallel_group(cp_size, ulysses_size=u)`` is the
flattened ``("ring", "ulysses")`` sub-mesh: cp rank ``g * u + m`` is rank ``m`` of Ulysses group
``g``. Attention then runs in three moves:

1. all-to-all inside the Ulysses group (see Note [Ulysses all-to-all] in :mod:`cp_dtensor.attention.ulysses`):
   each rank holds ``H / u`` heads of all the group's tokens, sorted by global position;
2. the ring of :mod:`cp_dtensor.attention.ring` across groups, on the ``"ring"`` axis: ring rank ``g`` starts
   with the K/V of its group's tokens, and :class:`~cp_dtensor.attention.ring.RingPlan` is given the group's
   runs (``q_runs``) and each peer group's runs (``kv_runs``) so that
   :func:`~cp_dtensor.positions.blocks.plan_blocks` masks causally on global positions;
3. all-to-all back to the layout's token shards.

``u = 1`` is the ring (the all-to-all is a no-op), ``u = P`` is Ulysses (a ring of one rank).
Putting the Ulysses group on consecutive ranks puts the all-to-all, the heavier collective, on the
fastest links (one node), and the ring's point-to-point sends across nodes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cp_dtensor.attention.registry import register
from cp_dtensor.attention.ring import RingPlan
from cp_dtensor.attention.ulysses import HeadExchange, HeadStrategy, check_heads, head_logits

if TYPE_CHECKING:
    from cp_dtensor.attention.call import AttentionCall
    from cp_dtensor.mesh.group import ContextParallelGroup

__all__ = ["HYBRID", "Hybrid"]


def _group_runs(cp_group: ContextParallelGroup, seq_len: int, group_index: int, u: int):
    """Runs of the ``u`` cp ranks of Ulysses group ``group_index``, in Ulysses-rank order."""
    return tuple(tuple(cp_group.runs(seq_len, group_index * u + m)) for m in range(u))


class Hybrid(HeadStrategy):
    """Ulysses inside groups of ``u`` consecutive cp ranks, a ring across the ``P / u`` groups (USP).

    Needs a group built with ``init_context_parallel_group(cp_size, ulysses_size=u)``; ``u`` must
    divide ``H``. See this module's docstring.
    """

    name = "hybrid"
    function = "hybrid_attention"

    def exchange_size(self, cp_group: ContextParallelGroup) -> int:
        """Ranks that exchange heads in ``cp_group``."""
        return cp_group.ulysses_size or 1

    def plan(self, call: AttentionCall) -> tuple[HeadExchange, RingPlan]:
        """The plan of ``call``: see :meth:`Strategy.plan <cp_dtensor.attention.registry.Strategy.plan>`."""
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
            logits=head_logits(call, u, cp_group.ulysses_mesh.get_local_rank()),
        )
        return exchange, plan


HYBRID = register(Hybrid())
