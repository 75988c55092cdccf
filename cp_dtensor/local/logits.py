r"""Logits beyond ``q . k * scale``: soft-capping and score functions, on global positions, tile by tile.

Note [Score functions under context parallelism]
------------------------------------------------
A score function changes each logit before the softmax, as FlexAttention's ``score_mod`` does:

.. math::
    s_{bhij} = \text{score\_mod}(\text{cap}(q_{bhi} \cdot k_{bhj} \cdot \text{scale}), b, h, i, j),
    \qquad \text{cap}(x) = c \tanh(x / c),

with soft-capping (Gemma 2's ``attn_logit_softcapping``) applied first when ``softcap = c`` is set.
Under context parallelism a rank holds some rows and meets some key blocks, in whatever order the
layout put them; ``i`` and ``j`` must be the GLOBAL positions of the query and the key (an ALiBi
bias is ``slope_h * (j - i)`` over the whole sequence, not over a shard), and ``h`` the global head
(the head-exchanging strategies attend a slice of the heads). :class:`LogitSpec` carries the
function and the head offset; :meth:`LogitSpec.bind` attaches the global positions of one
(query shard, K/V block) pair, and the block loop slices them for every kernel call.

The fused kernels cannot run a Python function on their logits, so such a call runs here:
:func:`tiled_forward` cuts it into tiles of at most ``tile x tile`` (query rows x keys), computes
each tile's logits (``(B, H, tile, tile)``, never more), and merges the tiles' results with their
log-sum-exp exactly as the ring merges blocks (Note [LSE merge] in :mod:`cp_dtensor.local.merge`).
:func:`tiled_backward` rebuilds each tile's probabilities from the FINAL log-sum-exp, as the flash
backward does, and takes the score function's derivative by autograd on that one tile, so any
differentiable function written with tensor operations is served, its gradient included (the cap
alone uses its closed form, ``1 - tanh^2``).

Tensors a score function captures (a table of ALiBi slopes) are constants: no gradient flows to
them. Everything is computed in the accumulation dtype (fp32, fp64 for fp64 inputs).

Legend: ``B`` batch, ``H`` query heads of the call, ``S_q`` / ``S_k`` queries / keys of the call,
``D`` head dim, ``n_q`` / ``n_k`` rows / columns of a tile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from cp_dtensor.local.merge import accum_dtype, merge_into

__all__ = ["DEFAULT_LOGIT_TILE", "BoundLogits", "LogitSpec", "tiled_backward", "tiled_forward"]

DEFAULT_LOGIT_TILE = 128
"""Edge of the tiles of :func:`tiled_forward`: each tile's logits are ``(B, H, 128, 128)``."""

ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LogitSpec:
    """What a call does to its logits beyond ``q . k * scale``, and its attention sinks.

    Attributes:
        softcap: ``c`` of ``c * tanh(s / c)``, or ``None``.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx)`` in FlexAttention's form, called with
            broadcastable tensors: ``score`` ``(B, H, n_q, n_k)``, ``b`` ``(B, 1, 1, 1)``, ``h``
            ``(1, H, 1, 1)`` (global heads), ``q_idx`` ``(1, 1, n_q, 1)`` and ``kv_idx``
            ``(1, 1, 1, n_k)`` (global positions); or ``None``.
        sinks: One logit per query head of THIS frame ``(H,)`` (detached, accumulation dtype), or
            ``None``: see Note [Attention sinks] in :mod:`cp_dtensor.local.merge`.
        head_offset: The global index of this frame's first head (non-zero in a head shard).
    """

    softcap: float | None = None
    score_mod: ScoreMod | None = None
    sinks: torch.Tensor | None = None
    head_offset: int = 0

    @property
    def tiled(self) -> bool:
        """True when the logits need :func:`tiled_forward` (a fused kernel cannot change them)."""
        return self.softcap is not None or self.score_mod is not None

    def for_heads(self, start: int, count: int) -> LogitSpec:
        """The spec of a frame holding global heads ``start .. start + count - 1`` (a Ulysses head shard)."""
        sinks = None if self.sinks is None else self.sinks[start : start + count]
        return replace(self, sinks=sinks, head_offset=self.head_offset + start)

    def bind(self, q_pos: torch.Tensor, kv_pos: torch.Tensor) -> BoundLogits | None:
        """This spec at the global positions of local queries and one K/V block; ``None`` if not :attr:`tiled`."""
        return BoundLogits(self, q_pos, kv_pos) if self.tiled else None


@dataclass(frozen=True)
class BoundLogits:
    """A :class:`LogitSpec` with the global positions of a call's rows and keys.

    Attributes:
        spec: The logit spec.
        q_pos: Global positions of the rows ``(S_q,)``.
        kv_pos: Global positions of the keys ``(S_k,)``.
    """

    spec: LogitSpec
    q_pos: torch.Tensor
    kv_pos: torch.Tensor

    def sliced(self, rows: slice, cols: slice) -> BoundLogits:
        """The positions of a sub-call: rows ``rows`` and keys ``cols`` of this one."""
        return BoundLogits(self.spec, self.q_pos[rows], self.kv_pos[cols])

    def apply(self, scores: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        """The modified logits of one tile.

        Args:
            scores: ``q . k * scale`` of the tile ``(B, H, n_q, n_k)``.
            rows: The tile's rows within this call.
            cols: The tile's keys within this call.

        Returns:
            ``(B, H, n_q, n_k)``, differentiable in ``scores``.
        """
        spec = self.spec
        if spec.softcap is not None:
            scores = torch.tanh(scores / spec.softcap) * spec.softcap
        if spec.score_mod is None:
            return scores
        device = scores.device
        b = torch.arange(scores.shape[0], device=device).view(-1, 1, 1, 1)
        h = torch.arange(spec.head_offset, spec.head_offset + scores.shape[1], device=device).view(1, -1, 1, 1)
        q_idx = self.q_pos[rows].to(device).view(1, 1, -1, 1)
        kv_idx = self.kv_pos[cols].to(device).view(1, 1, 1, -1)
        # A function may promote (fp32 scores plus an fp64 table of slopes): compute in the accumulation dtype.
        return spec.score_mod(scores, b, h, q_idx, kv_idx).to(scores.dtype).expand(scores.shape)

    def backward(self, raw: torch.Tensor, modified: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The gradient with respect to ``raw`` of one tile, given the gradient of its modified logits.

        Args:
            raw: ``q . k * scale`` of the tile ``(B, H, n_q, n_k)``; with a ``score_mod``, the input of
                the autograd graph that :meth:`apply` built (under ``torch.enable_grad``).
            modified: :meth:`apply`'s result.
            grad: Gradient of the loss with respect to ``modified``.

        Returns:
            ``(B, H, n_q, n_k)``. Soft-capping alone has a closed form, ``1 - tanh^2``, which also serves
            inside a compiled graph's custom operator, where autograd is off.
        """
        if self.spec.score_mod is None:
            tanh = modified / self.spec.softcap  # modified = c * tanh(raw / c)
            return grad * (1 - tanh * tanh)
        (grad_raw,) = torch.autograd.grad(modified, raw, grad)
        return grad_raw


def _tiles(size: int, tile: int) -> list[slice]:
    return [slice(start, min(start + tile, size)) for start in range(0, size, tile)]


def _hidden(rows: slice, cols: slice, causal: bool, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Bool ``(B or 1, 1, n_q, n_k)`` of the tile's hidden pairs (top-left causal and the mask), or ``None``."""
    hidden = None
    if causal:
        i = torch.arange(rows.start, rows.stop)[:, None]
        j = torch.arange(cols.start, cols.stop)[None, :]
        hidden = (j > i)[None, None]
    if mask is not None:
        tile_mask = mask[..., rows if mask.shape[-2] > 1 else slice(None), cols if mask.shape[-1] > 1 else slice(None)]
        hidden = ~tile_mask if hidden is None else hidden.to(tile_mask.device) | ~tile_mask
    return hidden


def _tile_logits(q_t, k_t, scale, logits, rows, cols, causal, mask):
    """Logits of one tile ``(B, H, n_q, n_k)``, hidden pairs at ``-inf``."""
    scores = logits.apply(torch.einsum("bhqd,bhkd->bhqk", q_t, k_t) * scale, rows, cols)
    hidden = _hidden(rows, cols, causal, mask)
    return scores if hidden is None else scores.masked_fill(hidden.to(scores.device), float("-inf"))


def tiled_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    mask: torch.Tensor | None,
    logits: BoundLogits,
    tile: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over one K/V block with modified logits. See Note [Score functions under context parallelism].

    Args:
        q: Queries ``(B, H, S_q, D)``.
        k: Keys ``(B, H, S_k, D)`` (K/V heads already expanded to the query heads).
        v: Values ``(B, H, S_k, D)``.
        causal: Top-left causal inside the call (query ``i`` sees key ``j <= i``).
        scale: Softmax scale.
        mask: Bool ``(B or 1, 1, S_q or 1, S_k or 1)``, True where visible, or ``None``.
        logits: The score function at this call's global positions.
        tile: Tile edge; ``None`` for :data:`DEFAULT_LOGIT_TILE` (read at call time).

    Returns:
        ``(out, lse)``: ``out`` ``(B, H, S_q, D)`` in ``q``'s dtype (0 for rows that see nothing), ``lse``
        ``(B, H, S_q)`` in the accumulation dtype (``-inf`` for those rows).
    """
    acc = accum_dtype(q.dtype)
    tile = DEFAULT_LOGIT_TILE if tile is None else tile
    sq, sk = q.shape[2], k.shape[2]
    out = torch.zeros(q.shape, dtype=acc, device=q.device)  # (B, H, S_q, D)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)  # (B, H, S_q)
    for rows in _tiles(sq, tile):
        first = True
        for cols in _tiles(sk, tile):
            if causal and cols.start >= rows.stop:  # the whole tile is above the diagonal
                break
            s = _tile_logits(q[:, :, rows].to(acc), k[:, :, cols].to(acc), scale, logits, rows, cols, causal, mask)
            tile_lse = torch.logsumexp(s, dim=-1)  # (B, H, n_q); -inf where the row sees nothing here
            probs = torch.exp(s - tile_lse.nan_to_num(neginf=0.0).unsqueeze(-1))
            tile_out = torch.einsum("bhqk,bhkd->bhqd", probs, v[:, :, cols].to(acc))
            merge_into(out[:, :, rows], lse[:, :, rows], tile_out, tile_lse, first=first)
            first = False
    return out.to(q.dtype), lse


def tiled_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    mask: torch.Tensor | None,
    logits: BoundLogits,
    tile: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`tiled_forward`'s share of the rows, given their FINAL ``out`` and ``lse``.

    Per tile: ``p = exp(s - lse)``, ``dv += p^T dout``, ``ds = p * (dout v^T - <dout, out>)``, then
    ``ds`` goes back through the score function (autograd on the tile) to ``q . k * scale``.

    Args:
        dout: Gradient of the rows' output ``(B, H, S_q, D)``.
        q: Queries ``(B, H, S_q, D)``.
        k: Keys ``(B, H, S_k, D)`` (expanded).
        v: Values ``(B, H, S_k, D)`` (expanded).
        out: Final output of the rows ``(B, H, S_q, D)``.
        lse: Final log-sum-exp of the rows ``(B, H, S_q)``; ``-inf`` for rows that see nothing.
        causal: As in :func:`tiled_forward`.
        scale: As in :func:`tiled_forward`.
        mask: As in :func:`tiled_forward`.
        logits: As in :func:`tiled_forward`.
        tile: As in :func:`tiled_forward`.

    Returns:
        ``(dq, dk, dv)`` in the accumulation dtype, shaped like ``q``, ``k``, ``v``.
    """
    acc = accum_dtype(q.dtype)
    tile = DEFAULT_LOGIT_TILE if tile is None else tile
    q, k, v, dout = (t.to(acc) for t in (q, k, v, dout))
    lse = lse.nan_to_num(neginf=0.0).to(acc)  # rows that see nothing: every probability is exp(-inf) = 0
    delta = (dout * out.to(acc)).sum(-1)  # (B, H, S_q): <dout, out> per row
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    sq, sk = q.shape[2], k.shape[2]
    for rows in _tiles(sq, tile):
        for cols in _tiles(sk, tile):
            if causal and cols.start >= rows.stop:
                break
            q_t, k_t, v_t = q[:, :, rows], k[:, :, cols], v[:, :, cols]
            raw = torch.einsum("bhqd,bhkd->bhqk", q_t, k_t) * scale
            with torch.enable_grad():  # a score function's derivative comes from autograd on this tile
                raw.requires_grad_(logits.spec.score_mod is not None)
                s = logits.apply(raw, rows, cols)
            hidden = _hidden(rows, cols, causal, mask)
            probs = torch.exp(s.detach() - lse[:, :, rows].unsqueeze(-1))  # (B, H, n_q, n_k)
            if hidden is not None:
                probs = probs.masked_fill(hidden.to(probs.device), 0.0)
            dv[:, :, cols] += torch.einsum("bhqk,bhqd->bhkd", probs, dout[:, :, rows])
            dprobs = torch.einsum("bhqd,bhkd->bhqk", dout[:, :, rows], v_t)
            ds = probs * (dprobs - delta[:, :, rows].unsqueeze(-1))
            draw = logits.backward(raw, s, ds) * scale
            dq[:, :, rows] += torch.einsum("bhqk,bhkd->bhqd", draw, k_t)
            dk[:, :, cols] += torch.einsum("bhqk,bhqd->bhkd", draw, q_t)
    return dq, dk, dv
