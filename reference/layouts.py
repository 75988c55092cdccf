r"""Sequence layouts: which global token positions each (virtual) rank holds.

A layout splits a sequence of ``L`` tokens over ``P`` ranks. Three are offered (``LAYOUTS``):

* ``"contiguous"``: ``P`` equal chunks; rank ``r`` holds chunk ``r``.
* ``"zigzag"``: ``2P`` equal chunks; rank ``r`` holds chunk ``r`` and then chunk ``2P - 1 - r``
  (the causal load-balancing layout of Llama 3 / Megatron-LM, "headtail" in PyTorch's CP).
* ``"striped"``: round-robin tokens; rank ``r`` holds ``r, r + P, r + 2P, ...`` (Striped Attention,
  Brandon et al. 2023).

Note [Causal load balance of the layouts]
    Under a causal mask, query chunk ``i`` attends key chunks ``j <= i``. Cut a sequence into 4
    quarters and spread it over ``P = 2`` ranks; ``#`` is a full block of the score matrix, ``\`` a
    diagonal block (half of its pairs), ``.`` nothing to compute::

        contiguous: rank 0 = q0,q1      zigzag: rank 0 = q0,q3
                    rank 1 = q2,q3              rank 1 = q1,q2

                    k0 k1 k2 k3                     k0 k1 k2 k3
        rank 0  q0  \  .  .  .          rank 0  q0  \  .  .  .
                q1  #  \  .  .                  q3  #  #  #  \
        rank 1  q2  #  #  \  .          rank 1  q1  #  \  .  .
                q3  #  #  #  \                  q2  #  #  \  .

        work in blocks (a diagonal block is half a block):
            contiguous: rank 0 = 1 + 2/2 = 2,  rank 1 = 5 + 2/2 = 6   (max / mean = 1.5)
            zigzag:     rank 0 = 3 + 2/2 = 4,  rank 1 = 3 + 2/2 = 4   (max / mean = 1.0)

    Contiguous makes the last rank do ``(2P - 1) / P`` times the mean work; zigzag pairs an early
    chunk with a late one, so every rank does the same work.

Shape legend: L sequence length, P world size, S = L / P tokens per rank.
"""

from __future__ import annotations

import torch

__all__ = ["LAYOUTS", "num_chunks", "shard", "shard_indices", "unshard"]

LAYOUTS = ("contiguous", "zigzag", "striped")
"""Names of the layouts the simulation offers (see the module docstring for each)."""


def num_chunks(world_size: int, layout: str) -> int:
    """Number of equal pieces the sequence is cut into; the sequence length must divide by it.

    Args:
        world_size: Number of ranks P, at least 1.
        layout: One of `LAYOUTS`.

    Returns:
        ``P`` for "contiguous" and "striped" (striped deals single tokens, so the length must
        divide by ``P``), ``2P`` for "zigzag".

    Raises:
        ValueError: If ``world_size < 1`` or ``layout`` is not one of `LAYOUTS`.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if layout not in LAYOUTS:
        raise ValueError(f"Invalid layout {layout!r}. Must be one of: {', '.join(map(repr, LAYOUTS))}")
    return 2 * world_size if layout == "zigzag" else world_size


def shard_indices(seq_len: int, world_size: int, layout: str) -> list[torch.Tensor]:
    """Global token positions held by each rank, in the rank's local order.

    Args:
        seq_len: Sequence length L.
        world_size: Number of ranks P, at least 1.
        layout: One of `LAYOUTS`.

    Returns:
        ``P`` int64 tensors of shape (S,); entry ``r`` lists rank ``r``'s positions. Together
        they hold every position exactly once.

    Raises:
        ValueError: If ``seq_len`` is not a multiple of ``num_chunks(world_size, layout)``, or
            ``world_size`` / ``layout`` is invalid.
    """
    chunks = num_chunks(world_size, layout)
    if seq_len % chunks != 0:
        padded = -(-seq_len // chunks) * chunks
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of {chunks}, which layout {layout!r} "
            f"needs for world_size {world_size}; pad the sequence to {padded} tokens"
        )
    positions = torch.arange(seq_len)  # (L,)
    if layout == "striped":
        return [positions[r::world_size] for r in range(world_size)]
    pieces = positions.reshape(chunks, seq_len // chunks)  # (num_chunks, L / num_chunks)
    if layout == "contiguous":
        return list(pieces)
    return [torch.cat([pieces[r], pieces[chunks - 1 - r]]) for r in range(world_size)]  # zigzag


def shard(x: torch.Tensor, world_size: int, layout: str, dim: int) -> list[torch.Tensor]:
    """Split a full-length tensor into the per-rank shards of a layout.

    Args:
        x: Tensor whose dimension ``dim`` is the sequence, of length L.
        world_size: Number of ranks P.
        layout: One of `LAYOUTS`.
        dim: The sequence dimension of ``x`` (2 for SDPA-layout q/k/v).

    Returns:
        ``P`` tensors, shard ``r`` being ``x`` restricted to rank ``r``'s positions along ``dim``
        (length S there).

    Raises:
        ValueError: As `shard_indices`.
    """
    indices = shard_indices(x.shape[dim], world_size, layout)
    return [x.index_select(dim, idx.to(x.device)) for idx in indices]


def unshard(shards: list[torch.Tensor], world_size: int, layout: str, dim: int) -> torch.Tensor:
    """Put per-rank shards back together in global token order (the inverse of `shard`).

    Args:
        shards: ``P`` tensors as returned by `shard`, each of length S along ``dim``.
        world_size: Number of ranks P.
        layout: One of `LAYOUTS`.
        dim: The sequence dimension of the shards.

    Returns:
        Tensor of length ``L = P * S`` along ``dim``, in global order.

    Raises:
        ValueError: If ``len(shards) != world_size``, or as `shard_indices`.
    """
    if len(shards) != world_size:
        raise ValueError(f"got {len(shards)} shards for world_size {world_size}; need one per rank")
    seq_len = sum(s.shape[dim] for s in shards)
    held = torch.cat(shard_indices(seq_len, world_size, layout))  # (L,) position of each row
    stacked = torch.cat(shards, dim=dim)  # rows in rank order
    return stacked.index_select(dim, torch.argsort(held).to(stacked.device))
