"""NCCL's point-to-point rules on CPU: a process-group backend that moves bytes with gloo, in NCCL's order.

Gloo completes sends and receives in any order; NCCL does not. This backend, registered as
``"nccl_rules"`` through ``torch.distributed.Backend.register_backend``, runs the calls the code
really makes under NCCL's rules (see Note [Point-to-point on NCCL] in :mod:`cp_dtensor.comm.p2p`):

* per pair of ranks, point-to-point ops execute strictly in issue order (one stream per pair);
* a receive blocks later ops of its pair until the peer's matching send runs, and a send blocks
  until the peer's matching receive runs (NCCL's rendezvous for large messages; stricter than NCCL
  for small ones, which code must not rely on anyway);
* the ops of one ``batch_isend_irecv`` call are one group: launched together once the group is at
  the head of every pair it touches, done when all are; a grouped op never matches a lone one
  (PyTorch runs them on different NCCL communicators);
* collectives are gloo's own (see Note [Collectives of a Python process group] below).

A deadlock under these rules raises, after ``NCCL_RULES_TIMEOUT_S`` seconds (default 10), a
``RuntimeError`` naming every rank of the group and the ops it is stuck on, instead of hanging.

Usage (each rank)::

    import nccl_rules                                  # tests/ on the path
    nccl_rules.install()
    cp_group = init_context_parallel_group(2, backend="nccl_rules", timeout=60)

or ``dist.init_process_group("nccl_rules")`` under torchrun for a whole script on CPU.

What it cannot see: CUDA streams (compute against communication, a kernel that waits on a stream
another communicator fills, NVIDIA/nccl#783), the order of collectives across different
communicators (each is gloo's), anything inside a collective, and code that calls
``batch_isend_irecv`` through a reference taken before :func:`install` (its ops then look lone).
Python process groups are never offered PyTorch's coalescing, so :func:`install` wraps
``torch.distributed.batch_isend_irecv`` to learn where a group starts and ends.

Note [Collectives of a Python process group]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
PyTorch calls a collective of a Python ``ProcessGroup`` subclass through a trampoline that takes the
GIL to look for a Python override and, finding none, runs the C++ default (dispatch to the
registered gloo backend) STILL HOLDING the GIL (``WORK_OVERRIDE`` in ``PyProcessGroup.hpp``, torch
2.13). Gloo's worker thread frees a finished work under its queue lock; when that drops the last
reference to a tensor with a Python object, it needs the GIL. The caller holds the GIL and waits for
the queue lock to enqueue the next collective: both wait forever. DTensor's tensor parallelism hit
it at random (a ``broadcast`` of ``distribute_module`` or ``apply_ddp``, one rank stuck, the others
waiting in a collective behind it). So every collective the trampoline knows is overridden here and
handed to gloo through a plain C++ ``ProcessGroup`` whose Python binding releases the GIL first.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["BACKEND", "NcclRulesProcessGroup", "install"]

BACKEND = "nccl_rules"
_PUBLISH_AFTER_S = 0.5  # a rank writes its pending ops to the store once they wait this long


@dataclass(eq=False)
class _Op:
    kind: str  # "send" or "recv"
    peer: int  # group rank
    tensor: torch.Tensor
    tag: int
    label: str
    done: threading.Event = field(default_factory=threading.Event)
    works: list = field(default_factory=list)
    ack: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.uint8))
    error: BaseException | None = None


@dataclass(eq=False)
class _Group:
    ops: list[_Op]
    batched: bool
    issued: float = field(default_factory=time.monotonic)
    launched: bool = False

    @property
    def peers(self) -> set[int]:
        return {op.peer for op in self.ops}


class _Work(dist.Work):
    """The handle of one op: ``wait`` blocks until the op ran, or raises the deadlock report."""

    def __init__(self, pg: NcclRulesProcessGroup, op: _Op) -> None:
        super().__init__()
        self._pg, self._op = pg, op

    def is_completed(self) -> bool:
        return self._op.done.is_set()

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        if not self._op.done.wait(self._pg.rules_timeout_s):
            raise RuntimeError(self._pg.deadlock_report(self._op))
        if self._op.error is not None:
            raise self._op.error
        return True


class NcclRulesProcessGroup(dist.ProcessGroup):
    """A process group with gloo's collectives and NCCL's point-to-point rules (see the module docstring).

    Args:
        store: The group's rendezvous store.
        rank: This rank in the group.
        size: Ranks in the group.
        timeout: Timeout of gloo's collectives.
    """

    def __init__(self, store: dist.Store, rank: int, size: int, timeout: datetime.timedelta) -> None:
        super().__init__(rank, size)
        self._gloo = dist.ProcessGroupGloo(dist.PrefixStore("gloo", store), rank, size, timeout)
        self._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, self._gloo)
        # Note [Collectives of a Python process group]: gloo's collectives, reached without the GIL.
        self._collectives = dist.ProcessGroup(store, rank, size)
        self._collectives._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, self._gloo)
        self._collectives._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
        self._state = dist.PrefixStore("nccl_rules_state", store)
        self._state.set(str(rank), "nothing pending")
        self.rules_timeout_s = float(os.environ.get("NCCL_RULES_TIMEOUT_S", "10"))
        self._pairs: dict[int, deque[_Group]] = {}
        self._groups: list[_Group] = []  # issued, not yet done, in issue order
        self._counts: dict[tuple[int, str], int] = {}
        self._open: list[_Op] | None = None
        self._lock = threading.Condition()
        self._published = "nothing pending"
        threading.Thread(target=self._progress, daemon=True, name="nccl_rules").start()

    def getBackendName(self) -> str:  # noqa: N802 (the name torch calls)
        return BACKEND

    # ---- issuing ------------------------------------------------------------------------------

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> dist.Work:
        return self._issue("send", tensors[0], dst, tag)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> dist.Work:
        return self._issue("recv", tensors[0], src, tag)

    def _issue(self, kind: str, tensor: torch.Tensor, peer: int, tag: int) -> dist.Work:
        with self._lock:
            n = self._counts[(peer, kind)] = self._counts.get((peer, kind), 0) + 1
            arrow = f"to rank {peer}" if kind == "send" else f"from rank {peer}"
            shape = "x".join(map(str, tensor.shape)) or "scalar"
            op = _Op(kind, peer, tensor, tag, f"{kind} #{n} {arrow} ({shape} {tensor.dtype}")
            if self._open is not None:
                self._open.append(op)
            else:
                self._submit([op], batched=False)
        return _Work(self, op)

    def begin_group(self) -> None:
        """Start collecting the ops of one ``batch_isend_irecv`` call."""
        with self._lock:
            assert self._open is None, "batch_isend_irecv calls do not nest"
            self._open = []

    def end_group(self) -> None:
        """Submit the collected ops as one group."""
        with self._lock:
            ops, self._open = self._open, None
            if ops:
                self._submit(ops, batched=True)

    def _submit(self, ops: list[_Op], batched: bool) -> None:
        for op in ops:
            op.label += ", grouped)" if batched else ", lone)"
        group = _Group(ops, batched)
        self._groups.append(group)
        for peer in group.peers:
            self._pairs.setdefault(peer, deque()).append(group)
        self._lock.notify_all()

    # ---- progress (NCCL's streams) ------------------------------------------------------------

    def _progress(self) -> None:
        while True:
            with self._lock:
                busy = self._step()
                self._publish()
                self._lock.wait(0.05 if busy else 0.5)

    def _step(self) -> bool:
        for group in self._groups:
            if not group.launched and all(self._pairs[p][0] is group for p in group.peers):
                group.launched = True
                for op in group.ops:
                    self._launch(op, group.batched)
        for group in [g for g in self._groups if g.launched]:
            if all(op.done.is_set() for op in group.ops):
                self._groups.remove(group)
                for peer in group.peers:
                    self._pairs[peer].popleft()
        return bool(self._groups)

    def _tags(self, op: _Op, batched: bool) -> tuple[int, int]:
        data = 4 * op.tag + 2 * batched  # grouped and lone ops never match each other
        return data, data + 1

    def _launch(self, op: _Op, batched: bool) -> None:
        data, ack = self._tags(op, batched)
        try:  # posted here, in issue order: gloo matches same-tag ops of a pair in posting order
            if op.kind == "send":  # done when the receiver has the data and says so
                op.works = [self._gloo.send([op.tensor], op.peer, data), self._gloo.recv([op.ack], op.peer, ack)]
            else:
                op.works = [self._gloo.recv([op.tensor], op.peer, data)]
        except RuntimeError as error:  # e.g. gloo closed the pair after its timeout: the caller's error
            op.error = error
            op.done.set()
            return
        threading.Thread(target=self._finish, args=(op, ack), daemon=True).start()

    def _finish(self, op: _Op, ack: int) -> None:
        """Wait for gloo (whose works complete only in ``wait``), then mark ``op`` done."""
        try:
            for work in op.works:
                work.wait()
            if op.kind == "recv":
                self._gloo.send([op.ack], op.peer, ack).wait()
        except BaseException as error:  # reported to the waiting caller
            op.error = error
        op.done.set()
        with self._lock:
            self._lock.notify_all()

    # ---- deadlock report ----------------------------------------------------------------------

    def _pending(self) -> str:
        lines = []
        for group in self._groups:
            state = "running" if group.launched else "queued behind earlier ops of its pair"
            lines += [f"{op.label}: {state}" for op in group.ops if not op.done.is_set()]
        return "; ".join(lines) or "nothing pending"

    def _publish(self) -> None:
        stuck = self._groups and time.monotonic() - self._groups[0].issued > _PUBLISH_AFTER_S
        text = self._pending() if stuck else ("nothing pending" if not self._groups else self._published)
        if text != self._published:
            self._state.set(str(self.rank()), text)
            self._published = text

    def deadlock_report(self, op: _Op) -> str:
        """The error for ``op``, still not done after the timeout: every rank's pending ops."""
        ranks = dist.get_process_group_ranks(self)
        lines = [
            f"NCCL point-to-point rules: deadlock. Rank {ranks[self.rank()]} waited {self.rules_timeout_s:g} s "
            f"for {op.label}. Under NCCL ops between two ranks run in issue order and a send or receive "
            "blocks until its peer's matching op runs: put a step's sends and receives in one "
            "batch_isend_irecv. Pending ops per rank (ranks named by global rank, peers by group rank):"
        ]
        for r in range(self.size()):
            text = self._state.get(str(r)).decode() if r != self.rank() else self._pending()
            lines.append(f"  rank {ranks[r]}: {text}")
        return "\n".join(lines)


