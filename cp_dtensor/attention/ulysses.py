"""Ulysses attention (DeepSpeed-Ulysses): trade the sequence shard for a head shard with all-to-all.

Note [Ulysses all-to-all]
-------------------------
Each of the ``n`` ranks of a group holds ``S`` tokens (its layout runs) of all ``H`` heads. One
all-to-all sends head group ``j`` (``H / n`` heads) of those tokens to rank ``j``; rank ``j`` then
holds ``H / n`` heads of all ``n * S`` tokens and attends over them with no further communication.
A second all-to-all brings the output back to the layout's token shards. For ``P = 2``, zigzag
(chunks ``c0 .. c3``, heads ``h0, h1``)::

    before: rank 0 [c0 c3] x [h0 h1]     rank 1 [c1 c2] x [h0 h1]
    after:  rank 0 [c0 c1 c2 c3] x [h0]  rank 1 [c0 c1 c2 c3] x [h1]

The gathered tokens are laid out in increasing global position (the zigzag order is undone in the
copy that assembles the received chunks, a copy the all-to-all needs anyway), so the local attention
is the plain single-sequence call: one fused block, causal or not, planned by
:func:`cp_dtensor.positions.blocks.plan_blocks`.

GQA: ``H_kv`` K/V heads are split the same way when ``n`` divides ``H_kv``. Otherwise each K/V head
is repeated ``r = n / gcd(H_kv, n)`` times (the fewest copies that give every rank whole heads:
``H_kv * r = lcm(H_kv, n)``), and autograd sums the copies' gradients back. With ``H_kv = 1`` that
is an all-gather of K/V carried by the all-to-all.

Hybrid attention (:mod:`cp_dtensor.attention.hybrid`) runs this exchange inside groups of ``u`` ranks and a
ring across the groups; pure Ulysses is the case of one group (a ring of one rank).

Legend: ``B`` batch, ``H`` query heads, ``H_kv`` K/V heads, ``S`` local sequence length, ``D`` head
dim, ``n`` ranks in the exchange, ``N`` suffix: one entry per rank on dim 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.profiler import record_function

from cp_dtensor.attention.registry import Strategy, register
from cp_dtensor.attention.ring import RingPlan, ring_backward, ring_forward
from cp_dtensor.comm.collectives import all_to_all
from cp_dtensor.local.kernels import accum_dtype
from cp_dtensor.local.logits import LogitSpec
from cp_dtensor.positions.layout import Run

if TYPE_CHECKING:
    from cp_dtensor.attention.call import AttentionCall
    from cp_dtensor.mesh.group import ContextParallelGroup

__all__ = [
    "ULYSSES",
    "HeadExchange",
    "HeadStrategy",
    "Ulysses",
    "check_heads",
    "head_logits",
    "heads_backward",
    "heads_forward",
    "kv_replication",
]


def kv_replication(num_kv_heads: int, size: int) -> int:
    """Copies of each K/V head that give each of ``size`` ranks whole heads: ``size / gcd(H_kv, size)``."""
    return size // math.gcd(num_kv_heads, size)


def check_heads(num_heads: int, size: int, axis: str) -> None:
    """Raise ``ValueError`` unless ``size`` ranks can split ``num_heads`` query heads evenly.

    Args:
        num_heads: Query heads ``H``.
        size: Ranks that split the heads.
        axis: How the caller names ``size`` in the message (``"the cp size"``, ``"ulysses_size"``).
    """
    if num_heads % size:
        raise ValueError(
            f"Ulysses splits the {num_heads} query heads over {axis} = {size} ranks, but {size} does not "
            f"divide {num_heads}. Use strategy='ring' (or 'allgather'), which works for any head count, "
            "or a size that divides the heads."
        )


@dataclass(frozen=True)
class HeadExchange:
    """The all-to-all of a group of ranks: token shards of all heads <-> all tokens of a head group.

    See Note [Ulysses all-to-all] in this module.

    Attributes:
        group: Process group of the exchange (``None`` for one rank).
        member_runs: The layout runs each rank of the group holds, in group-rank order.
    """

    group: dist.ProcessGroup | None
    member_runs: tuple[tuple[Run, ...], ...]

    @property
    def size(self) -> int:
        """Ranks in the exchange (``n``)."""
        return len(self.member_runs)

    @property
    def runs(self) -> list[Run]:
        """Runs of the gathered sequence after :meth:`to_heads`: the group's runs, sorted."""
        return sorted(run for runs in self.member_runs for run in runs)

    def _pieces(self) -> list[tuple[int, int, int, int]]:
        """``(member, local offset, gathered offset, length)`` of every run, in gathered order."""
        found = []
        for member, runs in enumerate(self.member_runs):
            offset = 0
            for start, length in runs:
                found.append((start, member, offset, length))
                offset += length
        pieces, gathered = [], 0
        for _, member, offset, length in sorted(found):
            pieces.append((member, offset, gathered, length))
            gathered += length
        return pieces

    def _is_identity(self) -> bool:
        return self.size == 1 and list(self.member_runs[0]) == self.runs

    def to_heads(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Exchange token shards for head shards; one all-to-all for all ``tensors``.

        Args:
            tensors: Local shards ``(B, H_i, S, D)`` with ``n`` dividing every ``H_i``.

        Returns:
            ``(B, H_i / n, n * S, D)`` each: this rank's head group, every token of the group in
            increasing global position (:attr:`runs`).
        """
        if self._is_identity():
            return list(tensors)
        n = self.size
        heads = [t.shape[1] // n for t in tensors]
        send_N = torch.cat([t.unflatten(1, (n, -1)).movedim(1, 0) for t in tensors], dim=2)  # (n, B, sum h, S, D)
        recv_N = all_to_all(send_N, self.group)  # entry m: rank m's tokens, this rank's heads
        pieces = [recv_N[m][:, :, off : off + length] for m, off, _, length in self._pieces()]
        return list(torch.cat(pieces, dim=2).split(heads, dim=1))

    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_heads` for one tensor.

        Args:
            x: ``(B, h, n * S, D)``: this rank's head group over the gathered tokens (:attr:`runs`).

        Returns:
            ``(B, n * h, S, D)``: all heads of this rank's tokens, in the layout's order.
        """
        return self.to_sequences([x])[0]

    def to_sequences(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`to_sequence` of each of ``tensors`` (same dtype), in one all-to-all."""
        if self._is_identity():
            return list(tensors)
        b, _, length_h, d = tensors[0].shape
        heads = [x.shape[1] for x in tensors]
        send_N = tensors[0].new_empty(self.size, b, sum(heads), length_h // self.size, d)  # (n, B, sum h, S, D)
        for member, offset, gathered, length in self._pieces():
            pieces = [x[:, :, gathered : gathered + length] for x in tensors]
            send_N[member, :, :, offset : offset + length] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)
        recv_N = all_to_all(send_N, self.group)  # entry m: head group m of this rank's tokens
        return [x_N.movedim(0, 1).flatten(1, 2) for x_N in recv_N.split(heads, dim=2)]


def heads_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, exchange: HeadExchange, plan: RingPlan
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """:func:`attend_over_heads` without autograd, keeping what :func:`heads_backward` needs.

    Args:
        q: Local queries ``(B, H, S, D)``.
        k: Local keys ``(B, H_kv, S, D)``.
        v: Local values ``(B, H_kv, S, D)``.
        exchange: The Ulysses group of this rank.
        plan: The ring over the groups.

    Returns:
        ``(out, lse_h, saved)``: ``out`` ``(B, H, S, D)``; ``lse_h`` ``(B, h, n * S)`` in the head frame
        (fp32, fp64 for fp64 inputs); ``saved`` the head-frame ``(q_h, k_h, v_h, out_h)``, or ``()``
        when the exchange is the identity (the inputs are then the head frame).
    """
    r = kv_replication(k.shape[1], exchange.size)
    if r > 1:
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
    with record_function("cp_dtensor.ulysses.to_heads"):
        q_h, k_h, v_h = exchange.to_heads([q, k, v])
    out_h, lse_h = ring_forward(q_h, k_h, v_h, plan)
    if exchange._is_identity():
        return out_h, lse_h, ()
    with record_function("cp_dtensor.ulysses.to_sequence"):
        return exchange.to_sequence(out_h), lse_h, (q_h, k_h, v_h, out_h)


def heads_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse_h: torch.Tensor,
    saved: tuple[torch.Tensor, ...],
    exchange: HeadExchange,
    plan: RingPlan,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`heads_forward`: ``dout`` to the head frame, the ring backward, back to tokens.

    Args:
        dout: Gradient of the local output ``(B, H, S, D)``.
        q: Local queries ``(B, H, S, D)``.
        k: Local keys ``(B, H_kv, S, D)``.
        v: Local values ``(B, H_kv, S, D)``.
        out: The forward's output ``(B, H, S, D)``.
        lse_h: The forward's head-frame log-sum-exp ``(B, h, n * S)``.
        saved: The forward's ``saved``.
        exchange: The Ulysses group of this rank.
        plan: The ring over the groups.

    Returns:
        ``(dq, dk, dv, dsinks)``: shaped like ``q``, ``k``, ``v``, the gradients of repeated K/V heads
        summed; ``dsinks`` ``(H,)`` this rank's share of the sinks' gradient (zero outside its head
        group), ``None`` without sinks.
    """
    q_h, k_h, v_h, out_h = saved or (q, k, v, out)
    (dout_h,) = exchange.to_heads([dout])
    dq_h, dk_h, dv_h, dsinks_h = ring_backward(dout_h, q_h, k_h, v_h, out_h, lse_h, plan)
    dq, dk, dv = exchange.to_sequences([dq_h, dk_h, dv_h])  # one all-to-all, as autograd does in eager mode
    r = kv_replication(k.shape[1], exchange.size)
    if r > 1:  # head i * r + j is copy j of K/V head i
        dk, dv = dk.unflatten(1, (-1, r)).sum(2), dv.unflatten(1, (-1, r)).sum(2)
    dsinks = None
    if dsinks_h is not None:  # this rank attended with heads head_offset .. head_offset + h - 1
        dsinks = dsinks_h.new_zeros(q.shape[1])
        offset = plan.logits.head_offset
        dsinks[offset : offset + len(dsinks_h)] = dsinks_h
    return dq, dk, dv, dsinks


def heads_fake(q: torch.Tensor, k: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``(lse_h, saved)`` of :func:`heads_forward` as empty tensors, for an exchange of ``size`` ranks.

    From shapes alone (they may be symbolic): an exchange of one rank is the identity and saves nothing.
    """
    acc = accum_dtype(q.dtype)
    if size == 1:
        return q.new_empty(q.shape[:3], dtype=acc), ()
    (b, h, s, d), h_kv = q.shape, k.shape[1] * kv_replication(k.shape[1], size)
    q_h, kv_h = q.new_empty(b, h // size, size * s, d), k.new_empty(b, h_kv // size, size * s, d)
    return q.new_empty(b, h // size, size * s, dtype=acc), (q_h, kv_h, torch.empty_like(kv_h), torch.empty_like(q_h))


def head_logits(call: AttentionCall, size: int, member: int) -> LogitSpec | None:
    """The call's logit spec for the head group of ``member`` of an exchange of ``size`` ranks."""
    if call.logits is None:
        return None
    heads = call.q.shape[1] // size
    return call.logits.for_heads(member * heads, heads)


class HeadStrategy(Strategy):
    """A strategy that exchanges token shards for head shards around a ring (Ulysses, hybrid).

    Subclasses plan a ``(HeadExchange, RingPlan)`` pair and say how many ranks exchange heads.
    """

    def forward(self, q, k, v, plan):
        """``(out, lse, saved)``: see :meth:`Strategy.forward <cp_dtensor.attention.registry.Strategy.forward>`."""
        return heads_forward(q, k, v, *plan)

    def backward(self, dout, q, k, v, out, lse, saved, plan):
        """``(dq, dk, dv, dsinks)``: see :meth:`Strategy.backward <cp_dtensor.attention.registry.Strategy.backward>`."""
        return heads_backward(dout, q, k, v, out, lse, saved, *plan)

    def exchange_size(self, cp_group: ContextParallelGroup) -> int:
        """Ranks that exchange heads in ``cp_group``."""
        raise NotImplementedError

    def fake(self, q, k, v, cp_group, options):
        """Empty ``(lse, saved)``: see :meth:`Strategy.fake <cp_dtensor.attention.registry.Strategy.fake>`."""
        return heads_fake(q, k, self.exchange_size(cp_group))


class Ulysses(HeadStrategy):
    """Ulysses over the whole cp axis: one all-to-all in, attention over all tokens of a head group, one back.

    See Note [Ulysses all-to-all]. The cp size ``P`` must divide ``H``.
    """

    name = "ulysses"
    function = "ulysses_attention"

    def exchange_size(self, cp_group: ContextParallelGroup) -> int:
        """Ranks that exchange heads in ``cp_group``."""
        return cp_group.size

    def plan(self, call: AttentionCall) -> tuple[HeadExchange, RingPlan]:
        """The plan of ``call``: see :meth:`Strategy.plan <cp_dtensor.attention.registry.Strategy.plan>`."""
        cp_group = call.cp_group
        check_heads(call.q.shape[1], cp_group.size, "the cp size")
        exchange = HeadExchange(
            group=cp_group.process_group if cp_group.size > 1 else None,
            member_runs=tuple(tuple(cp_group.runs(call.seq_len, r)) for r in range(cp_group.size)),
        )
        plan = RingPlan.one_rank(
            exchange.runs, exchange.runs, causal=call.causal, scale=call.scale, mask=call.mask,
            logits=head_logits(call, exchange.size, cp_group.rank),
        )  # fmt: skip
        return exchange, plan


ULYSSES = register(Ulysses())
