"""DTensor in, DTensor out: unwrap sequence-sharded DTensors for the strategies, and wrap results.

Note [Re-laying out a DTensor]
------------------------------
A DTensor placed ``Shard(d)`` on the cp mesh means what it means everywhere in torch: its logical
tensor is the sequence in natural order, and rank ``r`` holds the ``r``-th contiguous chunk. That
is what ``distribute_tensor`` builds, and what every torch op, ``full_tensor()``, DCP, and the loss
and metric code downstream assume. The strategies, however, compute on shards in the group's
layout (zigzag by default, or a :class:`~cp_dtensor.positions.layout.DocumentZigzag`), which hold other
positions. So a DTensor input is moved from contiguous chunks to the group's layout by one uneven
all-to-all (:func:`cp_dtensor.comm.collectives.relayout`: each rank sends each other rank exactly the
tokens it needs, never the whole sequence), the strategy computes, and the output is moved back and
returned as a ``Shard(d)`` DTensor whose ``full_tensor()`` is the natural-order result. Gradients
take the inverse exchanges. Under ``layout="contiguous"`` nothing moves.

Why not let a DTensor carry the permuted order instead (a marker, or a placement of our own)? A
marker would not survive: torch ops on a DTensor return new DTensors that keep the placement but
not our attributes, so ``linear(permuted)`` is still permuted but no longer says so, and would be
read as natural order: the silent wrong answer this design exists to prevent. A custom placement
would have to teach every torch op. With one meaning there is nothing to lose.

The cost: under zigzag a rank sends up to its whole shard of each input and output (half of it at
``P = 2``; only the tokens its contiguous chunk and its zigzag shard do not share), counted by
:func:`cp_dtensor.count_comm` as ``"relayout"``: per attention call three inputs and one output
forward, and as many backward. The fast path stays local tensors from
``cp_group.partition_sequence``, which are already in the layout; :class:`~cp_dtensor.ContextParallelAttention`
given a DTensor moves only its input and output, not q, k and v.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from cp_dtensor.comm.collectives import relayout
from cp_dtensor.comm.counter import record_comm
from cp_dtensor.positions.layout import check_seq_len

if TYPE_CHECKING:
    from cp_dtensor.mesh.group import ContextParallelGroup

__all__ = [
    "SequenceDTensor",
    "check_sequence_dtensor",
    "to_local_checked",
    "from_local_like",
    "global_document_ids",
    "local_sinks",
]


@dataclass(frozen=True)
class SequenceDTensor:
    """How DTensor inputs were placed, so that outputs go back the same way (:func:`from_local_like`).

    Attributes:
        cp_group: The group whose layout the local shards were moved into.
        seq_dim: The sequence dimension (of the inputs, and of the outputs to wrap).
        seq_len: The global sequence length.
    """

    cp_group: ContextParallelGroup
    seq_dim: int
    seq_len: int


def check_sequence_dtensor(t: DTensor, cp_group: ContextParallelGroup, seq_dim: int) -> int:
    """Raise ``ValueError`` unless ``t`` is ``Shard(seq_dim)`` on ``cp_group.cp_mesh``; return ``seq_dim`` >= 0."""
    seq_dim = seq_dim % t.dim()
    placements = tuple(t.placements)
    if t.device_mesh != cp_group.cp_mesh or placements != (Shard(seq_dim),):
        raise ValueError(
            f"DTensor inputs must be sharded on the sequence dim: placements (Shard({seq_dim}),) "
            f"on the cp mesh {cp_group.cp_mesh}, got {placements} on {t.device_mesh}. Build them with "
            f"distribute_tensor(x, cp_group.cp_mesh, [Shard({seq_dim})]) or "
            f"cp_group.distribute_sequence(x, seq_dim={seq_dim})."
        )
    return seq_dim


def to_local_checked(
    tensors: Sequence[torch.Tensor], cp_group: ContextParallelGroup, seq_dim: int
) -> tuple[list[torch.Tensor], SequenceDTensor | None]:
    """Local shards of ``tensors`` in ``cp_group``'s layout; DTensors must be ``Shard(seq_dim)`` on the cp mesh.

    A DTensor's local shard is a contiguous chunk of the natural-order sequence; unless the group's
    layout is ``"contiguous"`` it is moved into the layout with one uneven all-to-all per tensor,
    counted as ``"relayout"`` (see Note [Re-laying out a DTensor]). Local tensors pass through as they are.

    Args:
        tensors: All local shards (as ``partition_sequence`` makes them) or all DTensors.
        cp_group: The context-parallel group.
        seq_dim: The sequence dimension.

    Returns:
        ``(locals, like)``: the local tensors in the group's layout, and a :class:`SequenceDTensor` to
        wrap outputs with (``None`` for local inputs).

    Raises:
        ValueError: Some inputs are DTensors and some are not, a DTensor is placed otherwise, or its
            sequence length does not fit the group's layout.
    """
    is_dt = [isinstance(t, DTensor) for t in tensors]
    if not any(is_dt):
        return list(tensors), None
    if not all(is_dt):
        raise ValueError("Pass either all DTensors or all local tensors to the attention, not a mix.")
    dims = [check_sequence_dtensor(t, cp_group, seq_dim) for t in tensors]
    lengths = sorted({t.shape[d] for t, d in zip(tensors, dims)})
    if len(lengths) != 1:
        raise ValueError(f"DTensor inputs must share one sequence length, got {lengths}.")
    check_seq_len(lengths[0], cp_group.size, cp_group.layout)
    like = SequenceDTensor(cp_group, dims[0], lengths[0])
    locals_ = [
        relayout(
            t.to_local(),
            cp_group.process_group,
            seq_dim=like.seq_dim,
            seq_len=like.seq_len,
            src="contiguous",
            dst=cp_group.layout,
        )
        for t in tensors
    ]
    return locals_, like


def from_local_like(out: torch.Tensor, like: SequenceDTensor | None) -> torch.Tensor:
    """Wrap ``out`` (local, in the group's layout) as a natural-order ``Shard(seq_dim)`` DTensor; identity for ``None``.

    Moves ``out`` back to contiguous chunks first (one uneven all-to-all, ``"relayout"``), so that
    ``full_tensor()`` is the result in natural order. Differentiable.
    """
    if like is None:
        return out
    group = like.cp_group
    out = relayout(
        out, group.process_group, seq_dim=like.seq_dim, seq_len=like.seq_len, src=group.layout, dst="contiguous"
    )
    return DTensor.from_local(out, group.cp_mesh, [Shard(like.seq_dim)], run_check=False)


def global_document_ids(document_ids: torch.Tensor | None, cp_group: ContextParallelGroup) -> torch.Tensor | None:
    """``document_ids`` as :func:`~cp_dtensor.attention.call.mask_spec` takes them: a DTensor becomes its ``(B, L)``.

    A DTensor of ids is ``Shard(1)`` (natural order, gathered once: ``B * L`` integers, counted as
    ``"mask_gather"``) or ``Replicate()`` on the cp mesh; local ids pass through.

    Raises:
        ValueError: A DTensor placed otherwise.
    """
    if not isinstance(document_ids, DTensor):
        return document_ids
    placements = tuple(document_ids.placements)
    if document_ids.device_mesh != cp_group.cp_mesh or placements not in ((Shard(1),), (Replicate(),)):
        raise ValueError(
            f"document_ids as a DTensor must be placed (Shard(1),) or (Replicate(),) on the cp mesh "
            f"{cp_group.cp_mesh}, got {placements} on {document_ids.device_mesh}."
        )
    if placements == (Shard(1),) and cp_group.size > 1:
        local = document_ids.to_local()
        record_comm("mask_gather", local.numel() * local.element_size() * (cp_group.size - 1))
    return document_ids.full_tensor()


def local_sinks(sinks: torch.Tensor | None) -> torch.Tensor | None:
    """``sinks`` as the call attends with them: a DTensor becomes its local heads (differentiably).

    A tensor-parallel parameter is sharded over heads, as the queries are; a plain tensor passes through.
    """
    return sinks.to_local() if isinstance(sinks, DTensor) else sinks
