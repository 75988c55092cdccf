"""Masks beyond causal, on global positions: packed documents, sliding windows and padding.

A mask answers one question: may the query at global position ``i`` of batch row ``b`` attend the
key at global position ``j``? It may when every rule that is switched on allows it:

* ``causal``: ``j <= i``;
* ``window = (left, right)``: ``i - left <= j <= i + right`` (``None`` leaves that side unbounded;
  ``(w - 1, 0)`` with ``causal`` is the usual sliding window of ``w`` tokens);
* ``document_ids`` (B, L): ``doc[b, i] == doc[b, j]`` and ``doc[b, i] >= 0`` (several documents
  packed into one row; a negative id marks padding, which neither attends nor is attended to);
* ``seq_len``: ``i < seq_len`` and ``j < seq_len`` (the positions from ``seq_len`` on are padding).

Every rule is a function of GLOBAL positions, so the same `AttentionMask.visible` builds the dense
mask of the whole sequence (the oracle's, `AttentionMask.dense`) and the visible pairs of any block
a rank meets in the ring, whatever the layout scattered the positions to. A query row with no
visible key at all gets output 0 and gradient 0.

Shape legend: B batch, L sequence length, S_q / S_k number of query / key positions asked about.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AttentionMask", "document_ids_from_lengths", "make_mask"]


@dataclass(frozen=True)
class AttentionMask:
    """Which (query, key) pairs are visible, as a function of their global positions."""

    causal: bool = False
    """Keys after the query are hidden."""
    window: tuple[int | None, int | None] | None = None
    """``(left, right)``: a query at ``i`` sees keys in ``[i - left, i + right]``; ``None`` for no window."""
    document_ids: torch.Tensor | None = None
    """Integer ids, shape (B, L), in global token order; a query sees only keys of its own document,
    and a negative id (padding) sees nothing. ``None`` for one document per row."""
    seq_len: int | None = None
    """Number of real tokens; positions ``>= seq_len`` are padding. ``None`` when nothing is padded."""

    def visible(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
        """The visible pairs between some queries and some keys.

        Args:
            q_positions: Global positions of the queries, shape (S_q,).
            k_positions: Global positions of the keys, shape (S_k,).

        Returns:
            Bool, True where the query may attend the key: shape (S_q, S_k), or (B, S_q, S_k) when
            ``document_ids`` is set (documents differ between batch rows).
        """
        i = q_positions[:, None]  # (S_q, 1)
        j = k_positions[None, :]  # (1, S_k)
        allowed = torch.ones(len(q_positions), len(k_positions), dtype=torch.bool, device=q_positions.device)
        if self.causal:
            allowed &= j <= i
        if self.window is not None:
            left, right = self.window
            if left is not None:
                allowed &= j >= i - left
            if right is not None:
                allowed &= j <= i + right
        if self.seq_len is not None:
            allowed &= (i < self.seq_len) & (j < self.seq_len)
        if self.document_ids is None:
            return allowed  # (S_q, S_k)
        q_doc = self.document_ids[:, q_positions][:, :, None]  # (B, S_q, 1)
        k_doc = self.document_ids[:, k_positions][:, None, :]  # (B, 1, S_k)
        return allowed & (q_doc == k_doc) & (q_doc >= 0)  # (B, S_q, S_k)

    def dense(self, num_tokens: int) -> torch.Tensor:
        """The mask of the whole sequence, for `cp_dtensor.reference.attention.full_attention`'s ``mask=``.

        Args:
            num_tokens: Sequence length L.

        Returns:
            Bool, shape (L, L), or (B, 1, L, L) when ``document_ids`` is set; both broadcast to
            (B, H, L, L).
        """
        device = self.document_ids.device if self.document_ids is not None else None
        positions = torch.arange(num_tokens, device=device)  # (L,)
        allowed = self.visible(positions, positions)
        return allowed if allowed.dim() == 2 else allowed[:, None]


def make_mask(
    batch: int,
    num_tokens: int,
    *,
    causal: bool,
    window: tuple[int | None, int | None] | None = None,
    document_ids: torch.Tensor | None = None,
    seq_len: int | None = None,
) -> AttentionMask:
    """Check the mask arguments of an attention call and build its `AttentionMask`.

    Args:
        batch: Batch size B of the queries.
        num_tokens: Sequence length L (padding included).
        causal: Causal masking.
        window: ``None`` or ``(left, right)``, each a non-negative int or ``None``.
        document_ids: ``None`` or an integer tensor of shape (B, L) in global token order.
        seq_len: ``None`` or the number of real tokens, in ``[1, L]``.

    Returns:
        The mask.

    Raises:
        ValueError: Naming the bad argument and the form it must take.
    """
    if window is not None:
        sides_ok = isinstance(window, (tuple, list)) and len(window) == 2
        if not sides_ok or not all(
            side is None or (isinstance(side, int) and not isinstance(side, bool) and side >= 0) for side in window
        ):
            raise ValueError(
                f"window must be None or (left, right) with non-negative ints or None, got {window!r}; "
                "e.g. (127, 0) with causal=True lets a query see itself and the 127 tokens before it"
            )
        window = (window[0], window[1])
    if document_ids is not None:
        if not isinstance(document_ids, torch.Tensor) or document_ids.is_floating_point() or document_ids.is_complex():
            raise ValueError(
                f"document_ids must be an integer tensor of shape ({batch}, {num_tokens}), got {document_ids!r}"
            )
        if tuple(document_ids.shape) != (batch, num_tokens):
            raise ValueError(
                f"document_ids has shape {tuple(document_ids.shape)}; expected ({batch}, {num_tokens}) "
                "(batch, sequence), in global token order"
            )
    if seq_len is not None and (
        isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= num_tokens
    ):
        raise ValueError(f"seq_len must be None or an int in [1, {num_tokens}] (the real tokens), got {seq_len!r}")
    return AttentionMask(causal=causal, window=window, document_ids=document_ids, seq_len=seq_len)


def document_ids_from_lengths(lengths: list[int], num_tokens: int | None = None) -> torch.Tensor:
    """Document ids of one packed row: ``[0] * lengths[0] + [1] * lengths[1] + ...``, then padding.

    Args:
        lengths: Length of each document, in packing order; each at least 1.
        num_tokens: Length of the row; the tokens after the documents get id ``-1`` (padding).
            Defaults to ``sum(lengths)``.

    Returns:
        int64, shape (num_tokens,).

    Raises:
        ValueError: If a length is below 1, or the documents do not fit in ``num_tokens``.
    """
    if any(n < 1 for n in lengths):
        raise ValueError(f"document lengths must be >= 1, got {lengths}")
    total = sum(lengths)
    num_tokens = total if num_tokens is None else num_tokens
    if num_tokens < total:
        raise ValueError(f"documents of total length {total} do not fit in num_tokens={num_tokens}")
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
    return torch.cat([ids, ids.new_full((num_tokens - total,), -1)])
