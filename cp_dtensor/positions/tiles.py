"""Tile planning: the kernel calls of one K/V block under a mask, and the one cache of those plans.

Note [Skipping what the mask hides]
-----------------------------------
The causal block plan (:func:`cp_dtensor.positions.blocks.plan_blocks`) is refined tile by tile: each planned
call is cut into tiles of at most ``tile x tile``, never spanning two of the layout's runs
(:func:`tile_edges`), and for each tile we evaluate the visibility above on the
tile's global positions (a ``(B, tile, tile)`` boolean, never a sequence-sized matrix). Tiles with
no visible pair are skipped; neighbouring tiles of one row band that are all-visible go to the
kernel without a mask; only bands that straddle a boundary get an explicit mask.

Classifying a tile does not need its pairs. Causality, a window and padding let each query row see
one interval of key positions, and so do documents whose tokens are contiguous (packing); with the
block's keys in increasing order, a row's visible keys are then a range of columns ``[first, stop)``
found by binary search (:meth:`MaskSpec.row_intervals`). A tile is hidden, all visible or partly
visible from two comparisons per row, and a mask is built only for a partly visible tile. Ids that
recur after other ids fall back to evaluating the pairs of one row band at a time. For windows the
"any pair visible" question is also answered per K/V block with interval arithmetic, so a ring can
stop rotating once no rank needs another block (see :func:`window_hides_block`).

Rows that see no key in a call get ``lse = -inf`` (the CPU kernel reports 0; :func:`block_forward`
corrects it), and a row that sees no key at all ends with output 0 and gradient 0.

Note [Reusing tile plans across layers]
---------------------------------------
A model passes the same mask arguments to every layer's attention call, and planning the tiles
again for each layer is most of a masked call's host time. :func:`tile_planner` therefore returns
the previous call's :class:`TilePlanner` (and the plans it holds) when the mask has the same
content: the same causal, window, seq_len and tile, the same ``mask_mod`` function object (a new rule
needs a new function), and document ids equal element by element to a
private copy the planner took. Comparing the content (one pass over ``B * L`` integers per call)
rather than the tensor's identity or version counter is what makes reuse safe: an edit through
``.data``, a numpy view or another tensor sharing the storage bumps no version counter. The cache
holds no process group (plans depend only on positions and the mask), so it keeps no gloo threads
alive after ``destroy_process_group``, and every rank looks it up after the same collectives: a hit
never skips a collective on some ranks only.

Legend: ``B`` batch, ``L`` global sequence length, ``n_q`` / ``n_k`` rows / columns of a tile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from cp_dtensor.positions.blocks import Block, plan_blocks
from cp_dtensor.positions.layout import Run
from cp_dtensor.positions.masks import MaskSpec, positions, window_hides_block

__all__ = ["KernelCall", "TilePlanner", "refine_block", "tile_edges", "tile_planner"]

T = TypeVar("T")
KernelCall = tuple[Block, "torch.Tensor | None"]  # a kernel call and its mask (None: all visible)


def _groups(flags: list[int], split_at: int | None = None) -> list[tuple[int, int]]:
    """Maximal runs ``[start, stop)`` of consecutive non-zero entries; ``split_at`` stands alone."""
    groups, start = [], None
    for idx, flag in enumerate(flags + [0]):
        boundary = idx == split_at or idx - 1 == split_at
        if start is not None and (not flag or boundary):
            groups.append((start, idx))
            start = None
        if flag and start is None:
            start = idx
    return groups


def tile_edges(pos: torch.Tensor, tile: int, run_starts: Sequence[int] = ()) -> list[int]:
    """Where a block's rows (or columns) are cut into tiles: every ``tile`` entries of each run.

    A run is a stretch of consecutive global positions, and every run starts a new tile, so no tile
    mixes two runs. Runs start where ``pos`` jumps and at ``run_starts`` (the layout's runs can also
    meet without a jump: :class:`~cp_dtensor.positions.layout.DocumentZigzag` keeps every run inside one
    document, so that its tiles are hidden or all visible, not masked).

    Args:
        pos: Global positions of the block's rows or columns, in local order ``(n,)``.
        tile: The largest tile.
        run_starts: More offsets in ``[0, n)`` where a run starts.

    Returns:
        Increasing offsets ``[0, ..., n]``.
    """
    n = len(pos)
    jumps = ((pos[1:] != pos[:-1] + 1).nonzero().flatten() + 1).tolist()
    starts = sorted({0, n, *jumps, *run_starts})
    return [e for a, b in zip(starts, starts[1:]) for e in range(a, b, tile)] + [n]


def _starts_inside(runs: list[Run] | None, start: int, stop: int) -> list[int]:
    """Offsets, relative to ``start``, of the runs that begin strictly inside ``[start, stop)`` of the local order."""
    if runs is None:
        return []
    offsets, total = [], 0
    for _, length in runs:
        if start < total < stop:
            offsets.append(total - start)
        total += length
    return offsets


def refine_block(
    block: Block,
    q_pos: torch.Tensor,
    kv_pos: torch.Tensor,
    spec: MaskSpec,
    *,
    q_runs: list[Run] | None = None,
    kv_runs: list[Run] | None = None,
) -> list[tuple[Block, torch.Tensor | None]]:
    """Cut one planned call into the calls that the mask needs. See Note [Skipping what the mask hides].

    Args:
        block: A call planned by :func:`cp_dtensor.positions.blocks.plan_blocks` (causal already accounted for).
        q_pos: Global positions of ALL local queries ``(S_q,)``.
        kv_pos: Global positions of ALL keys of the visiting block ``(S_kv,)``.
        spec: The mask.
        q_runs: The layout runs of the local queries, if known: tiles never span two (see :func:`tile_edges`).
        kv_runs: The layout runs of the visiting block, likewise.

    Returns:
        ``(call, mask)`` pairs; ``mask`` is ``None`` (all visible) or bool ``(B or 1, 1, n_q, n_k)``.
        On a causal block's diagonal the call keeps ``causal=True``, so the kernel skips the hidden
        triangle even where a mask is passed too.
    """
    if spec.only_causal:
        return [(block, None)]
    calls: list[tuple[Block, torch.Tensor | None]] = []
    kv_blk = kv_pos[block.kv]  # (n_kv,) global positions of the block's keys
    edges = tile_edges(kv_blk, spec.tile, _starts_inside(kv_runs, block.kv_start, block.kv_stop))
    q_edges = tile_edges(q_pos[block.q], spec.tile, _starts_inside(q_runs, block.q_start, block.q_stop))
    assert not block.causal or q_edges == edges, "a causal block holds the same positions on both sides"
    # Fast path: every row sees one interval of positions and the keys are in increasing order, so a
    # row's visible keys are the columns [first, stop) of the block, found by binary search.
    intervals = spec.row_intervals(q_pos[block.q]) if bool((kv_blk[1:] > kv_blk[:-1]).all()) else None
    if intervals is not None:
        first = torch.searchsorted(kv_blk, intervals[0])  # (B|1, n_q_block)
        stop = torch.searchsorted(kv_blk, intervals[1], right=True)
        c0, c1 = torch.tensor(edges[:-1]), torch.tensor(edges[1:])  # (n_tiles,) column ranges of the tiles
    for band_index, (r0, r1) in enumerate(zip(q_edges[:-1], q_edges[1:])):
        q0, q1 = block.q_start + r0, block.q_start + r1
        if intervals is not None:
            rows = slice(r0, r1)
            f, t = first[:, rows, None], stop[:, rows, None]  # (B|1, n_q, 1): visible columns [f, t)

            def band(a: int, b: int, f=f, t=t) -> torch.Tensor:
                cols = torch.arange(a, b)
                return (cols >= f) & (cols < t)  # (B|1, n_q, b - a)

            full = ((f <= c0) & (t >= c1)).flatten(0, 1).all(0)  # (n_tiles,) every row sees the whole tile
            some = ((f < c1) & (t > c0) & (t > f)).flatten(0, 1).any(0)  # some row sees part of it
            kinds = (full.long() + (some & ~full).long() * 2).tolist()  # 0 hidden, 1 all visible, 2 partly
        else:
            vis = spec.visible(q_pos[q0:q1], kv_blk)  # (B|1, n_q, n_kv): one row band

            def band(a: int, b: int, vis=vis) -> torch.Tensor:
                return vis[..., a:b]

            kinds = []
            for a, b in zip(edges[:-1], edges[1:]):
                t_vis = vis[..., a:b]
                kinds.append(2 if not bool(t_vis.all()) and bool(t_vis.any()) else int(bool(t_vis.all())))
        # A causal (diagonal) block cuts its bands and columns at the same edges: tile d is square
        # on the diagonal, and gets its own causal call.
        diag = band_index if block.causal else None
        for g0, g1 in _groups(kinds, split_at=diag):
            a, b = edges[g0], edges[g1]
            on_diag = (g0, g1) == (diag, diag + 1) if diag is not None else False
            if on_diag:
                tile_vis = band(a, b)
                triangle = torch.ones(q1 - q0, b - a, dtype=torch.bool, device=tile_vis.device).tril()
                mask = None if bool((tile_vis == triangle).all()) else tile_vis[:, None]
            else:
                mask = None if all(k == 1 for k in kinds[g0:g1]) else band(a, b)[:, None]
            calls.append((Block(q0, q1, block.kv_start + a, block.kv_start + b, on_diag), mask))
    return calls


class TilePlanner:
    """The kernel calls of every (query runs, K/V runs) pair under one mask, each planned once.

    The one owner of tile plans: a ring's forward and backward, every step of it and every layer
    with the same mask (see Note [Reusing tile plans across layers]) read them here.

    Args:
        mask: The mask, or ``None`` for plain attention (causal or not); its plans are cheap and not
            shared across calls.
    """

    def __init__(self, mask: MaskSpec | None) -> None:
        self.mask = mask
        self._ids = None if mask is None or mask.document_ids is None else mask.document_ids.clone()
        self._calls: dict[tuple, list[KernelCall]] = {}
        self._derived: dict[tuple, object] = {}

    def matches(self, mask: MaskSpec | None) -> bool:
        """True when ``mask`` hides exactly the pairs this planner's mask hides (compared by content)."""
        mine = self.mask
        if mine is None or mask is None:
            return mine is mask
        if (mine.causal, mine.window, mine.seq_len, mine.tile) != (mask.causal, mask.window, mask.seq_len, mask.tile):
            return False
        if mine.mask_mod is not mask.mask_mod or mine.batch != mask.batch:
            return False
        ids = mask.document_ids
        if self._ids is None or ids is None:
            return self._ids is None and ids is None
        return self._ids.shape == ids.shape and self._ids.dtype == ids.dtype and torch.equal(self._ids, ids)

    def calls(self, q_runs: list[Run], kv_runs: list[Run], causal: bool) -> list[KernelCall]:
        """The kernel calls of local queries at ``q_runs`` against a K/V block at ``kv_runs``.

        Args:
            q_runs: Global-position runs of the queries, in local order.
            kv_runs: Global-position runs of the keys, in local order.
            causal: Causal masking on global positions.

        Returns:
            ``(block, mask)`` pairs covering every visible pair once; empty when the mask hides the
            whole block.
        """
        key = (tuple(q_runs), tuple(kv_runs), causal)
        if key not in self._calls:
            self._calls[key] = self._plan(q_runs, kv_runs, causal)
        return self._calls[key]

    def derived(self, key: tuple, make: Callable[[], T]) -> T:
        """Another plan of this mask, made once: ``make()`` the first time ``key`` is asked for.

        The dispatch routes (:mod:`cp_dtensor.positions.dispatch`) live here, so every layer with the
        same mask shares them as it shares the tile plans.
        """
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def _plan(self, q_runs: list[Run], kv_runs: list[Run], causal: bool) -> list[KernelCall]:
        blocks = plan_blocks(q_runs, kv_runs, causal)
        mask = self.mask
        if mask is None or mask.only_causal:
            return [(blk, None) for blk in blocks]
        if window_hides_block(q_runs, kv_runs, mask):
            return []
        q_pos, kv_pos = positions(q_runs), positions(kv_runs)
        return [c for blk in blocks for c in refine_block(blk, q_pos, kv_pos, mask, q_runs=q_runs, kv_runs=kv_runs)]


_recent: list[TilePlanner] = []  # at most one: the planner of the last mask (see the Note)


def tile_planner(mask: MaskSpec | None) -> TilePlanner:
    """The planner of ``mask``: the last call's when the content is the same, else a new one.

    See Note [Reusing tile plans across layers].
    """
    if mask is None or mask.only_causal:
        return TilePlanner(mask)
    if _recent and _recent[0].matches(mask):
        return _recent[0]
    _recent[:] = [TilePlanner(mask)]
    return _recent[0]
