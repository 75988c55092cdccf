"""The block loop: local queries against one K/V block, through the kernel calls planned for it.

Ring attention runs it once per ring step on the visiting block; all-gather attention once on the
gathered K/V. The forward merges every call's ``(out, lse)`` into running accumulators (see Note
[LSE merge] in :mod:`cp_dtensor.local.merge`); the backward adds every call's gradients into accumulators.
Neither communicates.

Legend: ``B`` batch, ``H`` query heads, ``H_kv`` K/V heads, ``S`` local queries, ``S_kv`` keys of the
block, ``D`` head dim.
"""

from __future__ import annotations

import torch
from torch.profiler import record_function

from cp_dtensor.local.kernels import block_backward, block_forward
from cp_dtensor.local.logits import BoundLogits
from cp_dtensor.local.merge import merge_into
from cp_dtensor.positions.tiles import KernelCall

__all__ = ["forward_blocks", "backward_blocks"]


def forward_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    calls: list[KernelCall],
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
    merged: torch.Tensor,
    logits: BoundLogits | None = None,
) -> None:
    """Attend ``q`` to one K/V block through ``calls`` and merge the results into ``out`` and ``lse``.

    Args:
        q: Local queries ``(B, H, S, D)``.
        k: Keys of the block ``(B, H_kv, S_kv, D)``.
        v: Values of the block ``(B, H_kv, S_kv, D)``.
        calls: The planned kernel calls (:mod:`cp_dtensor.positions.tiles`).
        scale: Softmax scale.
        out: Running output ``(B, H, S, D)`` in the accumulation dtype, updated in place.
        lse: Running log-sum-exp ``(B, H, S)``, updated in place.
        merged: Host bool ``(S,)``: rows some call was merged into; updated in place. The first merge
            into a row is told so from here, so the merge never reads ``lse`` back from the device.
        logits: Soft-capping or a score function at the global positions of ``q``'s rows and the
            block's keys, or ``None``.
    """
    for blk, mask in calls:
        with record_function("cp_dtensor.ring.attn_block"):
            block_out, block_lse = block_forward(
                q[:, :, blk.q], k[:, :, blk.kv], v[:, :, blk.kv], causal=blk.causal, scale=scale, mask=mask,
                logits=None if logits is None else logits.sliced(blk.q, blk.kv),
            )  # fmt: skip
        with record_function("cp_dtensor.ring.merge"):
            first = not bool(merged[blk.q].any())
            merge_into(out[:, :, blk.q], lse[:, :, blk.q], block_out, block_lse, first=first)
            merged[blk.q] = True


def backward_blocks(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    calls: list[KernelCall],
    scale: float,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    logits: BoundLogits | None = None,
) -> None:
    """Add the gradients of every call of one K/V block into ``grads``.

    Args:
        dout: Gradient of the local output ``(B, H, S, D)``.
        q: Local queries ``(B, H, S, D)``.
        k: Keys of the block ``(B, H_kv, S_kv, D)``.
        v: Values of the block ``(B, H_kv, S_kv, D)``.
        out: The saved final output ``(B, H, S, D)``.
        lse: The saved final log-sum-exp ``(B, H, S)``.
        calls: The planned kernel calls, as in the forward.
        scale: Softmax scale.
        grads: ``(dq, dk, dv)`` accumulators shaped like ``q``, ``k``, ``v``, updated in place.
        logits: As in :func:`forward_blocks`.
    """
    dq, dk, dv = grads
    for blk, mask in calls:
        with record_function("cp_dtensor.ring.attn_block_backward"):
            dq_b, dk_b, dv_b = block_backward(
                dout[:, :, blk.q],
                q[:, :, blk.q],
                k[:, :, blk.kv],
                v[:, :, blk.kv],
                out[:, :, blk.q],
                lse[:, :, blk.q],
                causal=blk.causal,
                scale=scale,
                mask=mask,
                logits=None if logits is None else logits.sliced(blk.q, blk.kv),
            )
        dq[:, :, blk.q] += dq_b
        dk[:, :, blk.kv] += dk_b
        dv[:, :, blk.kv] += dv_b
