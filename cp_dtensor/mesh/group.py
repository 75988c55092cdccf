"""The context-parallel group: a named ``DeviceMesh`` and the sequence layout it shards with.

Usage under ``torchrun --standalone --nproc-per-node 4 script.py``::

    cp_group = init_context_parallel_group(cp_size=2)       # mesh ("dp", "cp") = (2, 2)
    cp_group = init_context_parallel_group(2, tp_size=2)    # mesh ("dp", "cp", "tp") = (1, 2, 2)
    x_local = cp_group.partition_sequence(x, seq_dim=1)      # this rank's zigzag shard
    pos = cp_group.position_ids(x.shape[1])                  # global positions, for RoPE
"""

from __future__ import annotations

import atexit
import datetime
import functools
import itertools
import os
import weakref
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from cp_dtensor.arguments import check_int, check_positive_int
from cp_dtensor.mesh.sharding import check_sequence_dtensor
from cp_dtensor.positions.layout import (
    Layout,
    Run,
    check_layout,
    check_seq_len,
    padded_length,
    shard_positions,
    shard_runs,
)

__all__ = ["ContextParallelGroup", "init_context_parallel_group"]


def _as_timedelta(timeout: float | datetime.timedelta | None) -> datetime.timedelta | None:
    if timeout is None or (isinstance(timeout, datetime.timedelta) and timeout.total_seconds() > 0):
        return timeout
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and 0 < timeout < float("inf"):
        return datetime.timedelta(seconds=timeout)
    raise ValueError(f"timeout must be a positive number of seconds or a timedelta, got {timeout!r}.")


def _axis_options(device_type: str, backend: str | None, timeout: datetime.timedelta | None):
    """A ``backend_override`` entry that gives the process groups of one mesh axis ``timeout``.

    ``init_device_mesh`` creates the groups of its axes with the c10d default timeout (30 min), not
    the default group's, and an axis that spans the world reuses the default group, which the user
    may have made without one (both checked in torch 2.13). Backend options carrying ``_timeout``
    are what DeviceMesh forwards to the groups it creates, so every axis gets fresh options.
    """
    if timeout is None:
        return None
    if device_type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = False
    else:
        options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    return (backend or ("nccl" if device_type == "cuda" else "gloo"), options)


def _init_default_process_group(device_type: str, backend: str | None, timeout) -> None:
    """Start the default process group from the torchrun environment, or a one-process world."""
    backend = backend or ("nccl" if device_type == "cuda" else "gloo")
    kwargs = {} if timeout is None else {"timeout": timeout}
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if device_type == "cuda":  # bind the rank to its GPU: NCCL need not guess the device from the rank
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local_rank)
            kwargs["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(backend=backend, **kwargs)
    else:  # plain `python script.py`: a world of one, so the same code runs unchanged
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    # We started it, so we end it: gloo aborts the interpreter ("terminate called without an active
    # exception") when its threads are still alive at exit.
    atexit.register(_destroy_default_process_group)


def _destroy_default_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# Every live group, by key: compiled attention names its group by key (Note [Attention as a custom op]
# in cp_dtensor.attention.compiled). A key names a group and the copies with_layout makes of it (same
# meshes); each is held weakly, so a key lives as long as any of them and the registry stays as small
# as the set of groups in use. The counter keeps keys unique for the process's life.
_GROUPS: dict[str, list[weakref.ref[ContextParallelGroup]]] = {}
_NEXT_KEY = itertools.count()


def _register(group: ContextParallelGroup) -> None:
    """Hold ``group`` weakly under its key, and forget the groups that are gone (and keys with none left)."""
    for key in list(_GROUPS):
        _GROUPS[key] = [ref for ref in _GROUPS[key] if ref() is not None]
        if not _GROUPS[key]:
            del _GROUPS[key]
    _GROUPS.setdefault(group.key, []).append(weakref.ref(group))


@dataclass
class ContextParallelGroup:
    """A device mesh with a context-parallel axis ``"cp"`` and the layout used to shard sequences.

    Attributes:
        mesh: The whole mesh, axes named ``("dp", "cp")``; with ``ulysses_size``, axes
            ``("dp", "ring", "ulysses")`` and ``"cp"`` their flattened ``("ring", "ulysses")``. With
            ``tp_size > 1`` a last axis ``"tp"`` follows (``("dp", "cp", "tp")``), so that a tensor-parallel
            group is consecutive ranks.
        layout: ``"zigzag"`` (default, balances causal work), ``"contiguous"``, or a
            :class:`~cp_dtensor.positions.layout.DocumentZigzag` (balances packed documents; see :meth:`with_layout`).
        flat_cp_mesh: The ``"cp"`` mesh flattened from ``("ring", "ulysses")``, kept here because torch
            deprecates slicing a flattened dim from the root mesh; ``None`` without ``ulysses_size``.
        flat_dp_cp_mesh: The dp and cp axes flattened to one, ``"dp_cp"``: the ranks that hold the same
            tensor-parallel shard, over which gradients are summed; ``None`` without a ``"tp"`` axis
            (the dp and cp axes then span the world).
    """

    mesh: DeviceMesh
    layout: Layout = "zigzag"
    flat_cp_mesh: DeviceMesh | None = None
    flat_dp_cp_mesh: DeviceMesh | None = None
    key: str = field(default="", compare=False, repr=False)
    """Names the group's meshes in compiled graphs (Note [Attention as a custom op] in
    :mod:`cp_dtensor.attention.compiled`); shared by the copies :meth:`with_layout` makes."""

    def __post_init__(self) -> None:
        if not self.key:
            self.key = f"cp_group_{next(_NEXT_KEY)}"
            _register(self)
            # Slice the sub-meshes now: torch.compile cannot enter a cached_property's lock (Python 3.11).
            self.cp_mesh, self.dp_mesh  # noqa: B018

    @staticmethod
    def from_key(key: str) -> ContextParallelGroup:
        """The live group registered under ``key`` (its meshes; its layout as created).

        Raises:
            ValueError: No live group has ``key`` (the group was garbage-collected, or made in another process).
        """
        group = next((g for ref in _GROUPS.get(key, []) if (g := ref()) is not None), None)
        if group is None:
            raise ValueError(
                f"No live ContextParallelGroup has key {key!r}: keep the group that a compiled model was traced "
                "with alive while the model runs."
            )
        return group

    def with_layout(self, layout: Layout) -> ContextParallelGroup:
        """The same group (same meshes and process groups, no communication) sharding with ``layout``.

        For a :class:`~cp_dtensor.positions.layout.DocumentZigzag`, whose segments change with every packed
        batch: ``group.with_layout(DocumentZigzag.from_document_ids(ids_L))`` per batch is cheap.

        Raises:
            ValueError: ``layout`` is not a name in :data:`~cp_dtensor.LAYOUTS` or a ``DocumentZigzag``.
        """
        check_layout(layout)
        new = replace(self, layout=layout)
        for name in ("cp_mesh", "dp_mesh"):  # sliced sub-meshes carry over (slicing is not free)
            if name in self.__dict__:
                new.__dict__[name] = self.__dict__[name]
        _register(new)  # the key lives as long as any copy does
        return new

    @functools.cached_property
    def cp_mesh(self) -> DeviceMesh:
        """The 1-D sub-mesh of the context-parallel axis (sliced once: slicing a mesh is not free)."""
        return self.mesh["cp"] if self.flat_cp_mesh is None else self.flat_cp_mesh

    @functools.cached_property
    def dp_mesh(self) -> DeviceMesh:
        """The 1-D sub-mesh of the data-parallel axis."""
        return self.mesh["dp"]

    @property
    def process_group(self) -> dist.ProcessGroup:
        """The process group of the cp axis (the ring)."""
        return self.cp_mesh.get_group()

    @property
    def rank(self) -> int:
        """This process's index along the cp axis."""
        return self.cp_mesh.get_local_rank()

    @property
    def size(self) -> int:
        """Number of ranks along the cp axis (``P``)."""
        return self.cp_mesh.size()

    @property
    def ulysses_size(self) -> int | None:
        """Ranks per Ulysses group (``u``), or ``None`` when the group was built without ``ulysses_size``."""
        names = self.mesh.mesh_dim_names or ()
        return self.mesh["ulysses"].size() if "ulysses" in names else None

    @property
    def ulysses_mesh(self) -> DeviceMesh:
        """The 1-D sub-mesh of ``u`` consecutive cp ranks that exchange heads (hybrid attention)."""
        return self.mesh[self._hybrid_axis("ulysses")]

    @property
    def ring_mesh(self) -> DeviceMesh:
        """The 1-D sub-mesh that links the ``P // u`` Ulysses groups in a ring (hybrid attention)."""
        return self.mesh[self._hybrid_axis("ring")]

    @property
    def tp_size(self) -> int:
        """Ranks per tensor-parallel group; 1 when the mesh has no ``"tp"`` axis."""
        return self.mesh["tp"].size() if "tp" in (self.mesh.mesh_dim_names or ()) else 1

    @property
    def tp_mesh(self) -> DeviceMesh:
        """The 1-D sub-mesh of the ``tp_size`` consecutive ranks that split the heads and MLP width.

        Raises:
            ValueError: The group was built without ``tp_size > 1``.
        """
        if self.tp_size == 1:
            raise ValueError(
                "This group has no 'tp' axis: build it with init_context_parallel_group(cp_size, tp_size=t), "
                "t > 1, for tensor parallelism."
            )
        return self.mesh["tp"]

    def _hybrid_axis(self, name: str) -> str:
        if self.ulysses_size is None:
            raise ValueError(
                f"This group has no {name!r} axis: build it with "
                "init_context_parallel_group(cp_size, ulysses_size=u) for hybrid attention."
            )
        return name

    @property
    def replica_group(self) -> dist.ProcessGroup:
        """The process group of every rank that holds a replica of this rank's parameters: the dp x cp ranks.

        Gradients and the loss's token counts are summed over it. The world group when the mesh has no
        ``"tp"`` axis (the mesh spans every rank, as :func:`init_context_parallel_group` builds it);
        else the flattened ``"dp_cp"`` axis: the ranks with this rank's tp index.
        """
        assert self.mesh.size() == dist.get_world_size(), "the (dp, cp, tp) mesh must span the world"
        if self.flat_dp_cp_mesh is not None:
            return self.flat_dp_cp_mesh.get_group()
        return dist.group.WORLD

    @property
    def device_type(self) -> str:
        """``"cpu"`` or ``"cuda"``."""
        return self.mesh.device_type

    def runs(self, seq_len: int, rank: int | None = None) -> list[Run]:
        """Runs ``(start, length)`` of global positions held by ``rank`` (default: this rank).

        Raises:
            ValueError: ``seq_len`` does not split evenly, or ``rank`` is not an int in ``[0, P)``.
        """
        check_int("seq_len", seq_len)
        return shard_runs(seq_len, self.size, self.rank if rank is None else check_int("rank", rank), self.layout)

    def position_ids(self, seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Global positions of this rank's tokens, a ``(seq_len // P,)`` long tensor (for RoPE, labels).

        Raises:
            ValueError: ``seq_len`` is not an int that splits evenly (the message names the fix).
        """
        return shard_positions(check_int("seq_len", seq_len), self.size, self.rank, self.layout).to(device or "cpu")

    def partition_sequence(self, x: torch.Tensor, seq_dim: int = 1, pad: bool = False) -> torch.Tensor:
        """This rank's shard of a full sequence, in the group's layout.

        Args:
            x: The full tensor, identical on every rank of the cp axis; its ``seq_dim`` has length
                ``L``, a multiple of ``P`` (contiguous) or ``2P`` (zigzag) unless ``pad``; under a
                :class:`~cp_dtensor.positions.layout.DocumentZigzag`, the sum of its segments (``pad`` adds nothing).
            seq_dim: The sequence dimension.
            pad: Append zeros up to the next multiple first (``padded_length(L, P, layout)``). Then
                pass ``seq_len=L`` to :func:`~cp_dtensor.ring_attention` so the padding is masked.

        Returns:
            The local shard, ``L // P`` (padded: ``L_pad // P``) long on ``seq_dim``. Differentiable.

        Raises:
            ValueError: ``L`` does not split evenly and ``pad`` is off (the message names the multiple
                and the fix), ``L`` is 0, or ``pad`` is not a bool.
        """
        seq_dim = _check_seq_dim(x, seq_dim)
        if not isinstance(pad, bool):
            raise ValueError(f"pad must be a bool, got {pad!r}.")
        if pad:
            x = _pad_to(x, seq_dim, padded_length(_seq_len(x, seq_dim), self.size, self.layout))
        runs = self.runs(_seq_len(x, seq_dim))
        return torch.cat([x.narrow(seq_dim, start, length) for start, length in runs], dim=seq_dim)

    def gather_sequence(self, x_local: torch.Tensor, seq_dim: int = 1) -> torch.Tensor:
        """The full sequence in natural order on every rank: the inverse of :meth:`partition_sequence`.

        Args:
            x_local: This rank's shard in the group's layout (as :meth:`partition_sequence` and the
                strategies' local outputs are), or a DTensor placed ``Shard(seq_dim)`` on the cp mesh
                (natural order, as :meth:`distribute_sequence` and the strategies' DTensor outputs are).
            seq_dim: The sequence dimension.

        Returns:
            The full tensor, ``P`` times longer on ``seq_dim`` (a plain tensor). Differentiable: for a
            local shard the backward sums every rank's gradient into its shard (an all-gather's
            backward, reduce-scatter); for a DTensor it is ``full_tensor()``'s (the gradient of a
            replicated result, not summed).

        Raises:
            ValueError: A DTensor placed otherwise than ``Shard(seq_dim)`` on the cp mesh.
        """
        seq_dim = _check_seq_dim(x_local, seq_dim)
        if isinstance(x_local, DTensor):
            check_sequence_dtensor(x_local, self, seq_dim)
            return x_local.full_tensor()
        if self.size == 1:
            return x_local
        # all_gather_tensor_autograd is deprecated (a warning per call) in favour of the newer name
        gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
        stacked = gather(x_local.movedim(seq_dim, 0).contiguous(), 0, self.process_group)
        shards = stacked.chunk(self.size, dim=0)  # rank r's shard, sequence first
        seq_len = stacked.shape[0]
        pieces: list[tuple[int, torch.Tensor]] = []
        for rank, shard in enumerate(shards):
            offset = 0
            for start, length in self.runs(seq_len, rank):
                pieces.append((start, shard[offset : offset + length]))
                offset += length
        full = torch.cat([piece for _, piece in sorted(pieces, key=lambda p: p[0])], dim=0)
        return full.movedim(0, seq_dim)

    def distribute_sequence(self, x: torch.Tensor, seq_dim: int = 1, pad: bool = False) -> DTensor:
        """``x`` as a DTensor placed ``Shard(seq_dim)`` on the cp axis, in natural order (no communication).

        The same DTensor as ``distribute_tensor(x, cp_group.cp_mesh, [Shard(seq_dim)])``: rank ``r``
        holds the ``r``-th contiguous chunk and ``full_tensor()`` is ``x``. ``x`` must be identical on
        every rank of the cp axis (each rank keeps its own chunk; nothing is sent). The strategies
        accept it and move it into the group's layout themselves, which costs one all-to-all per
        input and output under zigzag (see Note [Re-laying out a DTensor] in
        :mod:`cp_dtensor.mesh.sharding`); local shards from :meth:`partition_sequence` cost nothing.

        Args:
            x: The full tensor.
            seq_dim: The sequence dimension.
            pad: Append zeros up to a length the group's layout splits evenly (see :meth:`partition_sequence`).

        Returns:
            A ``DTensor`` of global shape ``x.shape`` (padded on ``seq_dim`` with ``pad``). Differentiable.

        Raises:
            ValueError: As :meth:`partition_sequence`.
        """
        seq_dim = _check_seq_dim(x, seq_dim)
        if not isinstance(pad, bool):
            raise ValueError(f"pad must be a bool, got {pad!r}.")
        if pad:
            x = _pad_to(x, seq_dim, padded_length(_seq_len(x, seq_dim), self.size, self.layout))
        check_seq_len(_seq_len(x, seq_dim), self.size, self.layout)
        chunk = _seq_len(x, seq_dim) // self.size
        local = x.narrow(seq_dim, self.rank * chunk, chunk).contiguous()
        return DTensor.from_local(local, self.cp_mesh, [Shard(seq_dim)], run_check=False)


def _check_seq_dim(x: torch.Tensor, seq_dim: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"Expected a torch.Tensor, got {type(x).__name__}.")
    if not isinstance(seq_dim, int) or not -x.dim() <= seq_dim < x.dim():
        raise ValueError(f"seq_dim={seq_dim!r} is out of range for a tensor with {x.dim()} dims.")
    return seq_dim % x.dim()


def _seq_len(x: torch.Tensor, seq_dim: int) -> int:
    return x.shape[seq_dim]


def _pad_to(x: torch.Tensor, seq_dim: int, length: int) -> torch.Tensor:
    """``x`` with zeros appended on ``seq_dim`` up to ``length`` (differentiable)."""
    missing = length - _seq_len(x, seq_dim)
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[seq_dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=seq_dim)


def init_context_parallel_group(
    cp_size: int,
    *,
    dp_size: int | None = None,
    layout: str = "zigzag",
    device_type: str | None = None,
    backend: str | None = None,
    timeout: float | datetime.timedelta | None = None,
    ulysses_size: int | None = None,
    tp_size: int = 1,
) -> ContextParallelGroup:
    """Build the ``("dp", "cp")`` device mesh for context parallelism (``("dp", "cp", "tp")`` with tensor parallelism).

    Initialises the default process group first if needed: from the torchrun environment (NCCL when
    CUDA is available, gloo on CPU), or as a one-process world under plain ``python``.

    Args:
        cp_size: Ranks that share one sequence (``P``).
        dp_size: Data-parallel replicas; default ``world_size // cp_size``.
        layout: How sequences are sharded: ``"zigzag"`` (balanced causal work) or ``"contiguous"``.
        device_type: ``"cuda"`` or ``"cpu"``; default ``"cuda"`` when available.
        backend: Process-group backend; default ``"nccl"`` on CUDA, ``"gloo"`` on CPU.
        timeout: Seconds (or a timedelta) after which a collective or ring transfer that never
            completes raises (a peer that died or hangs). Applied to every process group of the
            mesh, also when the default group was created without it. Default: the backend's.
        ulysses_size: For hybrid attention: ranks per Ulysses group ``u`` (divides ``cp_size``). The
            mesh is then ``("dp", "ring", "ulysses") = (dp_size, cp_size // u, u)`` with
            ``("ring", "ulysses")`` flattened to ``"cp"``: each Ulysses group is ``u`` consecutive
            cp ranks. ``None`` (default): the plain ``("dp", "cp")`` mesh.
        tp_size: Tensor-parallel ranks (``t``) that split the heads and MLP width of each layer
            (:func:`~cp_dtensor.parallelize_for_tp`). With ``t > 1`` the mesh gets a last axis
            ``"tp"``: ``("dp", "cp", "tp") = (dp_size, cp_size, t)`` (``"ring", "ulysses"`` in place of
            ``"cp"`` with ``ulysses_size``), so each tp group is ``t`` consecutive ranks, the fastest
            links on a node. 1 (default): no ``"tp"`` axis.

    Returns:
        The :class:`ContextParallelGroup`.

    Raises:
        ValueError: A size is not a positive int, ``dp_size * cp_size * tp_size`` is not the world size,
            ``ulysses_size`` does not divide ``cp_size``, or the layout is unknown.
    """
    check_positive_int("cp_size", cp_size)
    check_positive_int("tp_size", tp_size)
    if backend is not None and not isinstance(backend, str):
        raise ValueError(f"backend must be None or a backend name such as 'gloo' or 'nccl', got {backend!r}.")
    if ulysses_size is not None and cp_size % check_positive_int("ulysses_size", ulysses_size):
        raise ValueError(
            f"ulysses_size={ulysses_size} must divide cp_size={cp_size} (the cp axis is split into "
            f"cp_size // ulysses_size ring steps of ulysses_size ranks each)."
        )
    check_layout(layout)
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"Invalid device_type {device_type!r}. Must be one of: 'cpu', 'cuda'.")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device_type='cuda' but torch.cuda.is_available() is False: use device_type='cpu' (gloo).")
    timeout = _as_timedelta(timeout)
    if not dist.is_initialized():
        _init_default_process_group(device_type, backend, timeout)
    world_size = dist.get_world_size()
    replica_size = cp_size * tp_size  # ranks that hold one data-parallel replica
    if dp_size is None:
        if world_size % replica_size:
            sizes = f"cp_size={cp_size}" if tp_size == 1 else f"cp_size * tp_size = {cp_size} * {tp_size}"
            raise ValueError(f"{sizes} does not divide the world size {world_size}.")
        dp_size = world_size // replica_size
    check_positive_int("dp_size", dp_size)
    if dp_size * replica_size != world_size:
        names, sizes = ("dp_size * cp_size", f"{dp_size} * {cp_size}")
        if tp_size > 1:
            names, sizes = names + " * tp_size", sizes + f" * {tp_size}"
        raise ValueError(f"{names} = {sizes} = {dp_size * replica_size} must equal the world size {world_size}.")
    cp_names = ("cp",) if ulysses_size is None else ("ring", "ulysses")
    cp_shape = (cp_size,) if ulysses_size is None else (cp_size // ulysses_size, ulysses_size)
    tp_names, tp_shape = (("tp",), (tp_size,)) if tp_size > 1 else ((), ())
    names = ("dp", *cp_names, *tp_names)
    override = None if timeout is None else {n: _axis_options(device_type, backend, timeout) for n in names}
    # Row-major: the last axis varies fastest, so each tp group (and, inside cp, each Ulysses group:
    # cp rank = ring rank * u + ulysses rank) is consecutive ranks.
    shape = (dp_size, *cp_shape, *tp_shape)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=names, backend_override=override)
    flat_options = _axis_options(device_type, backend, timeout)
    flat_cp_mesh = None if ulysses_size is None else mesh[cp_names]._flatten("cp", backend_override=flat_options)
    flat_dp_cp_mesh = None if tp_size == 1 else mesh[("dp", *cp_names)]._flatten("dp_cp", backend_override=flat_options)
    return ContextParallelGroup(mesh=mesh, layout=layout, flat_cp_mesh=flat_cp_mesh, flat_dp_cp_mesh=flat_dp_cp_mesh)
