"""Sequence-tiled MLP: a per-token function run over token tiles, recomputed tile by tile in backward.

Note [Sequence-tiled MLP]
~~~~~~~~~~~~~~~~~~~~~~~~~
A Llama block's MLP is per token: ``y_t = mlp(norm(x_t))``, and its intermediates (``gate``,
``silu(gate)``, ``up``, their product: four ``(T, F)`` tensors, ``F ~ 2.7 E``) are the largest
activations of a block. With context parallelism every other activation is linear in the local tokens
``T``, so once the loss is chunked these intermediates (kept for backward, or made again in the
MLP's backward) decide the peak of long sequences.

:func:`tiled_mlp` runs the function over tiles of ``C`` tokens (ALST's TiledMLP, Bekman et al. 2025,
arXiv:2506.13996):

* forward, without autograd: each tile's output is written into one ``(T, E)`` output; only the
  input ``x`` is saved;
* backward: each tile is recomputed with autograd and differentiated at once
  (``torch.autograd.grad``), its input gradient written into one ``(T, E)`` gradient, its weight
  gradients summed over the tiles.

So the intermediates exist for one tile at a time, ``C / T`` of their untiled size, at the cost of
one more forward of the MLP (as selective checkpointing), plus one weight-gradient-sized sum. The
result is the untiled one up to the order of the weight gradients' sums over tokens (fp64: within
``1e-12``). The tiles are rows of the flattened ``(B * S, E)`` input, so the function must be per
token (no mixing along the sequence: an MLP and a norm are; attention is not).

The weights are inputs of the autograd function, so their gradients flow through autograd like
those of any op: FSDP2 (which gathers the weights around the block and reduce-scatters their
gradients) and activation checkpointing (which re-runs the forward) need nothing special.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from cp_dtensor.arguments import check_positive_int

__all__ = ["tiled_mlp"]


class _TiledMLP(torch.autograd.Function):
    """``fn`` over row tiles of ``x``, recomputed per tile in backward (Note [Sequence-tiled MLP])."""

    @staticmethod
    def forward(ctx, fn, tile_size, x_TE, *params):
        ctx.fn, ctx.tile_size = fn, tile_size
        ctx.save_for_backward(x_TE, *params)
        out_TE = torch.empty_like(x_TE)
        for start in range(0, x_TE.shape[0], tile_size):
            out_TE[start : start + tile_size] = fn(x_TE[start : start + tile_size])
        return out_TE

    @staticmethod
    def backward(ctx, grad_TE):
        x_TE, *params = ctx.saved_tensors
        wanted = [p for p, needed in zip(params, ctx.needs_input_grad[3:]) if needed]
        grad_x_TE = torch.empty_like(x_TE) if ctx.needs_input_grad[2] else None
        sums: list[torch.Tensor] | None = None
        for start in range(0, x_TE.shape[0], ctx.tile_size):
            rows = slice(start, start + ctx.tile_size)
            tile = x_TE[rows].detach().requires_grad_(grad_x_TE is not None)
            with torch.enable_grad():
                out = ctx.fn(tile)
            inputs = ([tile] if grad_x_TE is not None else []) + wanted
            grads = list(torch.autograd.grad(out, inputs, grad_TE[rows]))
            del out
            if grad_x_TE is not None:
                grad_x_TE[rows] = grads.pop(0)
            if sums is None:
                sums = grads
            else:
                for total, grad in zip(sums, grads):
                    total.add_(grad)
        by_param = iter(sums or [])
        grad_params = [next(by_param) if needed else None for needed in ctx.needs_input_grad[3:]]
        return None, None, grad_x_TE, *grad_params


def tiled_mlp(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    tile_size: int,
) -> torch.Tensor:
    """``fn(x)`` computed ``tile_size`` tokens at a time, so ``fn``'s intermediates exist for one tile.

    See Note [Sequence-tiled MLP]. Example, a pre-norm SwiGLU block half::

        params = [*norm.parameters(), *mlp.parameters()]
        y = x + tiled_mlp(lambda t: mlp(norm(t)), x, params, tile_size=4096)

    Args:
        fn: A per-token function ``(C, E) -> (C, E)`` (rows are tokens; no mixing between rows).
        x: ``(..., E)``, e.g. ``(B, S, E)`` on the local shard; flattened to ``(T, E)`` rows.
        params: Every tensor ``fn`` uses that needs a gradient (its weights): their gradients are
            returned through autograd, summed over the tiles. A tensor missing here gets no gradient.
        tile_size: Tokens (rows of the flattened input) per tile; the last tile may be shorter.

    Returns:
        ``fn(x)``, shape of ``x``.

    Raises:
        ValueError: ``tile_size`` is not a positive int.
    """
    check_positive_int("tile_size", tile_size)
    x_TE = x.reshape(-1, x.shape[-1])
    if not torch.is_grad_enabled():  # nothing to save; tiles still bound the intermediates
        return torch.cat([fn(tile) for tile in x_TE.split(tile_size)]).view_as(x)
    return _TiledMLP.apply(fn, tile_size, x_TE, *params).view_as(x)
