"""Sequence layouts: which global token positions each context-parallel rank holds.

A layout cuts a sequence of ``seq_len`` tokens into equal chunks and deals them to ``world_size``
ranks. Each rank's shard is a list of *runs* ``(start, length)`` of consecutive global positions, in
the order the shard stores them. The two layouts:

* ``"contiguous"``: ``P`` chunks, rank ``r`` holds chunk ``r``.
* ``"zigzag"``: ``2P`` chunks, rank ``r`` holds chunk ``r`` then chunk ``2P - 1 - r``; the causal
  load-balancing layout of Llama 3 and Megatron (see Note [Causal load balance] in
  :mod:`cp_dtensor.blocks`).

Everything here is pure index arithmetic; no communication.
"""

from __future__ import annotations

import torch

__all__ = ["LAYOUTS", "num_chunks", "check_seq_len", "shard_runs", "shard_positions", "padded_length"]

LAYOUTS = ("zigzag", "contiguous")

Run = tuple[int, int]  # (global start position, number of tokens)


def check_layout(layout: str) -> None:
    """Raise ``ValueError`` unless ``layout`` is a known layout name."""
    if layout not in LAYOUTS:
        raise ValueError(f"Invalid layout {layout!r}. Must be one of: {', '.join(map(repr, LAYOUTS))}.")


def num_chunks(world_size: int, layout: str) -> int:
    """Number of equal chunks a layout cuts the sequence into (``P`` or ``2P``).

    Raises:
        ValueError: ``layout`` is unknown or ``world_size < 1``.
    """
    check_layout(layout)
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}.")
    return 2 * world_size if layout == "zigzag" else world_size


def padded_length(seq_len: int, world_size: int, layout: str) -> int:
    """The smallest length ``>= seq_len`` that the layout can split evenly."""
    multiple = num_chunks(world_size, layout)
    return -(-seq_len // multiple) * multiple


def check_seq_len(seq_len: int, world_size: int, layout: str) -> None:
    """Raise ``ValueError`` unless ``seq_len`` splits evenly into the layout's chunks.

    Raises:
        ValueError: naming the length, the required multiple and the fix.
    """
    multiple = num_chunks(world_size, layout)
    if seq_len <= 0 or seq_len % multiple != 0:
        raise ValueError(
            f"Sequence length {seq_len} is not a positive multiple of {multiple} "
            f"(the {layout!r} layout cuts the sequence into {multiple} chunks for {world_size} ranks). "
            f"Pad it to {padded_length(max(seq_len, 1), world_size, layout)} tokens, e.g. "
            "partition_sequence(x, seq_dim=..., pad=True), or choose another sequence length."
        )


def shard_runs(seq_len: int, world_size: int, rank: int, layout: str) -> list[Run]:
    """The runs of global positions that ``rank`` holds, in local storage order.

    Args:
        seq_len: Global sequence length (a multiple of ``num_chunks(world_size, layout)``).
        world_size: Number of context-parallel ranks ``P``.
        rank: This rank's index in ``[0, P)``.
        layout: ``"zigzag"`` or ``"contiguous"``.

    Returns:
        A list of ``(start, length)`` runs; lengths sum to ``seq_len // P``.
    """
    check_seq_len(seq_len, world_size, layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}.")
    chunk = seq_len // num_chunks(world_size, layout)
    if layout == "contiguous":
        return [(rank * chunk, chunk)]
    return [(rank * chunk, chunk), ((2 * world_size - 1 - rank) * chunk, chunk)]


def shard_positions(seq_len: int, world_size: int, rank: int, layout: str) -> torch.Tensor:
    """Global positions of the tokens ``rank`` holds, in local order: a ``(seq_len // P,)`` long tensor."""
    runs = shard_runs(seq_len, world_size, rank, layout)
    return torch.cat([torch.arange(start, start + length) for start, length in runs])
