"""A causal-LM batch cut into this rank's shard, and the loss that stays exact across dp x cp.

Models you did not write take ``input_ids``, ``position_ids`` and labels of the whole sequence. Under
context parallelism each rank holds a shard of every one of them, and three things go wrong silently
when they are cut naively (see Note [Loss across shards] in :mod:`cp_dtensor.nn.loss`):

* labels shifted per shard lose the target of each shard's last token (it lives on another rank),
  so labels are shifted on the WHOLE sequence first, then partitioned;
* positions must be GLOBAL (RoPE of token ``t`` uses ``t``, not its index in the shard);
* the loss must be the mean over the tokens of the GLOBAL batch, not a mean of per-rank means.

Packed documents arrive in Hugging Face's conventions: ``position_ids`` that restart at 0 where a
document starts, or ``cu_seqlens`` (cumulative lengths, as flash-attention's varlen API takes them).
Both become ``document_ids`` for the attention mask, and a target never crosses a document boundary.

Legend: ``B`` batch rows on this dp rank, ``L`` global sequence length, ``S`` local length ``L / P``,
``V`` vocab size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from cp_dtensor.mesh.group import ContextParallelGroup
from cp_dtensor.nn.chunked_loss import DEFAULT_LOSS_CHUNK_SIZE, chunked_cross_entropy_across_shards
from cp_dtensor.nn.loss import ShardedLoss, cross_entropy_across_shards, shift_labels
from cp_dtensor.positions.layout import num_chunks, padded_length
from cp_dtensor.positions.masks import document_ids_from_cu_seqlens

__all__ = [
    "IGNORE_INDEX",
    "ShardedBatch",
    "causal_lm_loss",
    "chunked_causal_lm_loss",
    "document_ids_from_position_ids",
    "shard_batch",
]

IGNORE_INDEX = -100


def document_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document ids ``(B, L)`` from position ids that restart where a document starts.

    A new document starts wherever a position is not its predecessor plus one, the rule
    transformers uses to detect packed sequences (``find_packed_sequence_indices``).

    Args:
        position_ids: ``(B, L)`` integer positions of whole sequences.

    Returns:
        ``(B, L)`` long ids ``0, 1, ...`` in order along each row.
    """
    starts_BL = torch.ones_like(position_ids, dtype=torch.bool)
    starts_BL[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts_BL.long().cumsum(1) - 1


@dataclass
class ShardedBatch:
    """This rank's shard of a causal-LM batch; every tensor is ``(B, S)``.

    Attributes:
        input_ids: Token ids.
        position_ids: GLOBAL positions (restarting per document for packed batches), for RoPE.
        shift_labels: Next-token targets made on the whole sequence, ``-100`` where none.
        document_ids: Packed-document ids for the attention mask, ``None`` for unpacked rows.
        cp_group: The group that cut the batch.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    shift_labels: torch.Tensor
    document_ids: torch.Tensor | None
    cp_group: ContextParallelGroup

    def model_inputs(self) -> dict:
        """Keyword arguments for a transformers model whose attention is ``cp_*`` (see :mod:`.transformers`).

        ``use_cache`` is off: a KV cache of a shard has no use in training and would hold memory.
        """
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "use_cache": False,
            "cp_group": self.cp_group,
            "cp_document_ids": self.document_ids,
        }

    def loss_inputs(self) -> dict:
        """Keyword arguments for transformers' own causal-LM loss, exact across dp x cp.

        ``shift_labels`` stops the model from shifting this shard's labels, and
        ``num_items_in_batch`` is the target count of the GLOBAL batch (one all-reduce over dp x
        cp), so the model's ``loss`` is this rank's share ``S_r / N``: its gradient summed over
        the ranks is the one-device gradient, and its value summed over the ranks is the loss.
        Transformers computes this loss in float32.
        """
        count = (self.shift_labels != IGNORE_INDEX).sum()
        dist.all_reduce(count, group=self.cp_group.replica_group)
        return {"labels": self.shift_labels, "shift_labels": self.shift_labels, "num_items_in_batch": count}


def _targets(
    input_ids: torch.Tensor, labels: torch.Tensor | None, document_ids: torch.Tensor | None, ignore_index: int
) -> torch.Tensor:
    """Next-token targets ``(B, L)`` of whole sequences, in transformers' ``labels`` convention.

    Shifting ``labels`` (rather than ``input_ids``) carries their ``ignore_index`` entries along; no
    target crosses a document boundary (:func:`cp_dtensor.shift_labels`).
    """
    labels_BL = input_ids if labels is None else labels
    return shift_labels(labels_BL, document_ids=document_ids, ignore_index=ignore_index)


def _pad(
    length: int,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    shift_labels: torch.Tensor,
    document_ids: torch.Tensor | None,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's ``(B, L)`` tensors padded to ``(B, length)``; padding is document ``-1`` with no target."""
    batch, seq_len = input_ids.shape
    extra = length - seq_len
    steps = torch.arange(1, extra + 1, device=position_ids.device)
    if document_ids is None:
        document_ids = torch.zeros_like(input_ids, dtype=torch.long)
    return (
        torch.cat([input_ids, input_ids.new_zeros(batch, extra)], dim=1),
        torch.cat([position_ids, position_ids[:, -1:] + steps], dim=1),
        torch.cat([shift_labels, shift_labels.new_full((batch, extra), ignore_index)], dim=1),
        torch.cat([document_ids, document_ids.new_full((batch, extra), -1)], dim=1),
    )


def _check_rows(name: str, x: torch.Tensor | None, shape: torch.Size) -> None:
    if x is not None and (not isinstance(x, torch.Tensor) or x.shape != shape):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of input_ids' shape {tuple(shape)}, got {got}.")


def shard_batch(
    input_ids: torch.Tensor,
    cp_group: ContextParallelGroup,
    *,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    pad: bool = False,
) -> ShardedBatch:
    """Cut this dp rank's rows of whole sequences into this cp rank's shard.

    Call it on every rank of the cp axis with the same rows (each dp rank its own rows).

    Args:
        input_ids: ``(B, L)`` token ids of whole sequences; ``L`` must split over the group's layout.
        cp_group: The group from :func:`~cp_dtensor.init_context_parallel_group`.
        labels: ``(B, L)`` in transformers' convention (the model shifts them: the target of token
            ``t`` is ``labels[t + 1]``); default ``input_ids``. Shifted here on the whole sequence.
        shift_labels: ``(B, L)`` targets already shifted (``shift_labels[t]`` is the target of token
            ``t``), e.g. :class:`~cp_dtensor.training.LongSequenceDataset`'s ``labels``; used as they are.
        position_ids: ``(B, L)`` positions; restarts (a position that is not its predecessor + 1)
            mark packed documents. Default ``0 .. L - 1``.
        cu_seqlens: Packed documents as cumulative lengths ``[0, l_0, l_0 + l_1, ..., L]`` (one row,
            ``B = 1``); positions then restart at every document.
        ignore_index: Target value of tokens without a target.
        pad: Append padding up to the next length the group's layout splits (a multiple of
            ``2 * cp_size`` under zigzag): padded tokens get document id ``-1`` (never attended, never
            attending), no target (``ignore_index``) and positions that continue the row's last one,
            so the loss and every real token's output equal those of the unpadded batch.

    Returns:
        The :class:`ShardedBatch`.

    Raises:
        ValueError: ``input_ids`` is not ``(B, L)``; a tensor argument has another shape; both
            ``labels`` and ``shift_labels``, or both ``position_ids`` and ``cu_seqlens``, are given;
            ``cu_seqlens`` with ``B > 1`` or not ending at ``L``; ``L`` does not split and ``pad``
            is off (the message names the multiple and ``pad=True``).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, seq_len) tensor of whole sequences, got {got}.")
    if labels is not None and shift_labels is not None:
        raise ValueError("Pass labels (to be shifted here) or shift_labels (already shifted), not both.")
    if position_ids is not None and cu_seqlens is not None:
        raise ValueError("Pass position_ids (restarting per document) or cu_seqlens, not both.")
    for name, x in (("labels", labels), ("shift_labels", shift_labels), ("position_ids", position_ids)):
        _check_rows(name, x, input_ids.shape)
    batch, seq_len = input_ids.shape
    if cu_seqlens is not None:
        document_ids = document_ids_from_cu_seqlens(cu_seqlens)[None]  # (1, L); validates cu_seqlens
        if batch != 1 or int(cu_seqlens[-1]) != seq_len:
            raise ValueError(
                f"cu_seqlens describes one packed row ending at seq_len={seq_len}; got batch={batch}, "
                f"cu_seqlens={cu_seqlens.tolist()}."
            )
        starts = cu_seqlens[:-1].repeat_interleave(cu_seqlens.diff())
        position_ids = (torch.arange(seq_len, device=input_ids.device) - starts)[None]
    elif position_ids is None:
        position_ids = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
        document_ids = None
    else:
        document_ids = document_ids_from_position_ids(position_ids)
        if bool((document_ids[:, -1] == 0).all()):
            document_ids = None  # one document per row: the plain causal mask
    if shift_labels is None:
        shift_labels = _targets(input_ids, labels, document_ids, ignore_index)
    padded = padded_length(seq_len, cp_group.size, cp_group.layout)
    if padded != seq_len:
        if not isinstance(pad, bool) or not pad:
            raise ValueError(
                f"input_ids has seq_len={seq_len}, which does not split over cp_size={cp_group.size} with the "
                f"{cp_group.layout!r} layout (it needs a multiple of {num_chunks(cp_group.size, cp_group.layout)}); "
                f"pass shard_batch(..., pad=True) to pad it to {padded} tokens (padding is never attended and "
                "has no target)."
            )
        input_ids, position_ids, shift_labels, document_ids = _pad(
            padded, input_ids, position_ids, shift_labels, document_ids, ignore_index
        )

    def part(x: torch.Tensor) -> torch.Tensor:
        return cp_group.partition_sequence(x, seq_dim=1)

    return ShardedBatch(
        input_ids=part(input_ids),
        position_ids=part(position_ids),
        shift_labels=part(shift_labels),
        document_ids=None if document_ids is None else part(document_ids),
        cp_group=cp_group,
    )


def causal_lm_loss(logits: torch.Tensor, batch: ShardedBatch, *, ignore_index: int = IGNORE_INDEX) -> ShardedLoss:
    """Mean next-token cross entropy over every target of the global batch (all dp and cp ranks).

    The value is the global loss on every rank (what one device reports); backward gives this rank's
    share, and summing parameter gradients over dp x cp (:func:`~cp_dtensor.apply_ddp`) gives the
    one-device gradient (Note [Loss across shards] in :mod:`cp_dtensor.nn.loss`). Transformers' own loss
    gets the same gradient with :meth:`ShardedBatch.loss_inputs`, but its value is then only this
    rank's share, and it computes in float32.

    Args:
        logits: This rank's logits ``(B, S, V)``.
        batch: The :class:`ShardedBatch` the logits came from.
        ignore_index: Target value that contributes nothing.

    Returns:
        The :class:`~cp_dtensor.ShardedLoss` (``loss``, ``num_tokens``, ``num_correct``).
    """
    return cross_entropy_across_shards(logits, batch.shift_labels, batch.cp_group, ignore_index=ignore_index)


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: torch.nn.Linear,
    batch: ShardedBatch,
    *,
    chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE,
    ignore_index: int = IGNORE_INDEX,
) -> ShardedLoss:
    """:func:`causal_lm_loss` from the final hidden states, never holding the ``(B, S, V)`` logits.

    The LM head and the loss run in tiles of ``chunk_size`` tokens, forward and backward (Note
    [Chunked LM-head loss] in :mod:`cp_dtensor.nn.chunked_loss`); same value and gradients. For a
    transformers model, the hidden states are the base model's output after its final norm
    (``model.model(**batch.model_inputs()).last_hidden_state``) and the head ``model.lm_head``.

    Args:
        hidden_states: This rank's final hidden states ``(B, S, E)``.
        lm_head: The ``Linear`` from ``E`` to ``V`` (its bias, if any, is used).
        batch: The :class:`ShardedBatch` the hidden states came from.
        chunk_size: Tokens per tile.
        ignore_index: Target value that contributes nothing.

    Returns:
        The :class:`~cp_dtensor.ShardedLoss` (``loss``, ``num_tokens``, ``num_correct``).
    """
    return chunked_cross_entropy_across_shards(
        hidden_states,
        lm_head.weight,
        batch.shift_labels,
        batch.cp_group,
        bias=lm_head.bias,
        chunk_size=chunk_size,
        ignore_index=ignore_index,
    )
