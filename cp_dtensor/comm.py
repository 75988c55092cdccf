"""Communication: the ring rotation, and a counter of every byte the strategies send.

Only this module (and the collectives of the other strategies) talks to ``torch.distributed``; the
math lives in :mod:`cp_dtensor.kernels` and :mod:`cp_dtensor.merge`.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.profiler import record_function

__all__ = ["RingAttentionCommunicator", "CommCounter", "count_comm", "record_comm"]


class CommCounter:
    """Bytes and calls sent by this rank, by operation name (``"ring_send"``, ``"all_to_all"``...).

    One call is one rotation or one collective, whatever the number of tensors it moves.

    Use through :func:`count_comm`; every communication helper of the package reports to the active
    counters with :func:`record_comm`.
    """

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    @property
    def total_bytes(self) -> int:
        """All bytes sent, over every operation."""
        return sum(self.bytes.values())

    def __repr__(self) -> str:
        return f"CommCounter(bytes={dict(self.bytes)}, calls={dict(self.calls)})"


_ACTIVE: list[CommCounter] = []


@contextlib.contextmanager
def count_comm() -> Iterator[CommCounter]:
    """Count what this rank sends inside the ``with`` block.

    Examples:
        >>> with count_comm() as counter:  # doctest: +SKIP
        ...     out = ring_attention(q, k, v, cp_group)
        >>> counter.calls["ring_send"]  # P - 1 K/V blocks in the forward  # doctest: +SKIP
    """
    counter = CommCounter()
    _ACTIVE.append(counter)
    try:
        yield counter
    finally:
        _ACTIVE.remove(counter)


def record_comm(op: str, num_bytes: int) -> None:
    """Report one message of ``num_bytes`` bytes sent by ``op`` to every active counter."""
    for counter in _ACTIVE:
        counter.bytes[op] += num_bytes
        counter.calls[op] += 1


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class RingAttentionCommunicator:
    """Passes buffers around a ring: send to rank ``r + 1``, receive from rank ``r - 1``.

    ``ring_forward`` posts the non-blocking sends and receives and returns at once, so the caller can
    compute on the current block while the next one travels (double buffering); ``wait`` returns the
    received tensors. Individual ``isend``/``irecv`` are used rather than ``batch_isend_irecv``, which
    has been reported to hang on gloo.

    Args:
        group: The process group of the ring (the cp axis of the mesh).
        op_name: Name reported to :func:`count_comm` for the bytes sent.
    """

    def __init__(self, group: dist.ProcessGroup | None, op_name: str = "ring_send") -> None:
        self.group = group
        self.op_name = op_name
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self._pending: list[dist.Work] = []
        self._sending: list[torch.Tensor] = []
        self._received: list[torch.Tensor] = []

    def _peer(self, offset: int) -> int:
        return dist.get_global_rank(self.group, (self.rank + offset) % self.size)

    def ring_forward(self, tensors: Sequence[torch.Tensor], offset: int = 1) -> None:
        """Start sending ``tensors`` to the next rank and receiving their peers from the previous one.

        Set a breakpoint here to watch the ring: every rank calls this once per step with the block it
        has just used. Call :meth:`wait` before the next ``ring_forward``.

        Args:
            tensors: Contiguous tensors to pass on; the received ones have the same shapes and dtypes.
            offset: Send to rank ``r + offset`` and receive from ``r - offset`` (1: the ring's next hop;
                a ring that stops early sends gradients home with a longer jump).
        """
        assert not self._pending, "wait() for the previous rotation first"
        assert self.size > 1, "a ring of one rank has nothing to send"
        self._received = [torch.empty_like(t) for t in tensors]
        self._sending = [t.contiguous() for t in tensors]  # keep alive until the sends complete
        for send, recv in zip(self._sending, self._received):
            # Post the receive first; ranks then never wait on each other to start.
            self._pending.append(dist.irecv(recv, self._peer(-offset), group=self.group))
            self._pending.append(dist.isend(send, self._peer(offset), group=self.group))
        record_comm(self.op_name, _nbytes(tensors))

    def wait(self) -> list[torch.Tensor]:
        """Block until the rotation started by :meth:`ring_forward` is complete; return what arrived."""
        with record_function("cp_dtensor.ring.comm_wait"):
            for work in self._pending:
                work.wait()
        self._pending, self._sending = [], []
        received, self._received = self._received, []
        return received
