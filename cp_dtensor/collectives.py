"""Byte-counted collectives for the strategies that are not a ring: all-to-all, all-gather, reduce-scatter.

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
:mod:`cp_dtensor.comm_model` predicts these numbers; the tests compare them with what the
strategies record.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cp_dtensor.comm import record_comm

__all__ = ["all_to_all", "all_gather", "reduce_scatter", "group_size"]


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
