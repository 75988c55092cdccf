"""Rotary position embeddings (RoPE) on GLOBAL positions, so any shard of a sequence rotates right.

RoPE turns position into a rotation of each pair of channels of ``q`` and ``k``; the score between
a query at position ``m`` and a key at ``n`` then depends on ``m - n`` only. Under context
parallelism a rank's tokens are not positions ``0 .. S_local - 1``: a zigzag shard holds two runs
from opposite ends of the sequence. The angles must therefore come from the tokens' global
positions (``cp_group.position_ids(seq_len)``), never from ``arange(S_local)``; then every token is
rotated exactly as it would be on one device, and ring attention is exact.

Pure math, no communication. Llama's convention: channel ``i`` pairs with channel ``i + D/2``
("rotate half"), frequencies ``base ** (-2i / D)``.

Legend: ``B`` batch, ``H`` heads, ``S`` (local) sequence length, ``D`` head dim.
"""

from __future__ import annotations

import torch

__all__ = ["rope_cos_sin", "apply_rope"]


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, *, base: float = 10_000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of the rotation angles at the given positions.

    Args:
        position_ids: Global positions of the local tokens, a ``(S,)`` integer tensor.
        head_dim: ``D``, even.
        base: RoPE base (theta).
        dtype: Dtype the angles are computed in (fp32; fp64 for fp64 models).

    Returns:
        ``(cos, sin)``, each ``(S, D)``: the ``D/2`` angles repeated for both halves.

    Raises:
        ValueError: ``head_dim`` is not a positive even int.
    """
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"RoPE needs a positive even head_dim, got {head_dim!r}.")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=dtype, device=position_ids.device) / head_dim)
    angles = position_ids.to(dtype)[:, None] * inv_freq[None, :]  # (S, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (S, D)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` by the angles of its tokens.

    Args:
        x: Queries or keys ``(B, H, S, D)``.
        cos: ``(S, D)`` from :func:`rope_cos_sin`.
        sin: ``(S, D)`` from :func:`rope_cos_sin`.

    Returns:
        The rotated tensor, ``(B, H, S, D)`` in ``x``'s dtype.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # keep bf16 activations bf16 (Llama does the same)
    return x * cos + _rotate_half(x) * sin
