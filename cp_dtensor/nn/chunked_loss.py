"""The LM head and cross entropy in token tiles: the ``(B, S, V)`` logits never exist at once.

At long context the logits are the largest tensor of a step: ``S`` local tokens times a vocabulary
``V`` of 32K-128K, kept for the backward, plus their float32 copy and their gradient. Only the
per-token loss is needed, so the head and the loss can run tile by tile.

Note [Chunked LM-head loss]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
The ``N = B S`` tokens are cut into tiles of ``C`` (the last may be shorter). Forward computes, per
tile, ``z = h W^T + b`` ``(C, V)``, the sum of ``logsumexp(z) - z[label]`` over its supervised tokens and
how many the argmax predicts, then drops ``z``: only ``h`` (and ``W``, ``b``, the labels) are saved.
Backward recomputes each tile's ``z`` and uses the cross-entropy gradient
``dz = g (softmax(z) - onehot(label))`` (zero on ignored tokens, ``g`` the incoming scalar gradient)
for ``dh = dz W`` of that tile and ``dW += dz^T h``, ``db += sum dz``. Peak memory of the head is then
``O(C V)`` instead of ``O(N V)``; the cost is one more ``h W^T`` matmul (the recompute), a third of the
head's work. The arithmetic is the full path's, tile by tile: same loss and gradients up to the
summation order of ``dW`` (fp64: ~1e-16 relative). Under autocast the tile's logits are computed in
the autocast dtype and upcast to float32 for the loss, as the full path does, in the backward too.

The partial sums then go through :func:`~cp_dtensor.nn.loss.global_mean_loss`, so the result is the
mean over every supervised token of the global batch (Note [Loss across shards]).

Legend: ``B`` batch, ``S`` local sequence length, ``E`` hidden size, ``V`` vocab size, ``N = B S``
tokens, ``C`` tokens per tile.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from cp_dtensor.mesh.group import ContextParallelGroup
from cp_dtensor.nn.loss import IGNORE_INDEX, ShardedLoss, global_mean_loss

__all__ = ["DEFAULT_LOSS_CHUNK_SIZE", "chunked_cross_entropy_across_shards", "chunked_linear_cross_entropy"]

DEFAULT_LOSS_CHUNK_SIZE = 1024
"""Tokens per tile: at V = 128K that is 0.5 GiB of float32 logits, small next to the model."""


def _upcast(z_CV: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: float32, or kept in float64 (what the full path does)."""
    return z_CV if z_CV.dtype == torch.float64 else z_CV.float()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of cross entropy of ``h W^T + b`` over supervised tokens, tile by tile (Note [Chunked LM-head loss])."""

    @staticmethod
    def forward(ctx, h_NE, weight_VE, bias_V, labels_N, chunk_size: int, ignore_index: int):
        device_type = h_NE.device.type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type), device_type)
        loss_sum = h_NE.new_zeros((), dtype=torch.float64 if h_NE.dtype == torch.float64 else torch.float32)
        num_correct = torch.zeros((), dtype=torch.long, device=h_NE.device)
        for start in range(0, h_NE.shape[0], chunk_size):
            labels_C = labels_N[start : start + chunk_size]
            valid_C = labels_C != ignore_index
            z_CV = _upcast(torch.nn.functional.linear(h_NE[start : start + chunk_size], weight_VE, bias_V))
            target_C = z_CV.gather(1, labels_C.clamp_min(0).unsqueeze(1)).squeeze(1)
            loss_sum += ((torch.logsumexp(z_CV, dim=1) - target_C) * valid_C).sum()
            num_correct += ((z_CV.argmax(1) == labels_C) & valid_C).sum()
        ctx.save_for_backward(h_NE, weight_VE, bias_V, labels_N)
        ctx.chunk_size, ctx.ignore_index = chunk_size, ignore_index
        ctx.mark_non_differentiable(num_correct)
        return loss_sum, num_correct

    @staticmethod
    def backward(ctx, grad_sum, _grad_correct):
        h_NE, weight_VE, bias_V, labels_N = ctx.saved_tensors
        enabled, dtype, device_type = ctx.autocast
        dh_NE = torch.empty_like(h_NE) if ctx.needs_input_grad[0] else None
        dweight_VE = torch.zeros_like(weight_VE, dtype=torch.promote_types(weight_VE.dtype, torch.float32))
        dbias_V = None if bias_V is None else torch.zeros_like(dweight_VE[:, 0])
        for start in range(0, h_NE.shape[0], ctx.chunk_size):
            h_CE, labels_C = h_NE[start : start + ctx.chunk_size], labels_N[start : start + ctx.chunk_size]
            with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                z_CV = torch.nn.functional.linear(h_CE, weight_VE, bias_V)
            compute_dtype, z_CV = z_CV.dtype, _upcast(z_CV)
            valid_C = labels_C != ctx.ignore_index
            dz_CV = torch.softmax(z_CV, dim=1)
            del z_CV  # one (C, V) tile alive at a time, besides the matmuls' own
            dz_CV.scatter_add_(1, labels_C.clamp_min(0).unsqueeze(1), -torch.ones_like(dz_CV[:, :1]))
            dz_CV = dz_CV.mul_(valid_C.unsqueeze(1) * grad_sum).to(compute_dtype)
            if dh_NE is not None:
                dh_NE[start : start + ctx.chunk_size] = dz_CV @ weight_VE.to(compute_dtype)
            if dz_CV.dtype == dweight_VE.dtype:  # accumulate in place: no (V, E) temporary
                dweight_VE.addmm_(dz_CV.t(), h_CE)
            else:
                dweight_VE += dz_CV.t() @ h_CE.to(compute_dtype)
            if dbias_V is not None:
                dbias_V += dz_CV.sum(0)
            del dz_CV  # before the next tile's logits exist
        dbias_V = None if dbias_V is None else dbias_V.to(bias_V.dtype)
        return dh_NE, dweight_VE.to(weight_VE.dtype), dbias_V, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's cross-entropy SUM of ``hidden @ weight.T + bias`` without holding all logits.

    Same value and gradients as ``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels,
    reduction="sum")``, in ``O(chunk_size * V)`` memory (Note [Chunked LM-head loss]).

    Args:
        hidden: ``(B, S, E)`` final hidden states (after the last norm).
        weight: ``(V, E)`` LM-head weight (a tensor-parallel DTensor is gathered whole).
        labels: ``(B, S)`` targets, ``ignore_index`` where none.
        bias: Optional ``(V,)`` LM-head bias.
        chunk_size: Tokens per tile (any positive number; it need not divide ``B S``).
        ignore_index: Label value that contributes nothing.

    Returns:
        ``(loss_sum, num_valid, num_correct)``: scalar sum of the supervised tokens' losses (with
        its gradient), how many tokens are supervised, and how many of them the argmax predicts.

    Raises:
        ValueError: ``chunk_size`` is not a positive integer, or the shapes disagree.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer (tokens per tile), got {chunk_size!r}.")
    if hidden.shape[:-1] != labels.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be (B, S, E) with labels (B, S) and weight (V, E); got labels "
            f"{tuple(labels.shape)} and weight {tuple(weight.shape)}."
        )
    if isinstance(weight, DTensor):  # tensor parallel: the colwise head's logits are all-gathered anyway
        weight = weight.full_tensor()
    if isinstance(bias, DTensor):
        bias = bias.full_tensor()
    labels_N = labels.reshape(-1)
    loss_sum, num_correct = _ChunkedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels_N, chunk_size, ignore_index
    )
    return loss_sum, (labels_N != ignore_index).sum(), num_correct


def chunked_cross_entropy_across_shards(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    cp_group: ContextParallelGroup,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE,
    ignore_index: int = IGNORE_INDEX,
) -> ShardedLoss:
    """:func:`~cp_dtensor.cross_entropy_across_shards` of ``hidden @ weight.T + bias``, never holding all logits.

    Examples:
        >>> h_BSE = model.norm(hidden_states)  # doctest: +SKIP
        >>> out = chunked_cross_entropy_across_shards(
        ...     h_BSE, model.lm_head.weight, labels, cp_group
        ... )
        >>> out.loss.backward()

    Args:
        hidden: This rank's final hidden states ``(B, S, E)``.
        weight: The LM head's ``(V, E)`` weight.
        labels: This rank's labels ``(B, S)``, partitioned like the inputs after
            :func:`~cp_dtensor.nn.loss.shift_labels`.
        cp_group: The group; the counts are summed over its whole dp x cp mesh.
        bias: Optional ``(V,)`` LM-head bias.
        chunk_size: Tokens per tile (Note [Chunked LM-head loss]).
        ignore_index: Label value that contributes nothing.

    Returns:
        The :class:`~cp_dtensor.ShardedLoss`; ``loss`` equals the single-device loss on the global batch.

    Raises:
        ValueError: From :func:`chunked_linear_cross_entropy`.
    """
    loss_sum, num_valid, num_correct = chunked_linear_cross_entropy(
        hidden, weight, labels, bias=bias, chunk_size=chunk_size, ignore_index=ignore_index
    )
    return global_mean_loss(loss_sum, num_valid, num_correct, cp_group)
