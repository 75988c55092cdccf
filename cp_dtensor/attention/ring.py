"""Ring attention: exact attention over a sequence sharded across the cp axis.

Each rank keeps its queries and passes its K/V block around the ring; after ``P`` steps every query
has met every key block. Per step a rank attends its queries to the visiting block with a fused
kernel (:mod:`cp_dtensor.local.kernels`), planned by :func:`cp_dtensor.positions.blocks.plan_blocks` so that causal
masking skips hidden work (see Note [Causal load balance] there), and merges the partial result with
its log-sum-exp (see Note [LSE merge] in :mod:`cp_dtensor.local.merge`).

Backward (:func:`ring_backward`, run by the executor): K/V rotate again; each rank adds its share of ``dK``/``dV``
to an fp32 accumulator that travels *with* the block and arrives home after ``P`` hops; ``dQ``
stays local. The per-block backward uses the saved final output and log-sum-exp; nothing global is
recomputed.

Note [The two rings]
--------------------
``reference/ring.py`` simulates this ring on ``P`` virtual ranks in one process (Note [Ring
schedule] there, with the schedule drawn). The same algorithm, under these names:

=====================================================  ===============================================
``reference/ring.py``                                   here
=====================================================  ===============================================
``world_size``, ``rank``, ``held.source``              ``RingPlan.size``, ``.rank``, ``(rank - step) % size``
``send_to_next_rank(buffers)``                          ``RingAttentionCommunicator.ring_forward`` + ``.wait``
``attention_block`` / ``attention_block_backward``      ``kernels.block_forward`` / ``block_backward``
``mask.visible(...)``, skip a hidden block              ``RingPlan.calls(step)``: tiles, ``[]`` when hidden
``merge(out, lse, ...)`` (returns the merge)            ``merge_into(out, lse, ..., first=)`` (in place)
``simulate_ring_attention_forward`` / ``_backward``     :func:`ring_forward` / :func:`ring_backward`
=====================================================  ===============================================

It differs in three ways, each for speed, none in the result:

1. **The send is posted before the compute.** At every step the next block is already in flight
   while this one is attended to (the reference attends, then sends).
2. **Early stop under windows.** :attr:`RingPlan.num_steps` is fewer than ``P`` when a window hides
   every later block from every rank; the reference runs all ``P`` steps and traces the skipped ones.
3. **The last hop home.** The dK/dV accumulators rotate one step behind K/V, on their own
   communicator; after the last step each goes straight home (``size - step`` hops away, one when
   the ring ran all ``P`` steps), where the reference sends them one more hop with their block.

Legend (the reference uses the same): ``B`` batch, ``H`` query heads, ``H_kv`` K/V heads, ``L``
global sequence length, ``S = L / P`` local sequence length, ``D`` head dim, ``P`` ranks in the ring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from cp_dtensor.attention.registry import Strategy, register
from cp_dtensor.comm.p2p import RingAttentionCommunicator
from cp_dtensor.local.block_loop import backward_blocks, forward_blocks
from cp_dtensor.local.kernels import accum_dtype
from cp_dtensor.local.logits import BoundLogits, LogitSpec
from cp_dtensor.local.merge import add_sinks, sink_grad
from cp_dtensor.positions.layout import Run, shard_runs
from cp_dtensor.positions.masks import MaskSpec, positions, window_hides_block
from cp_dtensor.positions.tiles import KernelCall, TilePlanner, tile_planner

if TYPE_CHECKING:
    from cp_dtensor.attention.call import AttentionCall
    from cp_dtensor.mesh.group import ContextParallelGroup

__all__ = ["RING", "Ring", "RingOptions", "RingPlan", "make_plan", "ring_backward", "ring_forward"]


@dataclass
class RingPlan:
    """What a ring needs to know besides the tensors.

    Attributes:
        group: Process group of the ring (``None`` for a ring of one rank).
        rank: This rank's position in the ring.
        size: Number of ranks in the ring.
        q_runs: Global-position runs of the local queries.
        kv_runs: ``kv_runs(src)`` gives the runs of the K/V block that ring rank ``src`` starts with
            (for ring attention also the runs of that rank's queries).
        causal: Causal masking on global positions.
        scale: Softmax scale.
        mask: Windows, documents and padding (see :mod:`cp_dtensor.positions.masks`); ``None`` for none.
        batched: Post each rotation as one ``batch_isend_irecv`` (``True``) or lone ``isend``/``irecv``
            (``False``); ``None`` decides by backend (Note [Point-to-point on NCCL] in :mod:`cp_dtensor.comm.p2p`).
        logits: Soft-capping, a score function and sinks of the heads this ring attends with, or ``None``.
    """

    group: dist.ProcessGroup | None
    rank: int
    size: int
    q_runs: list[Run]
    kv_runs: Callable[[int], list[Run]]
    causal: bool
    scale: float
    mask: MaskSpec | None = None
    batched: bool | None = None
    logits: LogitSpec | None = None
    _planner: TilePlanner | None = field(default=None, init=False, repr=False)

    @classmethod
    def one_rank(
        cls,
        q_runs: list[Run],
        kv_runs: list[Run],
        *,
        causal: bool,
        scale: float,
        mask: MaskSpec | None = None,
        logits: LogitSpec | None = None,
    ) -> RingPlan:
        """A ring of one rank: local queries at ``q_runs`` against one K/V block at ``kv_runs``, no sends."""
        return cls(
            group=None, rank=0, size=1, q_runs=q_runs, kv_runs=lambda _: kv_runs, causal=causal, scale=scale,
            mask=mask, logits=logits,
        )  # fmt: skip

    def calls(self, step: int) -> list[KernelCall]:
        """The kernel calls of ``step`` (local queries against the block of rank ``rank - step``) with their masks.

        Planned once per call by the mask's :class:`~cp_dtensor.positions.tiles.TilePlanner`, which the
        backward and the next layers with the same mask share.
        """
        if self._planner is None:
            self._planner = tile_planner(self.mask)
        return self._planner.calls(self.q_runs, self.kv_runs((self.rank - step) % self.size), self.causal)

    def bound_logits(self, step: int) -> BoundLogits | None:
        """:attr:`logits` at the global positions of the local queries and the block of ``step``."""
        if self.logits is None or not self.logits.tiled:
            return None
        return self.logits.bind(positions(self.q_runs), positions(self.kv_runs((self.rank - step) % self.size)))

    @property
    def sinks(self) -> torch.Tensor | None:
        """The sink logits of this ring's heads ``(H,)``, or ``None``."""
        return None if self.logits is None else self.logits.sinks

    @property
    def num_steps(self) -> int:
        """Steps the ring must run: ``size``, fewer when a window hides every later block from every rank.

        Every rank evaluates this for all ranks (pure arithmetic on runs), so all agree.
        """
        if self.mask is None or self.mask.window is None:
            return self.size
        needed = [
            step
            for step in range(self.size)
            for rank in range(self.size)
            if not window_hides_block(self.kv_runs(rank), self.kv_runs((rank - step) % self.size), self.mask)
        ]
        return max(needed, default=0) + 1


def ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ring on local tensors.

    Args:
        q: Local queries ``(B, H, S, D)``.
        k: Local keys ``(B, H_kv, S_kv, D)``.
        v: Local values ``(B, H_kv, S_kv, D)``.
        plan: The ring's ranks and layout.

    Returns:
        ``(out, lse)``: ``out`` ``(B, H, S, D)`` in ``q``'s dtype and ``lse`` ``(B, H, S)`` in fp32
        (fp64 for fp64 inputs).
    """
    comm = RingAttentionCommunicator(plan.group, "ring_send", batched=plan.batched)
    acc = accum_dtype(q.dtype)  # fp32, or fp64 for fp64 inputs
    out = torch.zeros(q.shape, dtype=acc, device=q.device)  # (B, H, S, D)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)  # (B, H, S)
    kv = [k.contiguous(), v.contiguous()]
    merged = torch.zeros(q.shape[2], dtype=torch.bool)  # host bookkeeping: rows some block was merged into
    num_steps = plan.num_steps
    for step in range(num_steps):
        if step + 1 < num_steps:
            comm.ring_forward(kv)  # the next block travels while we compute on this one
        forward_blocks(q, kv[0], kv[1], plan.calls(step), plan.scale, out, lse, merged, plan.bound_logits(step))
        if step + 1 < num_steps:
            kv = comm.wait()
    if plan.sinks is not None:  # one correction after every block: Note [Attention sinks]
        add_sinks(out, lse, plan.sinks)
    return out.to(q.dtype), lse


def ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    plan: RingPlan,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward ring: gradients of the local ``q``, ``k``, ``v`` shards.

    Args:
        dout: Gradient of the local output ``(B, H, S, D)``.
        q: Local queries ``(B, H, S, D)``.
        k: Local keys ``(B, H_kv, S_kv, D)``.
        v: Local values ``(B, H_kv, S_kv, D)``.
        out: Saved forward output ``(B, H, S, D)``.
        lse: Saved fp32 log-sum-exp ``(B, H, S)``.
        plan: The ring's ranks and layout.

    Returns:
        ``(dq, dk, dv, dsinks)``: the gradients in the dtypes of ``q``, ``k``, ``v``; ``dsinks`` ``(H,)``
        this rank's share of the sinks' gradient (Note [Attention sinks]), ``None`` without sinks.
    """
    kv_comm = RingAttentionCommunicator(plan.group, "ring_send", batched=plan.batched)
    grad_comm = RingAttentionCommunicator(plan.group, "ring_send_grad", batched=plan.batched)
    dout = dout.contiguous()
    acc = accum_dtype(q.dtype)  # fp32, or fp64 for fp64 inputs
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)  # (B, H, S, D), stays home
    kv = [k.contiguous(), v.contiguous()]
    num_steps = plan.num_steps
    for step in range(num_steps):
        if step + 1 < num_steps:
            kv_comm.ring_forward(kv)
        dk_blk = torch.zeros(k.shape, dtype=acc, device=k.device)  # (B, H_kv, S_kv, D)
        dv_blk = torch.zeros(v.shape, dtype=acc, device=v.device)
        grads = (dq, dk_blk, dv_blk)
        backward_blocks(dout, q, kv[0], kv[1], out, lse, plan.calls(step), plan.scale, grads, plan.bound_logits(step))
        if step > 0:  # the accumulator of this block, filled by the ranks it visited before
            dk_in, dv_in = grad_comm.wait()
            dk_blk += dk_in
            dv_blk += dv_in
        if plan.size > 1 and num_steps > 1:
            # Pass the accumulator on with its block; after the last step, send it home (the block
            # of rank r - step lives there: one hop forward when the ring ran all P steps).
            last = step + 1 == num_steps
            grad_comm.ring_forward([dk_blk, dv_blk], offset=(plan.size - step) if last else 1)
        if step + 1 < num_steps:
            kv = kv_comm.wait()
    if plan.size > 1 and num_steps > 1:
        dk_blk, dv_blk = grad_comm.wait()
    dsinks = None if plan.sinks is None else sink_grad(dout, out, lse, plan.sinks)
    return dq.to(q.dtype), dk_blk.to(k.dtype), dv_blk.to(v.dtype), dsinks


