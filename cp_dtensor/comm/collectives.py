"""Byte-counted collectives: all-to-all, all-gather, reduce-scatter, and the layout exchange.

The first three serve the strategies that are not a ring; :func:`relayout` is the uneven all-to-all
that moves a sequence from one layout to another (DTensor inputs, see :mod:`cp_dtensor.mesh.sharding`).

Each wrapper calls one ``torch.distributed`` collective and reports the bytes this rank sends to
:func:`cp_dtensor.comm.record_comm`, so that :func:`cp_dtensor.count_comm` sees every strategy the
same way. The tensors they take are stacked by peer: dim 0 has one entry per rank of the group.

Note [Bytes sent]
-----------------
"Bytes sent" by a rank is the payload that leaves the rank: bytes destined for itself never count.
For the point-to-point ring that is every block it passes on. For the collectives it is what the
bandwidth-optimal algorithms (ring or direct) put on this rank's outgoing link, for a group of ``n``
ranks:

=================  ==================================  ==========================================
collective         input on each rank                  bytes sent per rank
=================  ==================================  ==========================================
all-to-all         ``n`` chunks of ``c`` bytes         ``(n - 1) * c`` (one chunk to each peer)
all-gather         one chunk of ``c`` bytes            ``(n - 1) * c`` (each chunk reaches ``n - 1`` peers)
reduce-scatter     ``n`` chunks of ``c`` bytes         ``(n - 1) * c`` (every peer's share, once)
ring send          a block of ``c`` bytes              ``c`` per step
=================  ==================================  ==========================================

The same counts hold for the direct and the ring algorithm of each collective, so they describe
the data, not the library's choice. A group of one rank sends nothing and records nothing.
:mod:`cp_dtensor.estimate.comm_model` predicts these numbers; the tests compare them with what the
strategies record.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from cp_dtensor.comm.counter import record_comm
from cp_dtensor.positions.layout import Layout, Piece, relayout_pieces

__all__ = ["all_to_all", "all_to_all_rows", "all_gather", "reduce_scatter", "relayout", "group_size"]


def group_size(group: dist.ProcessGroup | None) -> int:
    """Number of ranks of ``group`` (``None`` stands for a group of one rank)."""
    return 1 if group is None else dist.get_world_size(group)


def _chunk_bytes(x_N: torch.Tensor) -> int:
    return x_N[0].numel() * x_N.element_size()


def _all_to_all(x_N: torch.Tensor, group: dist.ProcessGroup | None, op_name: str) -> torch.Tensor:
    n = group_size(group)
    assert x_N.shape[0] == n, f"all_to_all wants one chunk per rank on dim 0: {x_N.shape[0]} != {n}"
    if n == 1:
        return x_N
    x_N = x_N.contiguous()
    out_N = torch.empty_like(x_N)
    dist.all_to_all_single(out_N, x_N, group=group)
    record_comm(op_name, (n - 1) * _chunk_bytes(x_N))
    return out_N


class _AllToAll(torch.autograd.Function):
    """All-to-all whose backward is the same all-to-all of the gradient (it is its own inverse)."""

    @staticmethod
    def forward(ctx, x_N, group, op_name):
        ctx.group, ctx.op_name = group, op_name
        return _all_to_all(x_N, group, op_name)

    @staticmethod
    def backward(ctx, grad_N):
        return _all_to_all(grad_N, ctx.group, ctx.op_name), None, None


def all_to_all(x_N: torch.Tensor, group: dist.ProcessGroup | None, *, op_name: str = "all_to_all") -> torch.Tensor:
    """Send chunk ``i`` of ``x_N`` to rank ``i`` of ``group``; receive chunk ``i`` from rank ``i``.

    Differentiable: the backward sends the gradient chunks back the same way (and counts them).

    Args:
        x_N: ``(n, ...)``: one chunk per rank of the group along dim 0.
        group: Process group of ``n`` ranks, or ``None`` for a group of one (returns ``x_N``).
        op_name: Name the bytes are reported under; see Note [Bytes sent].

    Returns:
        ``(n, ...)``, same shape and dtype: entry ``i`` is what rank ``i`` sent to this rank.
    """
    return _AllToAll.apply(x_N, group, op_name)


def all_to_all_rows(
    x: torch.Tensor,
    send_counts: list[int],
    recv_counts: list[int],
    group: dist.ProcessGroup | None,
    *,
    op_name: str = "all_to_all_rows",
) -> torch.Tensor:
    """An all-to-all of uneven row counts: rows for rank 0, then rank 1, ... (not differentiable).

    Args:
        x: ``(sum(send_counts), ...)``: the rows for each peer, in rank order.
        send_counts: Rows this rank sends to each rank (its own entry included, normally 0).
        recv_counts: Rows this rank receives from each rank; the peers' ``send_counts`` entries for it.
        group: Process group of ``n`` ranks, or ``None`` for a group of one (returns ``x``).
        op_name: Name the bytes are reported under; see Note [Bytes sent] (rows to oneself never count).

    Returns:
        ``(sum(recv_counts), ...)``: the rows from rank 0, then from rank 1, ...
    """
    n = group_size(group)
    assert len(send_counts) == len(recv_counts) == n and x.shape[0] == sum(send_counts)
    if n == 1:
        return x
    x = x.contiguous()
    out = torch.empty(sum(recv_counts), *x.shape[1:], dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x, output_split_sizes=recv_counts, input_split_sizes=send_counts, group=group)
    me = dist.get_rank(group)
    row_bytes = x[0:1].numel() * x.element_size() if x.dim() > 0 else 0
    if sum(send_counts) > send_counts[me]:  # a rank that sends nobody anything reports nothing
        record_comm(op_name, (sum(send_counts) - send_counts[me]) * row_bytes)
    return out


def all_gather(x: torch.Tensor, group: dist.ProcessGroup | None, *, op_name: str = "all_gather") -> torch.Tensor:
    """Every rank's ``x``, stacked in rank order (not differentiable: used inside autograd functions).

    Args:
        x: This rank's chunk, any shape; the same shape on every rank.
        group: Process group of ``n`` ranks, or ``None`` for a group of one.
        op_name: Name the bytes are reported under; see Note [Bytes sent].

    Returns:
        ``(n, *x.shape)``.
    """
    n = group_size(group)
    x = x.contiguous()
    if n == 1:
        return x.unsqueeze(0)
    out = torch.empty(n * x.numel(), dtype=x.dtype, device=x.device)
    dist.all_gather_single(out, x.view(-1), group=group)  # flat: backends concatenate on dim 0
    record_comm(op_name, (n - 1) * x.numel() * x.element_size())
    return out.view(n, *x.shape)


def reduce_scatter(
    x_N: torch.Tensor, group: dist.ProcessGroup | None, *, op_name: str = "reduce_scatter"
) -> torch.Tensor:
    """Sum ``x_N`` over the ranks and keep entry ``rank`` of the sum (not differentiable).

    Args:
        x_N: ``(n, ...)``: this rank's contribution to every rank's result.
        group: Process group of ``n`` ranks, or ``None`` for a group of one.
        op_name: Name the bytes are reported under; see Note [Bytes sent].

    Returns:
        ``x_N.shape[1:]``: the sum over ranks of their entry for this rank.
    """
    n = group_size(group)
    assert x_N.shape[0] == n, f"reduce_scatter wants one chunk per rank on dim 0: {x_N.shape[0]} != {n}"
    if n == 1:
        return x_N[0]
    x_N = x_N.contiguous()
    out = torch.empty(x_N[0].numel(), dtype=x_N.dtype, device=x_N.device)
    dist.reduce_scatter_single(out, x_N.view(-1), group=group)  # flat: backends split dim 0
    record_comm(op_name, (n - 1) * _chunk_bytes(x_N))
    return out.view(x_N.shape[1:])


@functools.lru_cache(maxsize=32)
def _exchange_indices(seq_len: int, n: int, src: Layout, dst: Layout, rank: int):
    """Index arithmetic of one layout exchange, for ``rank``: what to send, and where received rows go.

    Cached: a model makes the same exchange at every layer (the key hashes a DocumentZigzag's
    lengths, not the pieces).

    Returns:
        ``(send_index, send_splits, recv_order, recv_splits)``: the source rows to send, grouped by
        destination rank; the rows per destination; the permutation that puts the received rows
        (grouped by source rank) into storage order; the rows per source.
    """
    pieces: tuple[tuple[Piece, ...], ...] = relayout_pieces(seq_len, n, src, dst)
    send = [[(so, ln) for sr, so, _, ln in pieces[peer] if sr == rank] for peer in range(n)]  # to each peer
    recv = [[(do, ln) for sr, _, do, ln in pieces[rank] if sr == peer] for peer in range(n)]  # from each peer

    def rows(spans):
        return torch.cat([torch.arange(o, o + ln) for o, ln in spans]) if spans else torch.zeros(0, dtype=torch.long)

    send_index = rows([span for spans in send for span in spans])
    recv_order = torch.argsort(rows([span for spans in recv for span in spans]))
    return send_index, [sum(ln for _, ln in s) for s in send], recv_order, [sum(ln for _, ln in r) for r in recv]


def _exchange(x: torch.Tensor, seq_dim: int, group: dist.ProcessGroup, layouts: tuple, op_name: str) -> torch.Tensor:
    """``x`` moved from ``layouts = (seq_len, src, dst)``'s source layout to its destination (not differentiable)."""
    rank, (seq_len, src, dst) = dist.get_rank(group), layouts
    send_index, send_splits, recv_order, recv_splits = _exchange_indices(seq_len, group_size(group), src, dst, rank)
    x_S = x.movedim(seq_dim, 0)  # sequence first: the splits cut dim 0
    send_S = x_S.index_select(0, send_index.to(x.device)).contiguous()
    recv_S = send_S.new_empty((sum(recv_splits), *send_S.shape[1:]))
    dist.all_to_all_single(recv_S, send_S, recv_splits, send_splits, group=group)
    row_bytes = send_S[0].numel() * send_S.element_size() if send_S.shape[0] else 0
    record_comm(op_name, (sum(send_splits) - send_splits[rank]) * row_bytes)
    return recv_S.index_select(0, recv_order.to(x.device)).movedim(0, seq_dim)


class _Relayout(torch.autograd.Function):
    """A layout exchange whose backward is the inverse exchange (the data move is a permutation)."""

    @staticmethod
    def forward(ctx, x, seq_dim, group, seq_len, src, dst, op_name):
        ctx.args = seq_dim, group, (seq_len, dst, src), op_name
        return _exchange(x, seq_dim, group, (seq_len, src, dst), op_name)

    @staticmethod
    def backward(ctx, grad):
        seq_dim, group, inverse, op_name = ctx.args
        return _exchange(grad, seq_dim, group, inverse, op_name), None, None, None, None, None, None


def relayout(
    x: torch.Tensor,
    group: dist.ProcessGroup | None,
    *,
    seq_dim: int,
    seq_len: int,
    src: Layout,
    dst: Layout,
    op_name: str = "relayout",
) -> torch.Tensor:
    """Move this rank's shard of a sequence from layout ``src`` to layout ``dst``: one uneven all-to-all.

    Each rank sends every other rank exactly the tokens that rank holds under ``dst`` and this rank
    holds under ``src``; nothing is gathered. Differentiable: the backward is the inverse exchange
    (same bytes). See Note [Re-laying out a DTensor] in :mod:`cp_dtensor.mesh.sharding`.

    Args:
        x: This rank's shard under ``src``: ``seq_len // n`` long on ``seq_dim``.
        group: Process group of the ``n`` ranks of the layout, or ``None`` for a group of one.
        seq_dim: The sequence dimension of ``x``.
        seq_len: The global sequence length.
        src: The layout ``x`` is in.
        dst: The layout to return.
        op_name: Name the bytes are reported under; see Note [Bytes sent].

    Returns:
        This rank's shard under ``dst``, same shape as ``x`` (``x`` itself when nothing moves).

    Raises:
        ValueError: ``seq_len`` does not split evenly into one of the layouts.
    """
    n = group_size(group)
    if n == 1 or src == dst:
        return x
    _exchange_indices(seq_len, n, src, dst, dist.get_rank(group))  # raises ValueError before any communication
    return _Relayout.apply(x, seq_dim % x.dim(), group, seq_len, src, dst, op_name)
