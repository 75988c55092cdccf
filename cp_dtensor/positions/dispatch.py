"""Routes for mask-aware dispatch: which rows of which rank's K/V the local queries need.

Note [Moving only what the mask needs]
--------------------------------------
Under packed documents or a sliding window most of the sequence is invisible to most queries, yet a
ring (or an all-gather) moves every rank's whole K/V shard to every other rank. The mask is known on
every rank before any tensor moves (the same global positions, the same document ids), so each rank
can work out, for every pair (source ``s``, destination ``d``), exactly which of ``s``'s K/V rows at
least one of ``d``'s queries may see, and only those rows need to travel:

* with causality, a window, padding and contiguous documents, each query row sees one interval of
  key positions ``[lo, hi]`` (:meth:`MaskSpec.row_intervals`); the union of ``d``'s intervals is
  marked on the key axis with a difference array (``+1`` at ``lo``, ``-1`` after ``hi``, a running
  sum): ``O(L)`` work and memory, no query-by-key matrix;
* with a ``mask_mod`` or documents whose tokens recur, visibility is evaluated in bands of
  ``_BAND`` queries against the source's keys (a ``(B, band, S)`` boolean at a time).

A rank computes the routes of every pair from the same inputs, so the sender knows what to send and
the receiver what arrives (its sizes included) without asking: no metadata moves beyond the document
ids the call already gathers once. The backward sends the gradient of exactly the rows that came,
back to their owner, which adds it to its own rows.

Routes cost milliseconds at 64K tokens (``O(P L)`` host work), so :func:`cached_routes` keeps them
with the mask's tile plans: every layer with the same mask shares them (Note [Reusing tile plans
across layers] in :mod:`cp_dtensor.positions.tiles`).

Legend: ``B`` batch, ``L`` global sequence length, ``S`` rows of one rank's shard, ``P`` ranks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from cp_dtensor.positions.layout import Run
from cp_dtensor.positions.masks import MaskSpec, positions
from cp_dtensor.positions.tiles import tile_planner

__all__ = ["Routes", "cached_routes", "needed_rows", "runs_of", "routes"]

_BAND = 256  # query rows per visibility band when rows are not intervals


def runs_of(pos: torch.Tensor) -> list[Run]:
    """Global positions ``(n,)`` (increasing inside each run) -> the runs ``[(start, length), ...]``."""
    if len(pos) == 0:
        return []
    breaks = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1  # first index of each new run
    starts = [0, *breaks.tolist()]
    stops = [*breaks.tolist(), len(pos)]
    return [(int(pos[a]), b - a) for a, b in zip(starts, stops)]


def needed_rows(mask: MaskSpec, q_runs: list[Run], kv_runs: list[Run]) -> torch.Tensor:
    """Which keys of a shard at least one of the queries may see (in any batch row).

    Args:
        mask: The call's mask, on global positions.
        q_runs: Runs of the queries' global positions.
        kv_runs: Runs of the keys' global positions, in the shard's local order.

    Returns:
        Bool ``(S,)`` over the shard's local rows: True where some query sees the key.
    """
    q_pos, k_pos = positions(q_runs), positions(kv_runs)
    if len(q_pos) == 0 or len(k_pos) == 0:
        return torch.zeros(len(k_pos), dtype=torch.bool)
    intervals = mask.row_intervals(q_pos)
    if intervals is None:  # visibility pair by pair, one band of queries at a time
        needed = torch.zeros(len(k_pos), dtype=torch.bool)
        for start in range(0, len(q_pos), _BAND):
            needed |= mask.visible(q_pos[start : start + _BAND], k_pos).any(dim=1).any(dim=0)
        return needed
    lo, hi = (t.flatten() for t in intervals)  # (B * n_q,) each, inclusive
    k_min, k_max = int(k_pos.min()), int(k_pos.max())
    meets = (lo <= hi) & (hi >= k_min) & (lo <= k_max)  # rows whose interval meets the shard's span
    lo, hi = lo[meets].clamp(min=k_min) - k_min, hi[meets].clamp(max=k_max) - k_min
    diff = torch.zeros(k_max - k_min + 2, dtype=torch.long)
    diff.index_add_(0, lo, torch.ones_like(lo))
    diff.index_add_(0, hi + 1, torch.full_like(hi, -1))
    covered = diff.cumsum(0)[:-1] > 0  # (k_max - k_min + 1,): some interval covers the position
    return covered[k_pos - k_min]


@dataclass(frozen=True)
class Routes:
    """Who sends which K/V rows to whom, seen from one rank.

    Attributes:
        rank: This rank.
        own_runs: Runs of this rank's own K/V rows.
        send_rows: ``send_rows[d]``: local row indices (int64, increasing) of this rank's shard that
            rank ``d``'s queries need; empty for ``d == rank``.
        recv_runs: ``recv_runs[s]``: global runs of the rows of rank ``s`` that this rank's queries
            need, in ``s``'s local order; ``[]`` for ``s == rank``.
        recv_rows: ``recv_rows[s]``: how many rows arrive from rank ``s``.
    """

    rank: int
    own_runs: list[Run]
    send_rows: list[torch.Tensor]
    recv_runs: list[list[Run]]
    recv_rows: list[int]

    def sent(self) -> int:
        """Rows this rank sends, to all peers together."""
        return sum(len(rows) for rows in self.send_rows)


def routes(mask: MaskSpec, shard_runs: list[list[Run]], rank: int) -> Routes:
    """The routes of ``rank`` under ``mask``: see Note [Moving only what the mask needs].

    Args:
        mask: The call's mask (``MaskSpec(causal=...)`` for plain causal or no mask).
        shard_runs: ``shard_runs[r]``: the runs of rank ``r``'s queries and K/V (the layout).
        rank: This rank.

    Returns:
        The :class:`Routes` of ``rank``; every rank computes matching ones from the same arguments.
    """
    size = len(shard_runs)
    mine = shard_runs[rank]
    send_rows, recv_runs, recv_rows = [], [], []
    for peer in range(size):
        if peer == rank:
            send_rows.append(torch.zeros(0, dtype=torch.long))
            recv_runs.append([])
            recv_rows.append(0)
            continue
        send_rows.append(torch.nonzero(needed_rows(mask, shard_runs[peer], mine)).flatten())
        wanted = needed_rows(mask, mine, shard_runs[peer])
        recv_runs.append(runs_of(positions(shard_runs[peer])[wanted]))
        recv_rows.append(int(wanted.sum()))
    return Routes(rank, mine, send_rows, recv_runs, recv_rows)


@functools.lru_cache(maxsize=16)
def _plain_routes(causal: bool, shard_runs: tuple[tuple[Run, ...], ...], rank: int) -> Routes:
    return routes(MaskSpec(causal=causal), [list(runs) for runs in shard_runs], rank)


def cached_routes(mask: MaskSpec, shard_runs: list[list[Run]], rank: int) -> Routes:
    """:func:`routes`, made once per mask content and layout, and shared by every call that asks again."""
    key = tuple(tuple(runs) for runs in shard_runs)
    if mask.only_causal:  # plain (non-)causal attention: the layout alone decides
        return _plain_routes(mask.causal, key, rank)
    return tile_planner(mask).derived(("routes", key, rank), lambda: routes(mask, shard_runs, rank))
