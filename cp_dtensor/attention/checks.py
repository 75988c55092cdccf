"""Checks of user input shared by the attention strategies (``ValueError`` with the fix)."""

from __future__ import annotations

import math

import torch

from cp_dtensor.mesh.group import ContextParallelGroup

__all__ = ["check_qkv", "resolve_scale", "check_group"]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Validate local SDPA-layout shards ``(B, H, S_local, D)`` of one attention call.

    Raises:
        ValueError: A tensor is not 4-D, shapes, dtypes or devices disagree, the dtype is not a
            supported float type, or K/V heads do not divide query heads.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, heads, seq_local, head_dim) like SDPA, got shape {tuple(t.shape)}."
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}.")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}.")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}.")
    (b, h, s, d), (bk, hk, sk, dk) = q.shape, k.shape
    if (b, s, d) != (bk, sk, dk):
        raise ValueError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on batch, seq_local and head_dim "
            "(layout (batch, heads, seq_local, head_dim))."
        )
    if min(b, h, s, d, hk) == 0:
        raise ValueError(f"Empty attention input: q {tuple(q.shape)}, k/v {tuple(k.shape)}.")
    if h % hk:
        raise ValueError(f"The number of K/V heads ({hk}) must divide the number of query heads ({h}) (GQA/MQA).")


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale: ``scale`` if given (positive, finite), else ``head_dim ** -0.5``."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}.")
    return float(scale)


def check_group(cp_group: object) -> None:
    """Raise ``ValueError`` unless ``cp_group`` is a :class:`~cp_dtensor.ContextParallelGroup`."""
    if not isinstance(cp_group, ContextParallelGroup):
        raise ValueError(
            "cp_group must be a ContextParallelGroup (from init_context_parallel_group), "
            f"got {type(cp_group).__name__}."
        )
