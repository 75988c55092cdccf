"""Benchmark-only adapter: yunchang (USP) on CPU, forward only. Not part of cp_dtensor.

yunchang 0.6.4 (``pip install yunchang==0.6.4 --no-deps``; torch is its only hard dependency) has a
"pure torch" attention type, ``AttnType.TORCH_FLASH``, whose forward calls the CUDA-only
``aten._scaled_dot_product_flash_attention``. :func:`patch_for_cpu` swaps that one op, inside this
process, for ``aten._scaled_dot_product_flash_attention_for_cpu`` (same arguments, returns
``(out, lse)``; yunchang keeps ``[:2]``). Nothing else is changed. Why forward only: the backward of
every torch attention type raises "Not implemented backward for PyTorch attention types"
(``yunchang/kernels/attention.py: pytorch_attn_backward``).

yunchang's tensors are ``(B, S, H, D)``; cp_dtensor's are ``(B, H, S, D)``.
"""

from __future__ import annotations

import importlib.metadata

import torch

__all__ = ["available", "version", "patch_for_cpu", "positions", "runs_of"]


def available() -> bool:
    """Whether yunchang can be imported."""
    try:
        import yunchang  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str | None:
    """Installed yunchang version."""
    try:
        return importlib.metadata.version("yunchang")
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_flash(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, scale=scale
    )


def patch_for_cpu() -> None:
    """Route yunchang's ``TORCH_FLASH`` forward to the CPU flash kernel (this process only)."""
    import yunchang.kernels.attention as attention

    attention._scaled_dot_product_flash_attention = _cpu_flash


def positions(
    kind: str, seq_len: int, rank: int, world_size: int, ring_degree: int, ulysses_degree: int
) -> torch.Tensor:
    """Global positions of ``rank``'s shard under yunchang's own extract function ``kind``.

    ``"basic"`` (contiguous) or ``"zigzag"``; the zigzag of the hybrid needs
    ``yunchang.set_seq_parallel_pg`` to have run (it reads the ring and Ulysses groups).
    """
    from yunchang import EXTRACT_FUNC_DICT

    pos = torch.arange(seq_len).view(1, seq_len)
    return EXTRACT_FUNC_DICT[kind](pos, rank, world_size, ring_degree, ulysses_degree, dim=1).reshape(-1)


def runs_of(pos: torch.Tensor) -> list[tuple[int, int]]:
    """Positions -> runs ``(start, length)`` of consecutive positions."""
    runs: list[tuple[int, int]] = []
    for p in pos.tolist():
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs
