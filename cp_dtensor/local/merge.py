r"""Merging partial attention results with their log-sum-exp (the online softmax).

Note [LSE merge]
----------------
Attention of a query row over keys split into blocks ``A`` and ``B`` is

.. math::
    o = \frac{e^{l_A} o_A + e^{l_B} o_B}{e^{l_A} + e^{l_B}}, \qquad l = \log(e^{l_A} + e^{l_B}),

where ``o_X`` is the softmax-normalised output over block ``X`` alone and ``l_X`` its log-sum-exp.
Written with ``sigmoid(x) = 1 / (1 + e^{-x})`` this never exponentiates a large number:

.. math::
    o = o_A - \sigma(l_B - l_A)(o_A - o_B), \qquad l = \max(l_A, l_B) + \log(1 + e^{-|l_A - l_B|}).

The output update is the sigmoid form of ring-flash-attention PR #34 and PyTorch's own CP; their
log-sum-exp update ``l_A - log(sigmoid(l_A - l_B))`` is the same number, but rounds once more when one
block dominates (logits ~1e4), so the max / log1p form is used. Adding the partial outputs (``output += attn``) drops
both weights and is only right for a single block.

A block a row cannot see at all has ``l_B = -inf``: then ``sigma(l_B - l_A) = 0`` and the row is left
unchanged. A row whose running ``l_A`` is still ``-inf`` takes the block's values as they are.

Note [Attention sinks]
----------------------
A sink (GPT-OSS) is one more logit per head, ``s_h``, in every row's softmax denominator, whose
value vector is zero: the row's probabilities become ``e^{x_j} / (\sum_k e^{x_k} + e^{s_h})``. In
the merge above that is one more block with ``o_B = 0`` and ``l_B = s_h``, so after all key blocks
are merged a single correction makes it exact, whatever the strategy, layout or mask:

.. math::
    l' = \log(e^{l} + e^{s_h}), \qquad o' = o \, e^{l - l'},

and it needs no communication: every rank holds the sinks of the heads it attends with. The
backward is the usual flash backward run with ``(o', l')``: the probabilities it rebuilds,
``e^{x_j - l'}``, are the sink-aware ones, and ``<dO, o'>`` is still the softmax's correction term
(the sink's value is zero). The sink's own gradient is
``dL/ds_h = -\sum_{b, i} e^{s_h - l'_{bhi}} <dO_{bhi}, o'_{bhi}>``; each rank sums its own rows and
the data-parallel gradient reduction (over the cp ranks too) adds the shards. A row that sees no
key keeps ``o' = 0``.
"""

from __future__ import annotations

import torch

__all__ = ["accum_dtype", "add_sinks", "merge_into", "sink_grad"]


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of outputs, log-sum-exps and gradient accumulators: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_into(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor, *, first: bool | None = None
) -> None:
    """Merge one block's result into the running ``(out, lse)``, in place. See Note [LSE merge].

    Args:
        out: Running output (fp32, or fp64) ``(B, H, S, D)``, updated in place.
        lse: Running log-sum-exp (dtype of ``out``) ``(B, H, S)``, updated in place; ``-inf`` where nothing seen yet.
        block_out: The block's output ``(B, H, S, D)`` (any float dtype).
        block_lse: The block's log-sum-exp ``(B, H, S)``; ``-inf`` where the row saw no key.
        first: True when no block was merged into these rows before (``out``, ``lse`` still hold their
            initial 0 and ``-inf``): the block is copied as it is. ``None`` finds out by reading ``lse``,
            which on a GPU waits for the device; the ring knows it from its plan and passes it.
    """
    empty = torch.isneginf(lse)  # rows that saw nothing so far: sigmoid(nan) otherwise
    if first if first is not None else bool(empty.all()):  # take the block as it is (saves four passes)
        out.copy_(block_out)
        lse.copy_(block_lse)
        return
    diff = (block_lse - lse).masked_fill(empty, float("inf"))  # sigmoid(+inf) = 1: take the block
    out.sub_(torch.sigmoid(diff).unsqueeze(-1) * (out - block_out.to(out.dtype)))
    # log(e^a + e^b) = max(a, b) + log1p(e^-|a - b|): exact to the last bit when one block dominates,
    # where lse - logsigmoid(-diff) loses a rounding step (visible at logits ~1e4).
    new_lse = torch.maximum(lse, block_lse) + torch.log1p(torch.exp(-diff.abs()))
    lse.copy_(torch.where(empty, block_lse, new_lse))


def add_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> None:
    """Put each head's sink logit into the softmax of every row, in place. See Note [Attention sinks].

    Args:
        out: The merged output of every key ``(B, H, S, D)`` (accumulation dtype), updated in place.
        lse: Its log-sum-exp ``(B, H, S)``, updated in place.
        sinks: One logit per head ``(H,)``.
    """
    sink_lse = sinks.to(lse.dtype).view(1, -1, 1).expand(lse.shape)  # (B, H, S)
    merge_into(out, lse, torch.zeros((), dtype=out.dtype, device=out.device).expand(out.shape), sink_lse, first=False)


def sink_grad(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """This frame's share of the sinks' gradient: ``-sum over batch and rows of p_sink * <dout, out>``.

    Args:
        dout: Gradient of the output ``(B, H, S, D)``.
        out: The output with sinks ``(B, H, S, D)``.
        lse: The log-sum-exp with sinks ``(B, H, S)``.
        sinks: The sink logits ``(H,)``.

    Returns:
        ``(H,)`` in ``lse``'s dtype: the gradient from these rows (other shards add theirs).
    """
    p_sink = torch.exp(sinks.to(lse.dtype).view(1, -1, 1) - lse)  # (B, H, S): the sink's probability per row
    delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)  # (B, H, S)
    return -(p_sink * delta).sum((0, 2))
