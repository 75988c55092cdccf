"""DTensor in, DTensor out: unwrap sequence-sharded DTensors for the strategies, and wrap results."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.tensor import DTensor, Shard

__all__ = ["to_local_checked", "from_local_like"]


def to_local_checked(tensors: Sequence[torch.Tensor], cp_group, seq_dim: int):
    """Local shards of ``tensors``; DTensors must be ``Shard(seq_dim)`` on ``cp_group.cp_mesh``.

    Returns:
        ``(locals, like)``: the local tensors, and the first DTensor (or ``None``) to wrap outputs like.

    Raises:
        ValueError: Some inputs are DTensors and some are not, or a DTensor is placed otherwise.
    """
    is_dt = [isinstance(t, DTensor) for t in tensors]
    if not any(is_dt):
        return list(tensors), None
    if not all(is_dt):
        raise ValueError("Pass either all DTensors or all local tensors to the attention, not a mix.")
    for t in tensors:
        placements = tuple(t.placements)
        if t.device_mesh != cp_group.cp_mesh or placements != (Shard(seq_dim % t.dim()),):
            raise ValueError(
                f"DTensor inputs must be sharded on the sequence dim: placements (Shard({seq_dim % t.dim()}),) "
                f"on the cp mesh {cp_group.cp_mesh}, got {placements} on {t.device_mesh}. Use "
                "cp_group.distribute_sequence(x, seq_dim=...) to build them."
            )
    return [t.to_local() for t in tensors], tensors[0]


def from_local_like(out: torch.Tensor, like: DTensor | None) -> torch.Tensor:
    """Wrap ``out`` as a DTensor placed like ``like`` (identity when ``like`` is ``None``)."""
    if like is None:
        return out
    return DTensor.from_local(out, like.device_mesh, like.placements, run_check=False)
