"""Point-to-point: the ring rotation, one rotation posted per backend as NCCL and gloo each need.

Only this module (and the collectives of the other strategies) talks to ``torch.distributed``; the
math lives in :mod:`cp_dtensor.local.kernels` and :mod:`cp_dtensor.local.merge`.

Note [Point-to-point on NCCL]
-----------------------------
On NCCL a send or a receive is a kernel that blocks its stream until the peer's matching kernel
runs, and PyTorch puts every lone ``isend``/``irecv`` between two ranks on one communicator and
stream for that pair, in issue order. A rotation posted as ``irecv(prev); isend(next)`` then
deadlocks when ``prev == next``, i.e. on a ring of 2 ranks: each rank's receive waits for a send
that sits behind the peer's own receive. NCCL's maintainers give the rule: a send and a receive
between the same ranks go in one group (ncclGroupStart/End), which progresses as one operation
(NVIDIA/nccl#479, #2057; "send is allowed to block until the corresponding recv is called",
#783). In PyTorch that group is ``batch_isend_irecv``, and ranks must agree on it: a group on one
side against lone calls on the other is undefined (NVIDIA/nccl#1279), and in PyTorch the two even
run on different communicators (batched ops use the group's own, lone ones the pair's).

So :class:`RingAttentionCommunicator` posts all the sends and receives of one rotation, every
tensor included, as ONE ``batch_isend_irecv`` (one NCCL launch instead of ``2 x tensors``) on every
backend but gloo and MPI (:func:`batches_p2p`). Gloo and MPI queue no kernels on streams: their lone
``isend``/``irecv`` complete in any order, and ``batch_isend_irecv`` gains them nothing. On gloo it
has been reported to hang (pytorch/PiPPy#1130, 2024); since torch 2.13 gloo does not coalesce and
``batch_isend_irecv`` there is the same lone calls in list order (checked on 2 and 3 ranks), but
the lone calls keep working on the older torch versions this package supports.

Every rank issues the same rotations in the same order (the schedule is a function of the plan,
equal on all ranks), so the groups match one to one. The backward's two rotations (K/V forward,
the dK/dV accumulator behind them) are two groups rather than one: the K/V group is posted before
the step's compute so that it overlaps it, the dK/dV group only after the compute that fills it.
Issued in the same order everywhere, the second group of a step never waits on anything issued
later, so the stream runs through.

The other strategies use collectives only, for which NCCL's rule is that every rank of a
communicator issues them in the same order; each was checked for that:

* Ulysses and hybrid all-to-all (``all_to_all_single``): one collective per exchange, called the
  same number of times in the same place on every rank; NCCL groups its sends and receives itself.
* all-gather attention (``all_gather_single``, ``reduce_scatter_single``): collectives, same order.
* hybrid's inner rings: the ring of this module on the ``"ring"`` axis group, between two
  all-to-alls on the ``"ulysses"`` axis group; every rank issues them in that order.
* tensor parallelism (DTensor all-reduces and all-gathers on the ``"tp"`` group) and the attention
  between them: issued in module order, the same on every rank.
* gradient sync (DDP's bucketed all-reduce, or a hook per parameter for DTensor models) and the
  loss's all-reduce: DDP launches buckets in a fixed order; the hooks fire in autograd order,
  the same on every rank.
* mask and validation all-gathers, the sequence gather and re-layout: collectives before or after
  attention, on all ranks of the cp group.

``tests/nccl_rules.py`` checks these rules on CPU (see the failure-modes page).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.profiler import record_function

from cp_dtensor.comm.counter import record_comm

__all__ = ["RingAttentionCommunicator", "batches_p2p"]


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


_LONE_P2P_BACKENDS = frozenset({"gloo", "mpi"})


def batches_p2p(group: dist.ProcessGroup | None, device: torch.device) -> bool:
    """Whether a rotation on ``group`` with tensors on ``device`` is one ``batch_isend_irecv``.

    True for every backend but gloo and MPI: see Note [Point-to-point on NCCL].

    Args:
        group: The ring's process group (``None``: the default group).
        device: Device of the tensors the ring sends; picks the backend of a group that has one per
            device type (``"cpu:gloo,cuda:nccl"``).

    Returns:
        ``True`` to group each rotation's sends and receives, ``False`` for lone ``isend``/``irecv``.
    """
    config = dist.get_backend_config(group)  # "nccl", or "cpu:gloo,cuda:nccl"
    by_device = dict(part.split(":") for part in config.split(",")) if ":" in config else {}
    return by_device.get(device.type, config) not in _LONE_P2P_BACKENDS


class RingAttentionCommunicator:
    """Passes buffers around a ring: send to rank ``r + 1``, receive from rank ``r - 1``.

    ``ring_forward`` posts the non-blocking sends and receives and returns at once, so the caller can
    compute on the current block while the next one travels (double buffering); ``wait`` returns the
    received tensors. On NCCL the sends and receives of one rotation are one ``batch_isend_irecv``,
    on gloo lone ``isend``/``irecv``: see Note [Point-to-point on NCCL].

    Args:
        group: The process group of the ring (the cp axis of the mesh).
        op_name: Name reported to :func:`count_comm` for the bytes sent.
        batched: Group each rotation into one ``batch_isend_irecv`` (``True``) or post lone
            ``isend``/``irecv`` (``False``); ``None`` (default) decides by the group's backend
            (:func:`batches_p2p`).
    """

    def __init__(
        self, group: dist.ProcessGroup | None, op_name: str = "ring_send", *, batched: bool | None = None
    ) -> None:
        self.group = group
        self.op_name = op_name
        self.batched = batched
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self._pending: list[dist.Work] = []
        self._sending: list[torch.Tensor] = []
        self._received: list[torch.Tensor] = []

    def _peer(self, offset: int) -> int:
        return dist.get_global_rank(self.group, (self.rank + offset) % self.size)

    def ring_forward(
        self,
        tensors: Sequence[torch.Tensor],
        offset: int = 1,
        shapes: Sequence[torch.Size | tuple[int, ...]] | None = None,
    ) -> None:
        """Start sending ``tensors`` to the next rank and receiving their peers from the previous one.

        Set a breakpoint here to watch the ring: every rank calls this once per step with the block it
        has just used. Call :meth:`wait` before the next ``ring_forward``.

        Args:
            tensors: Contiguous tensors to pass on; the received ones have the same shapes and dtypes.
            offset: Send to rank ``r + offset`` and receive from ``r - offset`` (1: the ring's next hop;
                a ring that stops early sends gradients home with a longer jump).
            shapes: Shapes of the tensors to receive when they differ from the ones sent (mask-aware
                dispatch sends each peer its own rows); ``None``: the same shapes. An empty tensor is
                neither sent nor received: both sides know it is empty from the same plan.
        """
        assert not self._pending, "wait() for the previous rotation first"
        assert self.size > 1, "a ring of one rank has nothing to send"
        if shapes is None:
            self._received = [torch.empty_like(t) for t in tensors]
        else:
            self._received = [torch.empty(s, dtype=t.dtype, device=t.device) for t, s in zip(tensors, shapes)]
        self._sending = [t.contiguous() for t in tensors]  # keep alive until the sends complete
        ops = []
        for send, recv in zip(self._sending, self._received):
            if recv.numel():
                ops.append(dist.P2POp(dist.irecv, recv, self._peer(-offset), self.group))
            if send.numel():
                ops.append(dist.P2POp(dist.isend, send, self._peer(offset), self.group))
        batched = self.batched if self.batched is not None else batches_p2p(self.group, self._sending[0].device)
        if not ops:
            self._pending = []
        elif batched:  # one group, one launch: see Note [Point-to-point on NCCL]
            self._pending = dist.batch_isend_irecv(ops)
        else:  # lone ops, the receive first: ranks then never wait on each other to start
            self._pending = [op.op(op.tensor, op.peer, group=op.group) for op in ops]
        if _nbytes(tensors):
            record_comm(self.op_name, _nbytes(tensors))

    def wait(self) -> list[torch.Tensor]:
        """Block until the rotation started by :meth:`ring_forward` is complete; return what arrived."""
        with record_function("cp_dtensor.ring.comm_wait"):
            for work in self._pending:
                work.wait()
        self._pending, self._sending = [], []
        received, self._received = self._received, []
        return received