def make_plan(
    cp_group: ContextParallelGroup,
    seq_len_local: int,
    causal: bool,
    scale: float,
    mask: MaskSpec | None = None,
    logits: LogitSpec | None = None,
) -> RingPlan:
    """The :class:`RingPlan` of ``cp_group`` for local shards of ``seq_len_local`` tokens."""
    size, rank = cp_group.size, cp_group.rank  # read the mesh once, not at every step
    seq_len = seq_len_local * size
    all_runs = [shard_runs(seq_len, size, r, cp_group.layout) for r in range(size)]  # ValueError if it does not fit
    return RingPlan(
        group=cp_group.process_group if size > 1 else None,
        rank=rank,
        size=size,
        q_runs=all_runs[rank],
        kv_runs=all_runs.__getitem__,
        causal=causal,
        scale=scale,
        mask=mask,
        logits=logits,
    )


@dataclass(frozen=True)
class RingOptions:
    """The ring's own keyword arguments.

    Attributes:
        batched_p2p: Post each rotation's sends and receives as one ``batch_isend_irecv`` (``True``)
            or as lone ``isend``/``irecv`` (``False``). ``None`` (default): by backend, grouped on
            NCCL and lone on gloo (Note [Point-to-point on NCCL] in :mod:`cp_dtensor.comm.p2p`).
            Every rank must pass the same value.
    """

    batched_p2p: bool | None = None


