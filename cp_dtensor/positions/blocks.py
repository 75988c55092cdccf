"""Which part of a visiting K/V block a rank's queries attend to: the block plan.

Pure index arithmetic shared by every strategy: given the global positions of the local queries and
of a K/V block (as runs, see :mod:`cp_dtensor.positions.layout`), return the few kernel calls that compute
exactly the visible (query, key) pairs.

Note [Causal load balance]
--------------------------
Cut the sequence into ``2P`` chunks ``c_0 .. c_{2P-1}``. Under causal masking, query chunk ``i``
sees key chunk ``j`` fully when ``j < i``, on its diagonal when ``j == i``, and not at all when
``j > i``. With the *contiguous* layout rank ``r`` owns one chunk pair and meets ``r`` earlier ranks'
blocks: the last rank does ``2P - 1`` half-blocks of work while rank 0 does one, a max/mean of
``(2P - 1) / P``.

The *zigzag* layout gives rank ``r`` chunks ``r`` and ``2P - 1 - r`` (one early, one late). For P = 4
(rows: the query chunks of a rank, columns: the key chunks of the visiting rank ``s``)::

    step 0 (s == r)   both local chunks, causal over the local sequence      -> 2 half-blocks of work
    s < r             Q[c_r, c_{2P-1-r}]  x  K[c_s]          (first half of K/V)   -> 2 half-blocks
    s > r             Q[c_{2P-1-r}]       x  K[c_s, c_{2P-1-s}] (second half of Q) -> 2 half-blocks

Every non-diagonal step therefore computes exactly half of the ``(2c) x (2c)`` block, and the
diagonal step computes two causal triangles plus one full chunk pair (also half the block, plus the
diagonal); every rank does the same work at every step.

:func:`plan_blocks` derives these three cases from positions instead of hard-coding them, so the same
code serves both layouts, the gathered sequences of the hybrid strategy, and the single-process path.
"""

from __future__ import annotations

from dataclasses import dataclass

from cp_dtensor.positions.layout import Run

__all__ = ["Block", "plan_blocks", "block_pairs"]


@dataclass(frozen=True)
class Block:
    """One kernel call: local queries ``q_start:q_stop`` attend to local keys ``kv_start:kv_stop``.

    Attributes:
        q_start: First local query row.
        q_stop: One past the last local query row.
        kv_start: First local key row of the visiting block.
        kv_stop: One past the last local key row.
        causal: Apply the top-left causal mask inside the call (query ``i`` sees key ``j <= i``);
            only set where the query and key rows hold the same global positions.
    """

    q_start: int
    q_stop: int
    kv_start: int
    kv_stop: int
    causal: bool

    @property
    def q(self) -> slice:
        """Slice of the local query rows."""
        return slice(self.q_start, self.q_stop)

    @property
    def kv(self) -> slice:
        """Slice of the visiting key/value rows."""
        return slice(self.kv_start, self.kv_stop)


def block_pairs(block: Block) -> int:
    """Number of (query, key) pairs the block computes."""
    nq, nk = block.q_stop - block.q_start, block.kv_stop - block.kv_start
    return nq * (nq + 1) // 2 if block.causal else nq * nk


def _offsets(runs: list[Run]) -> list[int]:
    offsets, total = [], 0
    for _, length in runs:
        offsets.append(total)
        total += length
    return offsets


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(ranges):
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    return merged


def plan_blocks(q_runs: list[Run], kv_runs: list[Run], causal: bool) -> list[Block]:
    """Plan the kernel calls for local queries against one visiting K/V block.

    See Note [Causal load balance] in this module for the zigzag case it reproduces.

    Args:
        q_runs: Runs of global positions of the local queries, in local order.
        kv_runs: Runs of global positions of the visiting keys/values, in local order.
        causal: Whether query position ``i`` may only see key positions ``<= i``.

    Returns:
        Blocks that together cover every visible (query, key) pair exactly once; empty when the
        whole K/V block is masked (the step is skipped).

    Raises:
        ValueError: With ``causal``, a query run and a key run overlap without being equal.
    """
    num_q, num_kv = sum(n for _, n in q_runs), sum(n for _, n in kv_runs)
    if not causal:
        return [Block(0, num_q, 0, num_kv, False)]
    starts = [s for s, _ in q_runs]
    if q_runs == kv_runs and starts == sorted(starts):
        # Same tokens on both sides, stored in increasing order: one causal call is exact.
        return [Block(0, num_q, 0, num_kv, True)]

    q_offsets, kv_offsets = _offsets(q_runs), _offsets(kv_runs)
    blocks: list[Block] = []
    full_ranges_per_q_run: list[tuple[tuple[int, int], ...]] = []
    for (q_start, q_len), q_off in zip(q_runs, q_offsets):
        full = []
        for (kv_start, kv_len), kv_off in zip(kv_runs, kv_offsets):
            if (kv_start, kv_len) == (q_start, q_len):
                blocks.append(Block(q_off, q_off + q_len, kv_off, kv_off + kv_len, True))
            elif kv_start + kv_len - 1 <= q_start:  # every key precedes every query: all visible
                full.append((kv_off, kv_off + kv_len))
            elif kv_start <= q_start + q_len - 1:  # the key run neither equals the query run nor lies on one side
                # The strategies cannot get here: their runs all come from one partition of the positions
                # (shard_runs of one layout), in which two runs are equal or disjoint. A direct caller can.
                raise ValueError(
                    f"Query run {(q_start, q_len)} and key run {(kv_start, kv_len)} (start, length) overlap without "
                    "being equal; plan_blocks needs runs from one partition of the positions (as shard_runs makes "
                    "them), where two runs are either equal or disjoint."
                )
        full_ranges_per_q_run.append(tuple(_merge_ranges(full)))

    # Coalesce neighbouring query runs that see the same key ranges into one call.
    i = 0
    while i < len(q_runs):
        j = i
        while (
            j + 1 < len(q_runs)
            and full_ranges_per_q_run[j + 1] == full_ranges_per_q_run[i]
            and q_offsets[j + 1] == q_offsets[j] + q_runs[j][1]
        ):
            j += 1
        q_start, q_stop = q_offsets[i], q_offsets[j] + q_runs[j][1]
        for kv_start, kv_stop in full_ranges_per_q_run[i]:
            blocks.append(Block(q_start, q_stop, kv_start, kv_stop, False))
        i = j + 1
    return blocks
