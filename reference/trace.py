"""The schedule of a simulated ring: one `TraceEntry` per (rank, step).

`cp_dtensor.reference.ring.simulate_ring_attention(..., trace=True)` records, for every rank and step, which
rank's K/V block was held, which (query, key) pairs of it were computed, and what that cost. Tests
check the invariants of the schedule from it and the docs draw the ring and load-balance figures
from it.

Block kinds (``BLOCK_KINDS``), decided from the pairs a block computes:

* ``"full"``: every pair of the block is visible.
* ``"diagonal"``: the rank's own K/V block under a causal mask (its causal triangle; with zigzag,
  two triangles plus one full quarter).
* ``"half"``: exactly half of the pairs are visible (the off-diagonal zigzag blocks: the early
  query chunk sees nothing and the late one everything, or every query sees the early key chunk).
* ``"partial"``: some pairs, neither all nor half (e.g. striped off-diagonal blocks).
* ``"skipped"``: no visible pair; the rank does no work at that step (a causal block entirely in
  the future, or a block that packed documents, a window or padding hide entirely).

FLOPs count the two matmuls of the forward (``Q K^T`` and ``P V``), 2 FLOPs per multiply-add each,
over the visible pairs only: ``flops = 4 * pairs * head_dim * batch * heads`` when every batch row
has the same mask, and ``flops = 4 * pairs * head_dim * heads`` when ``visible`` has a batch dim
(``document_ids``), where ``pairs`` already sums the batch rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BLOCK_KINDS", "TraceEntry", "classify_block", "make_entry", "ring_steps_needed", "trace_work_per_rank"]

BLOCK_KINDS = ("full", "diagonal", "half", "partial", "skipped")
"""Kinds of block a rank computes at one ring step (see the module docstring for each)."""


@dataclass(frozen=True)
class TraceEntry:
    """What one rank did at one step of the forward ring."""

    rank: int
    """The rank that computed."""
    step: int
    """The ring step, ``0 <= step < world_size``."""
    kv_source: int
    """The rank whose K/V block was held: ``(rank - step) % world_size``."""
    kind: str
    """One of `BLOCK_KINDS`."""
    pairs: int
    """Number of (query, key) pairs computed, i.e. ``visible.sum()`` (summed over the batch rows
    when ``visible`` has a batch dim)."""
    flops: int
    """Forward FLOPs spent: ``4 * head_dim * heads`` per computed pair of each batch row."""
    visible: torch.Tensor
    """Bool, shape (S, S): pair ``(i, j)`` of local query ``i`` and local key ``j`` of
    the held block was computed. Shape (B, S, S) when the mask differs between batch
    rows (packed documents)."""


def classify_block(visible: torch.Tensor, *, rank: int, kv_source: int, causal: bool) -> str:
    """Name the kind of a block from its visible pairs (see the module docstring).

    Args:
        visible: Bool, shape (S_q, S_k) or (B, S_q, S_k); the pairs computed.
        rank: The rank computing.
        kv_source: The rank whose K/V block it holds.
        causal: Whether the attention is causal.

    Returns:
        One of `BLOCK_KINDS`.
    """
    pairs, total = int(visible.sum()), visible.numel()
    if pairs == 0:
        return "skipped"
    if causal and kv_source == rank:
        return "diagonal"
    if pairs == total:
        return "full"
    return "half" if 2 * pairs == total else "partial"


def trace_work_per_rank(trace: list[TraceEntry], world_size: int) -> list[int]:
    """Total forward FLOPs of each rank over the ring.

    Args:
        trace: The entries returned by ``simulate_ring_attention(..., trace=True)``.
        world_size: Number of ranks P.

    Returns:
        ``P`` integers; entry ``r`` is the sum of ``flops`` over rank ``r``'s entries.
    """
    work = [0] * world_size
    for entry in trace:
        work[entry.rank] += entry.flops
    return work


def make_entry(
    rank: int, step: int, kv_source: int, visible: torch.Tensor, *, causal: bool, flops_per_pair: int
) -> TraceEntry:
    """Record one (rank, step) of the ring.

    Args:
        rank: The rank computing.
        step: The ring step.
        kv_source: The rank whose K/V block it holds.
        visible: Bool, shape (S, S), or (B, S, S) for a per-row mask; the
            pairs computed.
        causal: Whether the attention is causal.
        flops_per_pair: ``4 * head_dim * heads``, times ``batch`` when ``visible`` has no batch dim.

    Returns:
        The entry, with ``visible`` copied to the CPU.
    """
    pairs = int(visible.sum())
    kind = classify_block(visible, rank=rank, kv_source=kv_source, causal=causal)
    return TraceEntry(rank, step, kv_source, kind, pairs, pairs * flops_per_pair, visible.cpu())


def ring_steps_needed(trace: list[TraceEntry]) -> int:
    """After how many steps a ring may stop: one past the last step at which some rank computes.

    The simulation runs every step so that its trace shows the skipped blocks; a real ring can stop
    rotating once every later block is hidden from every rank (for example, a sliding window
    narrower than a shard with the contiguous layout needs only the previous rank's block).

    Args:
        trace: The entries returned by ``simulate_ring_attention(..., trace=True)``.

    Returns:
        ``1 + max(step)`` over the entries that computed a pair; 1 when none did (step 0 holds a
        rank's own block, which needs no send).
    """
    return 1 + max((entry.step for entry in trace if entry.pairs > 0), default=0)