# Every collective of ProcessGroup's Python API, under each name torch 2.13 binds or looks up
# (the trampoline tries the new name first, then the old one: all_gather_single_coalesced, then
# allgather_into_tensor_coalesced).
_COLLECTIVES = (
    "allreduce", "allreduce_coalesced", "broadcast", "barrier", "reduce",
    "allgather", "allgather_coalesced", "all_gather_single", "_allgather_base",
    "all_gather_single_coalesced", "allgather_into_tensor_coalesced",
    "reduce_scatter", "reduce_scatter_single", "_reduce_scatter_base",
    "reduce_scatter_single_coalesced", "reduce_scatter_tensor_coalesced",
    "alltoall", "all_to_all_single", "alltoall_base", "gather", "scatter",
)  # fmt: skip


def _through_gloo(name: str):
    def collective(self: NcclRulesProcessGroup, *args, **kwargs) -> dist.Work:
        return getattr(self._collectives, name)(*args, **kwargs)

    collective.__name__ = collective.__qualname__ = name
    collective.__doc__ = f"Gloo's ``{name}``, called without the GIL (Note [Collectives of a Python process group])."
    return collective


for _name in _COLLECTIVES:
    setattr(NcclRulesProcessGroup, _name, _through_gloo(_name))


def _create(store: dist.Store, rank: int, size: int, timeout: datetime.timedelta) -> NcclRulesProcessGroup:
    return NcclRulesProcessGroup(store, rank, size, timeout)


_original_batch_isend_irecv = dist.batch_isend_irecv


def _batch_isend_irecv(p2p_op_list: list[dist.P2POp]) -> list[dist.Work]:
    group = p2p_op_list[0].group if p2p_op_list else None
    group = group if group is not None else dist.group.WORLD
    if not isinstance(group, NcclRulesProcessGroup):
        return _original_batch_isend_irecv(p2p_op_list)
    group.begin_group()
    try:
        return _original_batch_isend_irecv(p2p_op_list)
    finally:
        group.end_group()


def install() -> None:
    """Register the ``"nccl_rules"`` backend for CPU and let it see ``batch_isend_irecv`` groups (idempotent)."""
    if BACKEND.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(BACKEND, _create, devices=["cpu"])
    dist.batch_isend_irecv = _batch_isend_irecv
    dist.distributed_c10d.batch_isend_irecv = _batch_isend_irecv
