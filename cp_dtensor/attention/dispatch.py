"""Mask-aware dispatch: each rank receives only the K/V rows its queries can see.

Under packed documents, sliding windows and causality most of the sequence is invisible to most
queries; this strategy moves only the visible part (Note [Moving only what the mask needs] in
:mod:`cp_dtensor.positions.dispatch`). From the mask, every rank computes the same routes: which
rows of rank ``s``'s K/V rank ``d``'s queries need. Then:

Forward: the local queries attend to their own K/V and to the rows that arrive from each peer, one
block per source, each planned by the tile planner on the rows' global positions and merged by
log-sum-exp (Note [LSE merge] in :mod:`cp_dtensor.local.merge`), exactly as the ring merges its blocks.

Backward: the rows arrive again (recomputed, not kept, as in the ring), ``dQ`` stays local, and the
gradient of each arrived block goes back to its owner, which adds it to its own rows' ``dK``/``dV``.

Two schedules move the same rows:

* ``"pairwise"`` (ring-like, the default): ``P - 1`` steps; at step ``t`` rank ``r`` sends to rank
  ``r + t`` the rows it needs and receives from ``r - t`` the rows ``r`` needs, posted before the
  previous block's compute so that they overlap it. Unlike a ring, a row goes straight to the ranks
  that need it and passes through no one else.
* ``"alltoall"`` (all-gather-like): one uneven all-to-all before the compute, one for the gradients.

Bytes per rank: the rows it sends, once in the forward and once in the backward, plus their gradients
in the accumulation dtype (:func:`cp_dtensor.estimate.comm_model.dispatch_bytes` predicts them).
K/V move un-repeated under GQA. Plain causal attention gains little (most rows are needed);
documents and windows gain the most.

Legend: ``B`` batch, ``H`` query heads, ``H_kv`` K/V heads, ``S`` local sequence length, ``D`` head
dim, ``P`` ranks, ``n`` rows of one arrived block.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from cp_dtensor.attention.registry import Strategy, register
from cp_dtensor.comm.collectives import all_to_all_rows
from cp_dtensor.comm.p2p import RingAttentionCommunicator
from cp_dtensor.local.block_loop import backward_blocks, forward_blocks
from cp_dtensor.local.kernels import accum_dtype
from cp_dtensor.local.logits import BoundLogits, LogitSpec
from cp_dtensor.local.merge import add_sinks, sink_grad
from cp_dtensor.positions.dispatch import Routes, cached_routes
from cp_dtensor.positions.layout import Run
from cp_dtensor.positions.masks import MaskSpec, positions
from cp_dtensor.positions.tiles import KernelCall, tile_planner

if TYPE_CHECKING:
    from cp_dtensor.attention.call import AttentionCall

__all__ = ["DISPATCH", "Dispatch", "DispatchOptions", "DispatchPlan", "SCHEDULES"]

SCHEDULES = ("pairwise", "alltoall")


@dataclass
class DispatchPlan:
    """What a dispatch needs besides the tensors.

    Attributes:
        group: The cp process group (``None`` for one rank).
        size: Ranks ``P``.
        routes: This rank's routes (:func:`cp_dtensor.positions.dispatch.routes`).
        causal: Causal masking on global positions.
        scale: Softmax scale.
        mask: The call's mask, or ``None`` for plain (non-)causal attention.
        logits: Soft-capping, a score function and sinks, or ``None``.
        schedule: ``"pairwise"`` or ``"alltoall"``.
        batched: As :attr:`cp_dtensor.attention.ring.RingPlan.batched`.
    """

    group: dist.ProcessGroup | None
    size: int
    routes: Routes
    causal: bool
    scale: float
    mask: MaskSpec | None = None
    logits: LogitSpec | None = None
    schedule: str = "pairwise"
    batched: bool | None = None
    _calls: dict[int, list[KernelCall]] = field(default_factory=dict, init=False, repr=False)

    @property
    def rank(self) -> int:
        """This rank."""
        return self.routes.rank

    def block_runs(self, src: int) -> list[Run]:
        """Global runs of the K/V rows of the block that comes from rank ``src`` (its own rows for this rank)."""
        return self.routes.own_runs if src == self.rank else self.routes.recv_runs[src]

    def calls(self, src: int) -> list[KernelCall]:
        """The kernel calls of the local queries against the block from ``src`` (planned once per call)."""
        if src not in self._calls:
            planner = tile_planner(self.mask)
            self._calls[src] = planner.calls(self.routes.own_runs, self.block_runs(src), self.causal)
        return self._calls[src]

    def bound_logits(self, src: int) -> BoundLogits | None:
        """:attr:`logits` at the global positions of the local queries and the block from ``src``."""
        if self.logits is None or not self.logits.tiled:
            return None
        return self.logits.bind(positions(self.routes.own_runs), positions(self.block_runs(src)))

    @property
    def sinks(self) -> torch.Tensor | None:
        """The sink logits ``(H,)``, or ``None``."""
        return None if self.logits is None else self.logits.sinks


def _rows_first(kv: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``(2, B, H_kv, S, D)`` and row indices ``(n,)`` -> those rows ``(n, 2, B, H_kv, D)``, contiguous."""
    return kv.permute(3, 0, 1, 2, 4).index_select(0, rows.to(kv.device))


