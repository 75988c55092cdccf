"""Attention on one block: fused kernels that return the log-sum-exp, and their backward.

Every strategy reduces to calls of :func:`block_forward` / :func:`block_backward` on slices of the
local queries and a visiting K/V block. They never build a score matrix on the fused paths:

* CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (fp32, fp64, bf16, fp16).
* CUDA: ``aten._scaled_dot_product_flash_attention`` for fp16/bf16 with head_dim <= 256, else
  ``aten._scaled_dot_product_efficient_attention``.
* Anything else (other devices, CUDA fp64, masked calls on CUDA): :func:`_math_forward`, an explicit per-block softmax
  whose memory is ``O(S_q_block * S_k_block)`` (one block, never the whole sequence).
* Calls whose logits are soft-capped or changed by a score function, on any device:
  :func:`cp_dtensor.local.logits.tiled_forward`, tile by tile (Note [Score functions under context
  parallelism] there).

Conventions shared with the rest of the package: tensors are ``(B, H, S, D)`` (SDPA layout); ``lse``
is ``(B, H, S_q)`` in fp32 (fp64 for fp64 inputs) and is ``-inf`` for a query row that sees no key in
the block (the CPU kernel returns 0 there, which :func:`block_forward` corrects). GQA: ``k``/``v`` may
carry ``H_kv`` heads with ``H % H_kv == 0``; each K/V head serves ``H // H_kv`` consecutive query heads.

Note [Non-square causal calls]
------------------------------
``causal=True`` here always means top-left: query ``i`` of the call sees key ``j <= i``. The fused
kernels do not agree on a causal call with ``S_q != S_k``: FlashAttention-2 (PyTorch's CUDA flash
path) aligns the triangle to the bottom-right corner. So such a call is cut into square causal
pieces before any kernel sees it: with ``S_q < S_k`` the keys past ``S_q`` are hidden from every row
(the call runs on the first ``S_q`` keys, and their gradient is 0); with ``S_q > S_k`` the first
``S_k`` rows are a square causal call and the rest see every key. The ring's own plan only makes
square causal calls (:func:`cp_dtensor.positions.blocks.plan_blocks`), so this costs it nothing.
"""

from __future__ import annotations

import torch

from cp_dtensor.local.logits import BoundLogits, tiled_backward, tiled_forward
from cp_dtensor.local.merge import accum_dtype  # defined beside the merge its accumulators feed; exported here too

__all__ = ["block_forward", "block_backward", "accum_dtype"]

_aten = torch.ops.aten


def _expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, H_kv, S, D) -> (B, H, S, D) by repeating each K/V head for its query-head group."""
    groups = num_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _reduce_kv_grad(dx: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, H, S, D) -> (B, H_kv, S, D): sum the gradient over each K/V head's query-head group."""
    b, h, s, d = dx.shape
    return dx if h == num_kv_heads else dx.view(b, num_kv_heads, h // num_kv_heads, s, d).sum(2)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Bool mask (True = visible) -> additive float mask in ``dtype`` (the CPU kernel's requirement)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _rows(mask: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """Query rows ``start:stop`` of a mask broadcastable to ``(B, H, S_q, S_k)``."""
    return mask if mask is None or mask.shape[-2] == 1 else mask[..., start:stop, :]


def _cols(mask: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """Key columns ``start:stop`` of a mask broadcastable to ``(B, H, S_q, S_k)``."""
    return mask if mask is None or mask.shape[-1] == 1 else mask[..., start:stop]


def _sliced(logits: BoundLogits | None, rows: slice, cols: slice) -> BoundLogits | None:
    return None if logits is None else logits.sliced(rows, cols)


def _use_math(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    if q.device.type == "cpu":
        return False
    if q.device.type == "cuda":
        return q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or mask is not None
    return True


def _use_cuda_flash(q: torch.Tensor) -> bool:
    return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def _math_forward(q, k, v, causal, scale, mask):
    acc = accum_dtype(q.dtype)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(acc), k.to(acc)) * scale  # (B, H, Sq, Sk)
    if causal:
        sq, sk = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1), -torch.inf)
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf)
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Sq)
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0).unsqueeze(-1))
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.to(acc)).to(q.dtype), lse


