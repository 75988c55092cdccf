"""Attention math: the full-attention oracle and the per-block pieces the ring is built from.

Everything here is a pure function of tensors: no ranks, no buffers, no communication (those live
in `reference/ring.py`). Three groups:

* `full_attention`: the textbook ``softmax(Q K^T * scale) V``, the oracle every other path is
  checked against.
* `attention_block` / `attention_block_backward`: attention of a query block to one key/value
  block, returning the partial output together with its log-sum-exp (`lse`), and the matching
  flash-attention backward. The ring calls these once per (rank, step).
* helpers: `causal_mask`, `expand_kv_heads` / `reduce_kv_heads` (grouped-query attention),
  `check_attention_inputs`, `default_scale`.

Shape legend (SDPA layout):
    B: batch, H: query heads, H_kv: key/value heads (H_kv divides H), S_q / S_k: query / key
    sequence length, D: head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "attention_block",
    "attention_block_backward",
    "causal_mask",
    "check_attention_inputs",
    "default_scale",
    "expand_kv_heads",
    "full_attention",
    "reduce_kv_heads",
]


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Check that q, k, v are SDPA-layout tensors that fit together.

    Args:
        q: Queries, shape (B, H, S_q, D).
        k: Keys, shape (B, H_kv, S_k, D).
        v: Values, shape (B, H_kv, S_k, D).

    Raises:
        ValueError: If a tensor is not 4-D, if k and v differ in shape, if batch or head dim of q
            and k differ, or if H_kv does not divide H.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected 4 dims (batch, heads, seq, head_dim)")
    if k.shape != v.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; they must match")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q has shape {tuple(q.shape)} and k {tuple(k.shape)}; batch (dim 0) and head_dim (dim 3) must match"
        )
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_heads % num_kv_heads != 0:
        divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"q has {num_heads} heads but k/v have {num_kv_heads}; the number of k/v heads must "
            f"divide the number of query heads (grouped-query attention), i.e. be one of {divisors}"
        )


def default_scale(head_dim: int) -> float:
    """Return the softmax scale SDPA uses when none is given: ``1 / sqrt(head_dim)``."""
    return 1.0 / math.sqrt(head_dim)


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Repeat each key/value head for the query heads it serves (grouped-query attention).

    k/v head ``j`` serves the ``num_heads // H_kv`` consecutive query heads starting at
    ``j * num_heads // H_kv``, as in SDPA's ``enable_gqa=True``.

    Args:
        x: Keys or values, shape (B, H_kv, S, D).
        num_heads: Number of query heads H; a multiple of H_kv.

    Returns:
        Shape (B, H, S, D).
    """
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def reduce_kv_heads(grad: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Sum a per-query-head gradient back onto the k/v heads (the adjoint of `expand_kv_heads`).

    Args:
        grad: Gradient w.r.t. the expanded keys or values, shape (B, H, S, D).
        num_kv_heads: Number of key/value heads H_kv; divides H.

    Returns:
        Shape (B, H_kv, S, D).
    """
    B, H, S, D = grad.shape
    return grad.view(B, num_kv_heads, H // num_kv_heads, S, D).sum(dim=2)


def causal_mask(q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
    """Which (query, key) pairs a causal model may attend: key position <= query position.

    Positions are global token positions, so the same function builds the mask of a whole
    sequence (``arange``) and of any block of a sharded one.

    Args:
        q_positions: Global positions of the queries, shape (S_q,).
        k_positions: Global positions of the keys, shape (S_k,).

    Returns:
        Bool tensor, shape (S_q, S_k); True where the query may attend the key.
    """
    return k_positions[None, :] <= q_positions[:, None]  # (S_q, S_k)


def _allowed_pairs(s_q: int, s_k: int, causal: bool, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Combine the causal rule and an optional user mask; broadcastable to (B, H, S_q, S_k)."""
    if causal:  # top-left aligned, like SDPA's is_causal: query i sees keys j <= i
        allowed = causal_mask(torch.arange(s_q, device=device), torch.arange(s_k, device=device))
    else:
        allowed = torch.ones(s_q, s_k, dtype=torch.bool, device=device)  # (S_q, S_k)
    if mask is not None:
        allowed = allowed & mask
    return allowed


def _masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to allowed entries; rows with none give all zeros.

    Written out (instead of `torch.softmax` on -inf scores) so that a row with no allowed key
    yields zeros and zero gradient, not NaN.
    """
    scores = scores.masked_fill(~allowed, float("-inf"))  # (B, H, S_q, S_k)
    row_max = scores.amax(dim=-1, keepdim=True).detach()  # the shift does not change the result
    row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)  # rows with no allowed key
    weights = torch.exp(scores - row_max)  # masked entries are exactly 0
    total = weights.sum(dim=-1, keepdim=True)  # (B, H, S_q, 1)
    return weights / torch.where(total > 0, total, torch.ones_like(total))


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    score_mod: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Plain attention, ``softmax(Q K^T * scale) V``, with the whole score matrix in memory.

    The oracle of the project. It computes in the dtype of its inputs (tests call it in float64)
    and is differentiable by autograd.

    Args:
        q: Queries, shape (B, H, S_q, D).
        k: Keys, shape (B, H_kv, S_k, D); H_kv must divide H (grouped-query attention: k/v head
            ``j`` serves query heads ``j * H // H_kv`` to ``(j + 1) * H // H_kv - 1``).
        v: Values, shape (B, H_kv, S_k, D).
        causal: If True, query ``i`` attends keys ``j <= i`` (top-left aligned, as SDPA's
            ``is_causal``).
        scale: Multiplier of the scores; defaults to ``1 / sqrt(D)``.
        mask: Optional bool tensor broadcastable to (B, H, S_q, S_k); True means "may attend".
            Combined with ``causal`` by logical and.
        sinks: Optional attention sinks, shape (H,): one more logit per head in every row's softmax,
            whose value is zero (GPT-OSS). Differentiable.
        softcap: Optional logit soft-capping: each score ``s`` becomes ``softcap * tanh(s / softcap)`` (Gemma 2).
        score_mod: Optional ``score_mod(score, b, h, q_idx, kv_idx)`` (FlexAttention's form), applied
            after ``softcap`` to the whole score matrix with broadcast indices: ``b`` (B, 1, 1, 1),
            ``h`` (1, H, 1, 1), ``q_idx`` (1, 1, S_q, 1), ``kv_idx`` (1, 1, 1, S_k) (the positions of
            the whole sequence, 0 to S - 1).

    Returns:
        Output, shape (B, H, S_q, D). A query row with no visible key gets 0 (and zero gradient).

    Raises:
        ValueError: If the shapes of q, k, v do not fit together (see `check_attention_inputs`).
    """
    check_attention_inputs(q, k, v)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    k = expand_kv_heads(k, q.shape[1])  # (B, H, S_k, D)
    v = expand_kv_heads(v, q.shape[1])  # (B, H, S_k, D)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, S_q, S_k)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if score_mod is not None:
        b, h, i, j = (torch.arange(n, device=q.device) for n in scores.shape)  # every index of the score matrix
        modified = score_mod(scores, b.view(-1, 1, 1, 1), h.view(1, -1, 1, 1), i.view(1, 1, -1, 1), j.view(1, 1, 1, -1))
        scores = modified.expand(scores.shape)
    allowed = _allowed_pairs(q.shape[2], k.shape[2], causal, mask, q.device)
    if sinks is not None:  # the sink is one more key per head, always visible, whose value is zero
        rows = scores.shape[:3]  # (B, H, S_q)
        scores = torch.cat([scores, sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*rows, 1)], dim=-1)
        always = torch.ones(*rows, 1, dtype=torch.bool, device=q.device)
        allowed = torch.cat([allowed.expand(*rows, k.shape[2]), always], dim=-1)  # (B, H, S_q, S_k + 1)
        v = torch.cat([v, v.new_zeros(v.shape[0], v.shape[1], 1, v.shape[3])], dim=2)  # (B, H, S_k + 1, D)
    probs = _masked_softmax(scores, allowed)  # (B, H, S_q, S_k) (+ 1 with sinks)
    return probs @ v  # (B, H, S_q, D)


