"""Masks beyond causal: packed documents, sliding windows and padding, on global positions.

A query at global position ``i`` of batch row ``b`` may attend to the key at position ``j`` when

* ``causal`` is off, or ``j <= i``;
* ``window = (left, right)`` is unset, or ``i - left <= j <= i + right`` (``None`` = unbounded side);
* ``document_ids`` is unset, or ``doc[b, i] == doc[b, j] >= 0`` (a negative id marks padding: it
  neither attends nor is attended to);
* ``seq_len`` is unset, or both ``i`` and ``j`` are ``< seq_len`` (the rest is padding);
* ``mask_mod`` is unset, or ``mask_mod(b, h, i, j)`` is True (FlexAttention's form, on global
  positions; one mask for every head).

The tile plans that skip what a mask hides are made in :mod:`cp_dtensor.positions.tiles`.

Rows that see no key in a call get ``lse = -inf`` (the CPU kernel reports 0; :func:`block_forward`
corrects it), and a row that sees no key at all ends with output 0 and gradient 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cp_dtensor.positions.layout import Run

__all__ = [
    "MaskSpec",
    "check_mask_mod",
    "check_window",
    "document_ids_from_cu_seqlens",
    "positions",
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
    ok = (
        isinstance(window, (tuple, list))
        and len(window) == 2
        and all(w is None or (isinstance(w, int) and not isinstance(w, bool) and w >= 0) for w in window)
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
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` on global positions (see
            :func:`check_mask_mod`), or ``None``.
        batch: Batch rows ``B`` (the range of ``b`` passed to ``mask_mod``).
    """

    causal: bool
    window: tuple[int | None, int | None] | None = None
    document_ids: torch.Tensor | None = None
    seq_len: int | None = None
    tile: int = DEFAULT_TILE
    mask_mod: Callable | None = None
    batch: int = 1

    @property
    def only_causal(self) -> bool:
        """True when the plain causal plan is exact (no window, documents, padding or ``mask_mod``)."""
        return self.window is None and self.document_ids is None and self.seq_len is None and self.mask_mod is None

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
        if self.mask_mod is not None:
            vis = vis & _eval_mask_mod(self.mask_mod, self.batch, None, q_pos, k_pos)[:, 0]
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
        if self.mask_mod is not None:  # an arbitrary function: evaluated pair by pair
            return None
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


def _eval_mask_mod(
    mask_mod: Callable, batch: int, num_heads: int | None, q_pos: torch.Tensor, k_pos: torch.Tensor
) -> torch.Tensor:
    """``mask_mod`` on broadcast indices: bool ``(B, H or 1, n_q, n_k)``; ``h`` is 0 when ``num_heads`` is ``None``."""
    b = torch.arange(batch).view(-1, 1, 1, 1)
    h = torch.zeros((), dtype=torch.long) if num_heads is None else torch.arange(num_heads).view(1, -1, 1, 1)
    result = mask_mod(b, h, q_pos.view(1, 1, -1, 1), k_pos.view(1, 1, 1, -1))
    if not isinstance(result, torch.Tensor) or result.dtype != torch.bool:
        raise ValueError(
            "mask_mod(b, h, q_idx, kv_idx) must return a bool tensor (written with tensor operations, as "
            f"FlexAttention's mask_mod), got {type(result).__name__} {getattr(result, 'dtype', '')}."
        )
    return result.expand(batch, result.shape[1] if result.dim() == 4 else 1, len(q_pos), len(k_pos))


def check_mask_mod(mask_mod: Callable, *, batch: int, num_heads: int, seq_len: int) -> None:
    """Check that ``mask_mod`` is a function of the indices that returns one bool mask for every head.

    It is evaluated on a grid of up to 16 x 16 positions spread over the sequence, for every batch
    row and head: the same on every rank, so a rank never raises alone.

    Raises:
        ValueError: ``mask_mod`` is not callable, does not return a bool tensor, or depends on ``h``.
    """
    if not callable(mask_mod):
        raise ValueError(f"mask_mod must be None or a function (b, h, q_idx, kv_idx) -> bool, got {mask_mod!r}.")
    probe = torch.linspace(0, seq_len - 1, min(16, seq_len)).long()
    grid = _eval_mask_mod(mask_mod, batch, num_heads, probe, probe)  # (B, H or 1, 16, 16)
    if not bool((grid == grid[:, :1]).all()):
        raise ValueError(
            "mask_mod depends on the head index h; every head shares the mask here. Write the head-dependent "
            "part as a score_mod that returns -inf where a pair is hidden."
        )


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