def _arrivals(kv: torch.Tensor, plan: DispatchPlan) -> Iterator[tuple[int, torch.Tensor]]:
    """This rank's block, then each peer's rows as they arrive: ``(source, (2, B, H_kv, n, D))``.

    Every peer is yielded, in step order (rank ``r - 1``, ``r - 2``, ...), ``n = 0`` when none of its rows
    is needed here. Pairwise: the next exchange is posted before a block is yielded, so it travels while
    the caller computes.
    """
    r, size, rt = plan.rank, plan.size, plan.routes
    shape = kv.shape
    yield r, kv
    if size == 1:
        return
    if plan.schedule == "alltoall":
        send = torch.cat([_rows_first(kv, rt.send_rows[d]) for d in range(size)])
        recv = all_to_all_rows(send, [len(x) for x in rt.send_rows], rt.recv_rows, plan.group, op_name="dispatch_kv")
        blocks = recv.split(rt.recv_rows)
        for step in range(1, size):
            # contiguous once here, rather than a copy inside every kernel call of the block
            yield (r - step) % size, blocks[(r - step) % size].permute(1, 2, 3, 0, 4).contiguous()
        return
    comm = RingAttentionCommunicator(plan.group, "dispatch_kv", batched=plan.batched)

    def post(step: int) -> None:  # to r + step its rows; from r - step ours
        send = kv.index_select(3, rt.send_rows[(r + step) % size].to(kv.device))  # (2, B, H_kv, n, D)
        comm.ring_forward([send], offset=step, shapes=[(*shape[:3], rt.recv_rows[(r - step) % size], shape[4])])

    post(1)
    for step in range(1, size):
        (block,) = comm.wait()
        if step + 1 < size:
            post(step + 1)
        yield (r - step) % size, block