def attention_block(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, visible: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend a query block to one key/value block; return the partial output and its LSE.

    The output is normalised over this block's keys only; the log-sum-exp of the block's scores
    is what lets `cp_dtensor.reference.ring.merge` combine blocks into the softmax over all keys.

    Args:
        q: Query block, shape (B, H, S_q, D).
        k: Key block, shape (B, H_kv, S_k, D).
        v: Value block, shape (B, H_kv, S_k, D).
        scale: Multiplier of the scores.
        visible: Bool, shape (S_q, S_k), or (B, 1, S_q, S_k) for a per-row mask (packed documents);
            True for the pairs to compute.

    Returns:
        ``(out, lse)``: ``out`` of shape (B, H, S_q, D) and ``lse = log(sum_j exp(score_ij))`` over
        the visible keys, shape (B, H, S_q). A row with no visible key has ``out = 0`` and
        ``lse = -inf``.
    """
    k = expand_kv_heads(k, q.shape[1])  # (B, H, S_k, D)
    v = expand_kv_heads(v, q.shape[1])  # (B, H, S_k, D)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, S_q, S_k)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, S_q)
    finite_lse = lse.masked_fill(lse == float("-inf"), 0.0)  # rows with no visible key
    probs = torch.exp(scores - finite_lse[..., None])  # (B, H, S_q, S_k)
    return probs @ v, lse  # (B, H, S_q, D), (B, H, S_q)


def attention_block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    *,
    scale: float,
    visible: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one (query block, key/value block) pair, the flash-attention way.

    With the FINAL log-sum-exp of each query row (over all keys, not only this block's), the
    probabilities of this block are recomputed exactly, and the block's share of the gradient is::

        P  = exp(Q K^T * scale - lse)        (zero where not visible)
        dV = P^T dO
        dP = dO V^T
        dS = P * (dP - delta),  delta = rowsum(dO * O)   (softmax backward)
        dQ = dS K * scale,  dK = dS^T Q * scale

    Summing these over all key blocks gives the exact gradients (Dao, FlashAttention-2, Alg. 2).

    Args:
        dout: Gradient of the output rows, shape (B, H, S_q, D).
        q: Query block, shape (B, H, S_q, D).
        k: Key block, shape (B, H_kv, S_k, D).
        v: Value block, shape (B, H_kv, S_k, D).
        lse: Final log-sum-exp of each query row, shape (B, H, S_q).
        delta: ``rowsum(dO * O)`` with the final output O, shape (B, H, S_q).
        scale: Multiplier of the scores.
        visible: Bool, shape (S_q, S_k) or (B, 1, S_q, S_k); True for the pairs that were computed
            in the forward.

    Returns:
        ``(dq, dk, dv)`` of shapes (B, H, S_q, D), (B, H_kv, S_k, D), (B, H_kv, S_k, D): this block's
        contributions; dk and dv are summed over the query heads that share a k/v head.
    """
    num_kv_heads = k.shape[1]
    k = expand_kv_heads(k, q.shape[1])  # (B, H, S_k, D)
    v = expand_kv_heads(v, q.shape[1])  # (B, H, S_k, D)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, S_q, S_k)
    probs = torch.exp(scores - lse[..., None]).masked_fill(~visible, 0.0)  # (B, H, S_q, S_k)
    dv = probs.transpose(-2, -1) @ dout  # (B, H, S_k, D)
    dprobs = dout @ v.transpose(-2, -1)  # (B, H, S_q, S_k)
    dscores = probs * (dprobs - delta[..., None])  # (B, H, S_q, S_k)
    dq = (dscores @ k) * scale  # (B, H, S_q, D)
    dk = (dscores.transpose(-2, -1) @ q) * scale  # (B, H, S_k, D)
    return dq, reduce_kv_heads(dk, num_kv_heads), reduce_kv_heads(dv, num_kv_heads)
