"""The language-model loss when the sequence is sharded over cp and the batch over dp.

Two things differ from one device, and both are easy to get wrong:

* **Shift on the global sequence.** The label of token ``t`` is token ``t + 1``. The last token of a
  shard (of each run, under zigzag) has its label on ANOTHER rank, so labels are made from the full
  sequence and then partitioned like the inputs (:func:`shift_labels`, then
  ``cp_group.partition_sequence``), never by shifting a local shard.
* **Mean over the global batch.** See Note [Loss across shards].

Note [Loss across shards]
~~~~~~~~~~~~~~~~~~~~~~~~~
One device computes ``loss = sum_i ce_i / N`` over the ``N`` supervised tokens of the global batch.
Rank ``r`` holds the tokens ``T_r``, with ``n_r`` supervised ones and partial sum ``S_r``; ranks
hold different numbers of supervised tokens (the answers of a recall task sit on one shard), so the
mean of per-rank means is NOT the loss. Instead each rank all-reduces ``(S_r, n_r)`` over dp x cp
(one tiny collective) and returns::

    loss_r = (S_r / N - stopgrad(S_r / N)) + stopgrad(sum_s S_s / N)

Its value is the global loss on every rank (what one device reports); its gradient is ``dS_r / N``,
this rank's share. Summing the parameter gradients over every dp x cp rank (see
:mod:`cp_dtensor.parallel.grad_sync`) gives exactly ``d(sum_s S_s / N)``: the one-device gradient. The
gradient through the activations is also right: ``S_r`` depends on other ranks' tokens only through
attention, whose backward already carries the gradient across the ring.

Legend: ``B`` batch, ``S`` local sequence length, ``L`` global sequence length, ``V`` vocab size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from cp_dtensor.mesh.group import ContextParallelGroup

__all__ = [
    "IGNORE_INDEX",
    "ShardedLoss",
    "shift_labels",
    "labels_from_local_ids",
    "cross_entropy_across_shards",
    "global_mean_loss",
]

IGNORE_INDEX = -100
"""Label of a position without a target, skipped by the loss (PyTorch's ``cross_entropy`` default)."""


def shift_labels(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    *,
    document_ids: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Next-token labels of FULL sequences (call before partitioning).

    With packed documents, the last token of a document has no target: its next token starts
    another document, which a document-masked model cannot see and must not be asked to predict.

    Args:
        input_ids: ``(B, L)`` token ids of whole sequences.
        loss_mask: Optional ``(B, L)`` bool, True where a token is a prediction target; default all.
        document_ids: Optional ``(B, L)`` integer document of each token (negative: padding), as the
            attention's ``document_ids``: a token whose next token is in another document, and a
            padding token, get ``ignore_index``.
        ignore_index: Label of positions without a target (the last one, and masked targets).

    Returns:
        ``(B, L)`` long: ``labels[:, t] = input_ids[:, t + 1]`` where ``loss_mask[:, t + 1]`` and
        tokens ``t`` and ``t + 1`` are in the same document, else ``ignore_index``.

    Raises:
        ValueError: ``document_ids`` is not an integer tensor of ``input_ids``'s shape.
    """
    labels_BL = torch.full_like(input_ids, ignore_index)
    labels_BL[:, :-1] = input_ids[:, 1:]
    if loss_mask is not None:
        labels_BL[:, :-1].masked_fill_(~loss_mask[:, 1:].bool(), ignore_index)
    if document_ids is not None:
        if (
            not isinstance(document_ids, torch.Tensor)
            or document_ids.is_floating_point()
            or (document_ids.shape != input_ids.shape)
        ):
            raise ValueError(
                f"document_ids must be an integer tensor of input_ids's shape {tuple(input_ids.shape)}, got "
                f"{getattr(document_ids, 'shape', document_ids)!r}."
            )
        docs_BL = document_ids.to(input_ids.device)
        crosses_BL = (docs_BL[:, 1:] != docs_BL[:, :-1]) | (docs_BL[:, :-1] < 0)
        labels_BL[:, :-1].masked_fill_(crosses_BL, ignore_index)
    return labels_BL


def labels_from_local_ids(
    input_ids: torch.Tensor, cp_group: ContextParallelGroup, *, document_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token labels of this rank's shard, from the shards alone (one all-gather of the ids).

    Args:
        input_ids: This rank's shard ``(B, S)`` of the token ids.
        cp_group: The group that partitioned them.
        document_ids: Optional packed-document ids, as the attention takes them: global ``(B, L)``,
            this rank's shard ``(B, S)`` or a ``Shard(1)`` DTensor (both gathered too); labels never
            cross a document boundary (see :func:`shift_labels`).

    Returns:
        ``(B, S)``: this rank's shard of :func:`shift_labels` of the full sequences.
    """
    full_BL = cp_group.gather_sequence(input_ids, seq_dim=1)
    if document_ids is not None and (isinstance(document_ids, DTensor) or document_ids.shape[-1] != full_BL.shape[1]):
        document_ids = cp_group.gather_sequence(document_ids, seq_dim=1)
    return cp_group.partition_sequence(shift_labels(full_BL, document_ids=document_ids), seq_dim=1)


@dataclass
class ShardedLoss:
    """The loss of one step and the counts behind it, the same on every rank.

    The counts stay a tensor until read, so that a compiled model returns this without a host sync
    (``torch.compile(fullgraph=True)`` of a model with its loss).

    Attributes:
        loss: Scalar mean cross entropy over the global batch; backward gives this rank's share
            of the gradient (see Note [Loss across shards]).
        counts: ``(2,)`` float64: supervised tokens and correct predictions in the global batch.
    """

    loss: torch.Tensor
    counts: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Supervised tokens in the global batch (``N``)."""
        return int(self.counts[0])

    @property
    def num_correct(self) -> int:
        """Of those, how many the argmax of the logits predicts."""
        return int(self.counts[1])

    @property
    def accuracy(self) -> float:
        """``num_correct / num_tokens`` (0 when there is nothing to predict)."""
        return self.num_correct / max(self.num_tokens, 1)


def cross_entropy_across_shards(
    logits: torch.Tensor, labels: torch.Tensor, cp_group: ContextParallelGroup, *, ignore_index: int = IGNORE_INDEX
) -> ShardedLoss:
    """Mean cross entropy over every supervised token of the global batch (all cp and dp ranks).

    Args:
        logits: This rank's logits ``(B, S, V)``.
        labels: This rank's labels ``(B, S)``, partitioned like the inputs after :func:`shift_labels`.
        cp_group: The group; the counts are summed over its whole dp x cp mesh.
        ignore_index: Label value that contributes nothing.

    Returns:
        The :class:`ShardedLoss`; ``loss`` equals the single-device loss on the global batch.
    """
    logits_BSV = logits if logits.dtype == torch.float64 else logits.float()
    valid_BS = labels != ignore_index
    local_sum = F.cross_entropy(logits_BSV.flatten(0, 1), labels.flatten(), ignore_index=ignore_index, reduction="sum")
    num_correct = ((logits_BSV.detach().argmax(-1) == labels) & valid_BS).sum()
    return global_mean_loss(local_sum, valid_BS.sum(), num_correct, cp_group)


def global_mean_loss(
    local_sum: torch.Tensor, num_valid: torch.Tensor, num_correct: torch.Tensor, cp_group: ContextParallelGroup
) -> ShardedLoss:
    """The global mean from this rank's partial sums: one all-reduce over dp x cp (Note [Loss across shards]).

    Args:
        local_sum: Scalar sum of this rank's per-token losses, with its autograd graph.
        num_valid: Scalar count of this rank's supervised tokens.
        num_correct: Scalar count of those the model predicts.
        cp_group: The group; the counts are summed over its whole dp x cp mesh.

    Returns:
        The :class:`ShardedLoss`; ``loss`` equals the single-device loss on the global batch.
    """
    stats = torch.stack([local_sum.detach().double(), num_valid.double(), num_correct.double()])
    # A functional all-reduce and no .item(): the loss stays traceable by torch.compile (fullgraph).
    stats = funcol.all_reduce(stats, "sum", cp_group.replica_group)  # see Note [Loss across shards]
    denom = stats[1].clamp(min=1.0)
    share = local_sum / denom.to(local_sum.dtype)
    global_mean = (stats[0] / denom).to(local_sum.dtype)
    loss = (share - share.detach()) + global_mean  # value: the global loss; gradient: our share
    return ShardedLoss(loss=loss, counts=stats[1:])