def dispatch_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: DispatchPlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on local tensors.

    Returns:
        ``(out, lse)``: ``out`` ``(B, H, S, D)`` in ``q``'s dtype, ``lse`` ``(B, H, S)`` in fp32 (fp64 for fp64).
    """
    acc = accum_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)  # (B, H, S, D)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)  # (B, H, S)
    merged = torch.zeros(q.shape[2], dtype=torch.bool)  # host: rows merged into (see forward_blocks)
    for src, kv_blk in _arrivals(torch.stack([k, v]), plan):
        if kv_blk.shape[3] == 0:
            continue
        forward_blocks(q, kv_blk[0], kv_blk[1], plan.calls(src), plan.scale, out, lse, merged, plan.bound_logits(src))
    if plan.sinks is not None:  # one correction after every block: Note [Attention sinks] in local/merge.py
        add_sinks(out, lse, plan.sinks)
    return out.to(q.dtype), lse


def dispatch_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    plan: DispatchPlan,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward on local tensors (shapes as in :func:`dispatch_forward`).

    Returns:
        ``(dq, dk, dv, dsinks)``: as :func:`cp_dtensor.attention.ring.ring_backward`.
    """
    dout = dout.contiguous()
    r, size, rt, acc = plan.rank, plan.size, plan.routes, accum_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)  # (B, H, S, D), stays home
    dkv = torch.zeros((2, *k.shape), dtype=acc, device=k.device)  # (2, B, H_kv, S, D): this rank's rows
    grad_comm = RingAttentionCommunicator(plan.group, "dispatch_grad", batched=plan.batched)
    in_flight: int | None = None  # pairwise: the peer whose gradients for our rows are on their way
    home: dict[int, torch.Tensor] = {}  # alltoall: each peer's block gradient, rows first

    def add_home(dst: int, dkv_rows: torch.Tensor) -> None:  # (2, B, H_kv, n, D): our rows that dst attended
        dkv.index_add_(3, rt.send_rows[dst].to(dkv.device), dkv_rows)

    for step, (src, kv_blk) in enumerate(_arrivals(torch.stack([k, v]), plan)):
        dkv_blk = dkv if src == r else torch.zeros(kv_blk.shape, dtype=acc, device=k.device)  # (2, B, H_kv, n, D)
        if kv_blk.shape[3]:
            grads = (dq, dkv_blk[0], dkv_blk[1])
            calls, logits = plan.calls(src), plan.bound_logits(src)
            backward_blocks(dout, q, kv_blk[0], kv_blk[1], out, lse, calls, plan.scale, grads, logits)
        if src == r:
            continue
        if plan.schedule == "alltoall":
            home[src] = dkv_blk.permute(3, 0, 1, 2, 4)  # (n, 2, B, H_kv, D)
            continue
        # pairwise: the gradient of the block from r - step goes home; r + step's share of ours comes
        if in_flight is not None:
            add_home(in_flight, grad_comm.wait()[0])
        in_flight = (r + step) % size
        shape = (*dkv.shape[:3], len(rt.send_rows[in_flight]), dkv.shape[4])
        grad_comm.ring_forward([dkv_blk], offset=-step, shapes=[shape])
    if in_flight is not None:
        add_home(in_flight, grad_comm.wait()[0])
    if plan.schedule == "alltoall" and size > 1:
        send = torch.cat([home[s] for s in range(size) if s != r])  # rank order, our own entry empty
        sent_counts = [len(rows) for rows in rt.send_rows]
        arrived = all_to_all_rows(send, rt.recv_rows, sent_counts, plan.group, op_name="dispatch_grad")
        for dst, rows in enumerate(arrived.split(sent_counts)):
            if len(rows):
                add_home(dst, rows.permute(1, 2, 3, 0, 4))
    dsinks = None if plan.sinks is None else sink_grad(dout, out, lse, plan.sinks)
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), dsinks


@dataclass(frozen=True)
class DispatchOptions:
    """The dispatch strategy's own keyword arguments.

    Attributes:
        schedule: ``"pairwise"`` (default: ``P - 1`` direct exchanges, each overlapping the previous
            block's compute) or ``"alltoall"`` (one uneven all-to-all before the compute). The same rows
            move either way.
        batched_p2p: As the ring's (:class:`~cp_dtensor.attention.ring.RingOptions`), for ``"pairwise"``.
    """

    schedule: str = "pairwise"
    batched_p2p: bool | None = None


class Dispatch(Strategy):
    """Mask-aware dispatch as a :class:`~cp_dtensor.attention.registry.Strategy`: only visible K/V rows travel."""

    name = "dispatch"
    function = "dispatch_attention"
    Options = DispatchOptions

    def plan(self, call: AttentionCall) -> DispatchPlan:
        """The plan of ``call``: see :meth:`Strategy.plan <cp_dtensor.attention.registry.Strategy.plan>`."""
        schedule, batched = call.options.schedule, call.options.batched_p2p
        if schedule not in SCHEDULES:
            raise ValueError(f"Invalid schedule {schedule!r}. Must be one of: {', '.join(map(repr, SCHEDULES))}.")
        if batched is not None and not isinstance(batched, bool):
            raise ValueError(f"batched_p2p must be None, True or False, got {batched!r}.")
        cp_group = call.cp_group
        size, seq_len = cp_group.size, call.seq_len
        all_runs = [cp_group.runs(seq_len, r) for r in range(size)]
        mask = call.mask if call.mask is not None else MaskSpec(causal=call.causal)
        return DispatchPlan(
            group=cp_group.process_group if size > 1 else None,
            size=size,
            routes=cached_routes(mask, all_runs, cp_group.rank),
            causal=call.causal,
            scale=call.scale,
            mask=call.mask,
            logits=call.logits,
            schedule=schedule,
            batched=batched,
        )

    def forward(self, q, k, v, plan):
        """``(out, lse, saved)``: see :meth:`Strategy.forward <cp_dtensor.attention.registry.Strategy.forward>`."""
        return (*dispatch_forward(q, k, v, plan), ())

    def backward(self, dout, q, k, v, out, lse, saved, plan):
        """``(dq, dk, dv, dsinks)``: see :meth:`Strategy.backward <cp_dtensor.attention.registry.Strategy.backward>`."""
        return dispatch_backward(dout, q, k, v, out, lse, plan)


DISPATCH = register(Dispatch())
