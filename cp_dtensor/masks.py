"""Masks beyond causal: packed documents, sliding windows and padding, on global positions.

A query at global position ``i`` of batch row ``b`` may attend to the key at position ``j`` when

* ``causal`` is off, or ``j <= i``;
* ``window = (left, right)`` is unset, or ``i - left <= j <= i + right`` (``None`` = unbounded side);
* ``document_ids`` is unset, or ``doc[b, i] == doc[b, j] >= 0`` (a negative id marks padding: it
  neither attends nor is attended to);
* ``seq_len`` is unset, or both ``i`` and ``j`` are ``< seq_len`` (the rest is padding).

Note [Skipping what the mask hides]
-----------------------------------
The causal block plan (:func:`cp_dtensor.blocks.plan_blocks`) is refined tile by tile: each planned
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
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cp_dtensor.blocks import Block
from cp_dtensor.layout import Run

__all__ = [
    "MaskSpec",
    "check_window",
    "document_ids_from_cu_seqlens",
    "mask_spec",
    "positions",
    "refine_block",
    "window_hides_block",
]

DEFAULT_TILE = 256


def check_window(window) -> tuple[int | None, int | None] | None:
    """Validate ``window``: ``None`` or ``(left, right)`` of non-negative ints or ``None``.

    Raises:
        ValueError: naming the bad value and the expected form.
    """
    if window is None:
        return None
    ok = isinstance(window, (tuple, list)) and len(window) == 2 and all(
        w is None or (isinstance(w, int) and not isinstance(w, bool) and w >= 0) for w in window
    )
    if not ok:
        raise ValueError(
            f"window must be None or (left, right) with non-negative ints or None, got {window!r}. "
            "Example: window=(127, 0) lets each query see itself and the 127 tokens before it."
        )
    return (window[0], window[1])


def document_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
    """Document ids ``(seq_len,)`` from cumulative lengths ``[0, l_0, l_0 + l_1, ..., total]``.

    Tokens past ``cu_seqlens[-1]`` (up to ``seq_len``) get id ``-1`` (padding).

    Raises:
        ValueError: ``cu_seqlens`` is not a 1-D non-decreasing integer tensor starting at 0.
    """
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens!r}.")
    if len(cu_seqlens) < 2 or cu_seqlens[0] != 0 or bool((cu_seqlens.diff() < 0).any()):
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {cu_seqlens.tolist()}.")
    total = int(cu_seqlens[-1])
    seq_len = total if seq_len is None else seq_len
    if seq_len < total:
        raise ValueError(f"seq_len={seq_len} is shorter than the documents' total length {total}.")
    positions = torch.arange(seq_len, device=cu_seqlens.device)
    ids = torch.bucketize(positions, cu_seqlens[1:], right=True)
    return ids.masked_fill(positions >= total, -1)


@dataclass(frozen=True)
class MaskSpec:
    """Everything that decides which (query, key) pairs are visible, on global positions.

    Attributes:
        causal: Keys after the query are hidden.
        window: ``(left, right)`` or ``None``.
        document_ids: ``(B, L)`` integer ids in GLOBAL order, or ``None``.
        seq_len: Number of real tokens (positions ``>= seq_len`` are padding), or ``None``.
        tile: Tile edge used to find hidden and fully visible regions.
    """

    causal: bool
    window: tuple[int | None, int | None] | None = None
    document_ids: torch.Tensor | None = None
    seq_len: int | None = None
    tile: int = DEFAULT_TILE
    plans: dict = field(default_factory=dict, init=False, compare=False, repr=False)
    """Tile plans already made with this mask, by (query runs, key runs, causal); see ``RingPlan.calls``."""

    @property
    def only_causal(self) -> bool:
        """True when the plain causal plan is exact (no window, documents or padding)."""
        return self.window is None and self.document_ids is None and self.seq_len is None

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Visibility of every (query, key) pair: bool ``(B or 1, n_q, n_k)``.

        Args:
            q_pos: Global query positions ``(n_q,)``.
            k_pos: Global key positions ``(n_k,)``.
        """
        i, j = q_pos[:, None], k_pos[None, :]  # (n_q, 1), (1, n_k)
        vis = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool, device=q_pos.device)
        if self.causal:
            vis &= j <= i
        if self.window is not None:
            left, right = self.window
            if left is not None:
                vis &= j >= i - left
            if right is not None:
                vis &= j <= i + right
        if self.seq_len is not None:
            vis &= (i < self.seq_len) & (j < self.seq_len)
        vis = vis[None]  # (1, n_q, n_k)
        if self.document_ids is not None:
            doc_q, doc_k = self.document_ids[:, q_pos], self.document_ids[:, k_pos]  # (B, n_q), (B, n_k)
            vis = vis & (doc_q[:, :, None] == doc_k[:, None, :]) & (doc_q[:, :, None] >= 0)
        return vis

    @functools.cached_property
    def _document_bounds(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """First and last global position of each token's document, ``(B, L)`` each.

        ``None`` when some document's tokens are not one contiguous range of positions (then
        visibility is evaluated pair by pair, see :meth:`visible`).
        """
        ids = self.document_ids
        batch, n = ids.shape
        pos = torch.arange(n, device=ids.device).expand(batch, n)
        starts = torch.ones(batch, n, dtype=torch.bool, device=ids.device)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        for row in range(batch):  # contiguous: as many runs of real ids as distinct real ids
            real = ids[row] >= 0
            if int((starts[row] & real).sum()) != torch.unique(ids[row][real]).numel():
                return None
        ends = torch.ones(batch, n, dtype=torch.bool, device=ids.device)
        ends[:, :-1] = starts[:, 1:]
        first = torch.where(starts, pos, 0).cummax(1).values
        last = torch.where(ends, pos, n).flip(1).cummin(1).values.flip(1)
        return first, last

    def row_intervals(self, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The keys each query may see, as ONE interval of global positions ``[lo, hi]``.

        Causality, the window and padding bound every row by an interval; documents whose tokens are
        contiguous (packing) do too. Evaluating a tile then costs two comparisons per row instead of
        one per pair (:func:`refine_block`).

        Args:
            q_pos: Global query positions ``(n_q,)``.

        Returns:
            ``(lo, hi)``, int64 ``(B or 1, n_q)`` each, inclusive; ``lo > hi`` for a row that sees
            nothing. ``None`` when some document is not contiguous (use :meth:`visible`).
        """
        lo = torch.zeros(len(q_pos), dtype=torch.long, device=q_pos.device)
        hi = torch.full((len(q_pos),), 2**62, dtype=torch.long, device=q_pos.device)
        if self.causal:
            hi = torch.minimum(hi, q_pos)
        if self.window is not None:
            left, right = self.window
            if left is not None:
                lo = torch.maximum(lo, q_pos - left)
            if right is not None:
                hi = torch.minimum(hi, q_pos + right)
        if self.seq_len is not None:
            hi = torch.where(q_pos < self.seq_len, torch.clamp(hi, max=self.seq_len - 1), -1)
        lo, hi = lo[None], hi[None]  # (1, n_q)
        if self.document_ids is not None:
            bounds = self._document_bounds
            if bounds is None:
                return None
            lo = torch.maximum(lo, bounds[0][:, q_pos])  # (B, n_q)
            hi = torch.where(self.document_ids[:, q_pos] >= 0, torch.minimum(hi, bounds[1][:, q_pos]), -1)
        return lo, hi


def positions(runs: list[Run]) -> torch.Tensor:
    """Global positions ``(sum of lengths,)`` of a list of runs, in local order."""
    return torch.cat([torch.arange(s, s + n) for s, n in runs])


def window_hides_block(q_runs: list[Run], kv_runs: list[Run], spec: MaskSpec) -> bool:
    """True when causality, the window and padding alone hide every pair of the two shards.

    Interval arithmetic on the runs (no tensors): for runs ``[a0, a1]`` and ``[b0, b1]`` the offset
    ``i - j`` covers every integer in ``[a0 - b1, a1 - b0]``; a pair is visible iff that range meets
    ``[-right, left]`` (and ``[0, inf)`` when causal), after clipping both runs to ``seq_len``.
    """
    left, right = spec.window if spec.window is not None else (None, None)
    d_min = max(0 if spec.causal else -float("inf"), -right if right is not None else -float("inf"))
    d_max = left if left is not None else float("inf")
    for q_start, q_len in q_runs:
        for k_start, k_len in kv_runs:
            q_end, k_end = q_start + q_len - 1, k_start + k_len - 1
            if spec.seq_len is not None:
                q_end, k_end = min(q_end, spec.seq_len - 1), min(k_end, spec.seq_len - 1)
                if q_end < q_start or k_end < k_start:
                    continue
            lo, hi = q_start - k_end, q_end - k_start  # the offsets i - j this pair of runs covers
            if hi >= d_min and lo <= d_max:
                return False
    return True


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
    meet without a jump: :class:`~cp_dtensor.layout.DocumentZigzag` keeps every run inside one
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
        block: A call planned by :func:`cp_dtensor.blocks.plan_blocks` (causal already accounted for).
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


def mask_spec(
    cp_group,
    q_local: torch.Tensor,
    *,
    causal: bool,
    document_ids: torch.Tensor | None = None,
    window=None,
    seq_len: int | None = None,
) -> MaskSpec:
    """Validate the mask arguments of an attention call and build its :class:`MaskSpec`.

    ``document_ids`` may be global ``(B, L)`` or this rank's shard ``(B, S_local)``, on any device; a
    shard is all-gathered over the cp axis once per call (``B * L`` integers, counted as
    ``"mask_gather"``). The plan is built on the CPU, so global ids already there cost no copy. A call
    with the same arguments as the previous one (the same global ``document_ids`` object, unmodified)
    returns the same :class:`MaskSpec`, and its tile plans with it: see Note [Reusing a mask across
    layers].

    Raises:
        ValueError: naming the bad argument and the expected form.
    """
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}.")
    batch, seq_local = q_local.shape[0], q_local.shape[2]
    total = seq_local * cp_group.size
    window = check_window(window)
    if seq_len is not None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 0 < seq_len <= total:
            raise ValueError(f"seq_len must be an int in [1, {total}] (the padded length), got {seq_len!r}.")
        if seq_len == total:
            seq_len = None
    tile = DEFAULT_TILE
    key = (batch, seq_local, total, causal, window, seq_len, tile)
    if document_ids is None:
        return _reuse_or_build(
            cp_group, key, None, lambda: MaskSpec(causal=causal, window=window, seq_len=seq_len, tile=tile)
        )
    if not isinstance(document_ids, torch.Tensor) or document_ids.is_floating_point() or document_ids.dim() != 2:
        raise ValueError(
            "document_ids must be an integer tensor (batch, seq), got "
            f"{getattr(document_ids, 'shape', document_ids)!r}."
        )
    if document_ids.shape[0] != batch or document_ids.shape[1] not in (seq_local, total):
        raise ValueError(
            f"document_ids has shape {tuple(document_ids.shape)}; expected ({batch}, {total}) in global order "
            f"or this rank's shard ({batch}, {seq_local})."
        )
    # Plans are arithmetic on the host (a GPU would sync at every tile's any()/all()): the ids live on
    # the CPU, and each mask goes to the device when its kernel call runs.
    if document_ids.shape[1] != total:  # a shard: gathered at every call, never reused (see the Note)
        ids = _gather_ids(cp_group, document_ids.to(q_local.device)).to("cpu")  # the collective runs on q's device
        return MaskSpec(causal=causal, window=window, document_ids=ids, seq_len=seq_len, tile=tile)
    return _reuse_or_build(
        cp_group, key, document_ids,
        lambda: MaskSpec(causal=causal, window=window, document_ids=document_ids.to("cpu"), seq_len=seq_len, tile=tile),
    )


# Note [Reusing a mask across layers]
# -----------------------------------
# A model passes the same mask arguments to every layer's attention call, and each call would plan
# its tiles again. mask_spec() therefore returns the previous call's MaskSpec, with the tile plans it
# holds (MaskSpec.plans), when the arguments are the same: the same group, shapes, causal, window and
# seq_len, and the very same document_ids object, not modified in place since (its version counter).
# The entry holds the ids (so their id cannot pass to a new tensor while cached) but only a weak
# reference to the group: a cache must not keep process groups alive, since destroy_process_group()
# leaves gloo's threads running while any reference remains, and threads still running when the
# interpreter finalises can abort it ("terminate called without an active exception"). Document ids
# given as a shard are gathered at every call and never reused: the all-gather is a collective, and
# a cache that hit on some ranks and missed on others would hang them.
_last_spec: list[tuple] = []  # at most one (weakref to the group, key, ids, ids version, spec)


def _reuse_or_build(cp_group, key: tuple, ids: torch.Tensor | None, build) -> MaskSpec:
    """The cached :class:`MaskSpec` if these arguments made it, else ``build()`` (and cache it)."""
    if _last_spec:
        group_ref, old_key, old_ids, version, spec = _last_spec[0]
        if group_ref() is cp_group and old_key == key and old_ids is ids and (ids is None or ids._version == version):
            return spec
    spec = build()
    _last_spec[:] = [(weakref.ref(cp_group), key, ids, None if ids is None else ids._version, spec)]
    return spec

def _gather_ids(cp_group, ids_local: torch.Tensor) -> torch.Tensor:
    """All-gather a ``(B, S_local)`` shard of ids into ``(B, L)`` global order."""
    if cp_group.size == 1:
        return ids_local
    import torch.distributed as dist

    from cp_dtensor.comm import record_comm

    ids_local = ids_local.to(torch.int64).contiguous()
    shards = [torch.empty_like(ids_local) for _ in range(cp_group.size)]
    dist.all_gather(shards, ids_local, group=cp_group.process_group)
    record_comm("mask_gather", ids_local.numel() * ids_local.element_size() * (cp_group.size - 1))
    seq_len = ids_local.shape[1] * cp_group.size
    full = torch.empty(ids_local.shape[0], seq_len, dtype=ids_local.dtype, device=ids_local.device)
    for rank, shard in enumerate(shards):
        full[:, positions(cp_group.runs(seq_len, rank)).to(full.device)] = shard
    return full