class Ring(Strategy):
    """Ring attention as a :class:`~cp_dtensor.attention.registry.Strategy`: K/V blocks travel, queries stay."""

    name = "ring"
    function = "ring_attention"
    Options = RingOptions

    def plan(self, call: AttentionCall) -> RingPlan:
        """The plan of ``call``: see :meth:`Strategy.plan <cp_dtensor.attention.registry.Strategy.plan>`."""
        batched = call.options.batched_p2p
        if batched is not None and not isinstance(batched, bool):
            raise ValueError(f"batched_p2p must be None, True or False, got {batched!r}.")
        plan = make_plan(call.cp_group, call.q.shape[2], call.causal, call.scale, call.mask, call.logits)
        return dataclasses.replace(plan, batched=batched)

    def forward(self, q, k, v, plan):
        """``(out, lse, saved)``: see :meth:`Strategy.forward <cp_dtensor.attention.registry.Strategy.forward>`."""
        return (*ring_forward(q, k, v, plan), ())

    def backward(self, dout, q, k, v, out, lse, saved, plan):
        """``(dq, dk, dv, dsinks)``: see :meth:`Strategy.backward <cp_dtensor.attention.registry.Strategy.backward>`."""
        return ring_backward(dout, q, k, v, out, lse, plan)


RING = register(Ring())