def _math_backward(dout, q, k, v, out, lse, causal, scale, mask):
    acc = accum_dtype(q.dtype)
    q, k, v, dout, out = (t.to(acc) for t in (q, k, v, dout, out))
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if causal:
        sq, sk = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1), -torch.inf)
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf)
    probs = torch.exp(scores - lse.unsqueeze(-1))  # (B, H, Sq, Sk)
    dv = torch.einsum("bhqk,bhqd->bhkd", probs, dout)
    dprobs = torch.einsum("bhqd,bhkd->bhqk", dout, v)
    delta = (dout * out).sum(-1, keepdim=True)  # (B, H, Sq, 1)
    dscores = probs * (dprobs - delta) * scale
    dq = torch.einsum("bhqk,bhkd->bhqd", dscores, k)
    dk = torch.einsum("bhqk,bhqd->bhkd", dscores, q)
    return dq, dk, dv


def block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    mask: torch.Tensor | None = None,
    logits: BoundLogits | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over one K/V block, with the block's log-sum-exp.

    Args:
        q: Queries ``(B, H, S_q, D)``.
        k: Keys ``(B, H_kv, S_k, D)``.
        v: Values ``(B, H_kv, S_k, D)``.
        causal: Top-left causal mask inside the block (query ``i`` sees key ``j <= i``).
        scale: Softmax scale (usually ``D ** -0.5``).
        mask: Optional bool mask broadcastable to ``(B, H, S_q, S_k)``, True where visible; on any
            device (the ring's plans build masks on the CPU), copied to ``q``'s.
        logits: Soft-capping or a score function at the call's global positions, or ``None``.

    Returns:
        ``(out, lse)``: ``out`` ``(B, H, S_q, D)`` in ``q``'s dtype (0 for rows with no visible key)
        and ``lse`` ``(B, H, S_q)`` in ``accum_dtype(q.dtype)`` (``-inf`` for such rows).
    """
    sq, sk = q.shape[2], k.shape[2]
    if mask is not None and mask.device != q.device:  # plans build masks on the host
        mask = mask.to(q.device, non_blocking=True)
    if causal and sq != sk:  # see Note [Non-square causal calls]
        if sq < sk:  # keys past the last query are hidden from every row
            return block_forward(
                q, k[:, :, :sq], v[:, :, :sq], causal=True, scale=scale, mask=_cols(mask, 0, sq),
                logits=_sliced(logits, slice(None), slice(0, sq)),
            )  # fmt: skip
        a, b = slice(0, sk), slice(sk, sq)
        out_a, lse_a = block_forward(
            q[:, :, a], k, v, causal=True, scale=scale, mask=_rows(mask, 0, sk), logits=_sliced(logits, a, slice(None))
        )
        out_b, lse_b = block_forward(
            q[:, :, b],
            k,
            v,
            causal=False,
            scale=scale,
            mask=_rows(mask, sk, sq),
            logits=_sliced(logits, b, slice(None)),
        )
        return torch.cat([out_a, out_b], dim=2), torch.cat([lse_a, lse_b], dim=2)
    num_heads = q.shape[1]
    k, v = _expand_kv(k, num_heads), _expand_kv(v, num_heads)
    if logits is not None:
        return tiled_forward(q, k, v, causal=causal, scale=scale, mask=mask, logits=logits)
    if _use_math(q, mask):
        return _math_forward(q, k, v, causal, scale, mask)
    if q.device.type == "cpu":
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=_additive(mask, q.dtype), scale=scale
        )
    elif _use_cuda_flash(q):
        out, lse = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    else:
        out, lse = _aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)[:2]
        lse = lse[..., : q.shape[2]]
    lse = lse.to(accum_dtype(q.dtype)).contiguous()
    if mask is not None:  # the CPU kernel reports lse = 0 for rows that see nothing: make it -inf
        visible = mask.expand(*lse.shape, k.shape[2])
        if causal:  # a row may be hidden by the mask and the triangle together (square here)
            visible = visible & torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        lse = lse.masked_fill(~visible.any(-1), -torch.inf)
    return out, lse


def block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    mask: torch.Tensor | None = None,
    logits: BoundLogits | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block's contribution, given the FINAL output and log-sum-exp of the rows.

    With the final ``out`` and ``lse`` (merged over all blocks), the flash backward of a single block
    yields exactly that block's share of ``dq`` and its ``dk``/``dv``: the softmax probabilities it
    rebuilds are ``exp(s - lse_final)``, the globally normalised ones.

    Args:
        dout: Gradient of the output rows ``(B, H, S_q, D)``.
        q: Queries ``(B, H, S_q, D)``.
        k: Keys ``(B, H_kv, S_k, D)``.
        v: Values ``(B, H_kv, S_k, D)``.
        out: Final attention output of these rows ``(B, H, S_q, D)``, in ``q``'s dtype.
        lse: Final fp32 log-sum-exp of these rows ``(B, H, S_q)``; ``-inf`` allowed (rows seeing nothing).
        causal: As in :func:`block_forward`.
        scale: As in :func:`block_forward`.
        mask: As in :func:`block_forward`.
        logits: As in :func:`block_forward`.

    Returns:
        ``(dq, dk, dv)`` with the shapes and dtypes of ``q``, ``k``, ``v``.
    """
    sq, sk = q.shape[2], k.shape[2]
    if mask is not None and mask.device != q.device:  # plans build masks on the host
        mask = mask.to(q.device, non_blocking=True)
    if causal and sq != sk:  # see Note [Non-square causal calls]
        kw = dict(scale=scale)
        if sq < sk:
            dq, dk, dv = block_backward(
                dout, q, k[:, :, :sq], v[:, :, :sq], out, lse, causal=True, mask=_cols(mask, 0, sq),
                logits=_sliced(logits, slice(None), slice(0, sq)), **kw,
            )  # fmt: skip
            pad = (0, 0, 0, sk - sq)  # the hidden keys get gradient 0
            return dq, torch.nn.functional.pad(dk, pad), torch.nn.functional.pad(dv, pad)
        a, b = slice(0, sk), slice(sk, sq)
        dq_a, dk_a, dv_a = block_backward(
            dout[:, :, a], q[:, :, a], k, v, out[:, :, a], lse[:, :, a], causal=True, mask=_rows(mask, 0, sk),
            logits=_sliced(logits, a, slice(None)), **kw,
        )  # fmt: skip
        dq_b, dk_b, dv_b = block_backward(
            dout[:, :, b], q[:, :, b], k, v, out[:, :, b], lse[:, :, b], causal=False, mask=_rows(mask, sk, sq),
            logits=_sliced(logits, b, slice(None)), **kw,
        )  # fmt: skip
        return torch.cat([dq_a, dq_b], dim=2), dk_a + dk_b, dv_a + dv_b
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    k_exp, v_exp = _expand_kv(k, num_heads), _expand_kv(v, num_heads)
    # Rows that see nothing: any finite lse gives probabilities 0. The kernels want fp32 (fp64 for fp64).
    if logits is not None:
        grads = tiled_backward(dout, q, k_exp, v_exp, out, lse, causal=causal, scale=scale, mask=mask, logits=logits)
        dq, dk, dv = (g.to(q.dtype) for g in grads)
        return dq, _reduce_kv_grad(dk, num_kv_heads), _reduce_kv_grad(dv, num_kv_heads)
    lse = lse.nan_to_num(neginf=0.0).to(accum_dtype(q.dtype))
    if _use_math(q, mask):
        dq, dk, dv = (g.to(q.dtype) for g in _math_backward(dout, q, k_exp, v_exp, out, lse, causal, scale, mask))
    elif q.device.type == "cpu":
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k_exp, v_exp, out, lse, 0.0, causal, attn_mask=_additive(mask, q.dtype), scale=scale
        )
    elif _use_cuda_flash(q):
        sq, sk = q.shape[2], k.shape[2]
        zero = torch.zeros((), dtype=torch.long, device=q.device)  # RNG state: unused without dropout
        # cum_seq_q / cum_seq_k = None (an undefined tensor): the kernel takes the dense path. A defined
        # tensor, even an empty one, selects the variable-length kernel.
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
            dout, q, k_exp, v_exp, out, lse, None, None, sq, sk, 0.0, causal, zero, zero, scale=scale
        )
    else:
        zero = torch.zeros((), dtype=torch.long, device=q.device)
        # The forward's log-sum-exp is padded to a multiple of 32 queries; give the backward that layout.
        lse = torch.nn.functional.pad(lse, (0, -lse.shape[-1] % 32))
        dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k_exp, v_exp, None, out, lse, zero, zero, 0.0, [True, True, True, False], causal, scale=scale
        )
    return dq, _reduce_kv_grad(dk, num_kv_heads), _reduce_kv_grad(dv, num_kv_heads)
