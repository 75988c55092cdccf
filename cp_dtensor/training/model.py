"""``TransformerWithCP``: a small Llama-style decoder whose sequence is sharded over the cp axis.

Embedding, then ``num_layers`` pre-norm blocks (RMSNorm, :class:`~cp_dtensor.ContextParallelAttention`
with RoPE on global positions, RMSNorm, SwiGLU MLP), a final RMSNorm and the LM head. Only the
attention talks to other ranks; everything else is per token, so it runs on the local shard as is.

Memory options (Note [Activation checkpointing under CP]; Note [Chunked LM-head loss] in
:mod:`cp_dtensor.nn.chunked_loss`): ``ModelConfig.activation_checkpointing`` recomputes each block's
activations in the backward instead of keeping them, and ``ModelConfig.loss_chunk_size`` computes the
LM head and loss in token tiles so the ``(B, S, V)`` logits never exist. ``ModelConfig.mlp_tile_size`` runs
each block's MLP half (``mlp_norm`` and SwiGLU) over token tiles, recomputed per tile in backward, so its
``(B, S, I)`` intermediates exist for one tile at a time (Note [Sequence-tiled MLP] in
:mod:`cp_dtensor.nn.tiled_mlp`).

Note [Activation checkpointing under CP]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Each decoder block runs under :func:`torch.utils.checkpoint.checkpoint` (non-reentrant), in one of
three modes:

* ``"none"``: every activation is kept for the backward.
* ``"full"``: only the block's input is kept; the backward re-runs the whole block first, attention
  included, so the ring (Ulysses, all-gather) collectives run a second time. That is correct because
  every rank holds the same graph and the autograd engine walks it in the same order on every rank
  (blocks last to first, one at a time), so the recomputed collectives pair up exactly as the
  forward's did; the tp all-reduces inside a block recompute likewise. Cost: one more forward of
  every block, communication included.
* ``"selective"``: the attention half is kept as is, so its saved ``out``/``lse`` (and ``q, k, v``)
  are reused and no attention collective ever re-runs; the MLP half (``mlp_norm`` and SwiGLU, whose
  three ``(B, S, I)`` intermediates and their product are the largest activations of a block) is
  checkpointed and recomputed, which costs about ``3 E I`` of the block's ``~4 E^2 + 3 E I`` matmul
  flops per token and no communication on the cp axis. We wrap the MLP region rather than use a
  ``create_selective_checkpoint_contexts`` policy that saves the attention op's outputs: such a
  policy sees aten ops, while our attention is an ``autograd.Function`` whose Python forward issues
  the collectives, so a recompute would still run them. Once the attention is one registered op the
  policy form becomes possible and would also skip recomputing the projections.

Under FSDP2, apply checkpointing per block (:func:`apply_activation_checkpointing`) before
``fully_shard``: the checkpoint lives inside each block's ``forward``, so FSDP's hooks stay outside it.
Gradients are identical to ``"none"`` (same ops on the same values; the recompute is bitwise equal).

Legend: ``B`` batch, ``S`` local sequence length, ``E`` hidden size, ``V`` vocab size, ``I`` SwiGLU width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel
from torch.utils.checkpoint import checkpoint

from cp_dtensor.mesh.group import ContextParallelGroup
from cp_dtensor.nn.chunked_loss import chunked_cross_entropy_across_shards
from cp_dtensor.nn.loss import ShardedLoss, cross_entropy_across_shards, labels_from_local_ids
from cp_dtensor.nn.module import ContextParallelAttention
from cp_dtensor.nn.tiled_mlp import tiled_mlp
from cp_dtensor.parallel.tensor_parallel import ReplicateParallel, attention_plan, swiglu_plan

__all__ = ["AC_MODES", "ModelConfig", "TransformerWithCP", "apply_activation_checkpointing"]

AC_MODES = ("none", "full", "selective")
"""Activation checkpointing modes of the decoder blocks (Note [Activation checkpointing under CP])."""


@dataclass
class ModelConfig:
    """Shape of a :class:`TransformerWithCP`. The defaults fit :class:`~cp_dtensor.training.LongSequenceDataset`."""

    vocab_size: int = 256
    """Number of token ids."""
    hidden_size: int = 128
    """Model width ``E``."""
    num_layers: int = 2
    """Decoder blocks."""
    num_heads: int = 8
    """Query heads; must divide ``hidden_size``."""
    num_kv_heads: int | None = None
    """K/V heads (GQA); default ``num_heads``."""
    intermediate_size: int | None = None
    """SwiGLU width; default ``8/3 * hidden_size`` rounded up to a multiple of 32 (Llama)."""
    tie_embeddings: bool = False
    """Share the embedding matrix with the LM head."""
    rope_base: float = 500_000.0
    """RoPE base (theta); Llama 3's, whose slow frequencies let content match across long distances."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    causal: bool = True
    """Causal attention (a decoder)."""
    strategy: str = "ring"
    """Attention strategy over the cp axis, a name in :data:`~cp_dtensor.STRATEGIES`."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of weights."""
    activation_checkpointing: str = "none"
    """``"none"``, ``"full"`` or ``"selective"`` (Note [Activation checkpointing under CP])."""
    loss_chunk_size: int | None = None
    """Tokens per tile of the LM head + loss (Note [Chunked LM-head loss]); ``None``: whole logits.

    Off by default: the tiles' recompute costs one more LM-head matmul per step (docs/memory.md measures it)."""
    mlp_tile_size: int | None = None
    """Tokens per tile of the sequence-tiled MLP half of each block (Note [Sequence-tiled MLP]); ``None``: untiled.

    Off by default: it recomputes the MLP in backward, as ``activation_checkpointing="selective"`` does
    (which it makes redundant: with both, the MLP is recomputed once, tiled)."""

    @property
    def mlp_size(self) -> int:
        """The SwiGLU width actually used."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        return -(-(8 * self.hidden_size // 3) // 32) * 32


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``: the Llama MLP.

    Args:
        hidden_size: ``E``.
        intermediate_size: Inner width.
    """

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, S, E) -> (B, S, E)``, per token."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    Args:
        config: The model shape.
        cp_group: The context-parallel group of the attention.
    """

    def __init__(self, config: ModelConfig, cp_group: ContextParallelGroup) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = ContextParallelAttention(
            config.hidden_size,
            config.num_heads,
            cp_group,
            causal=config.causal,
            num_kv_heads=config.num_kv_heads,
            strategy=config.strategy,
            rope_base=config.rope_base,
        )
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.mlp_size)
        self.checkpointing = "none"
        """One of :data:`AC_MODES`, set by :func:`apply_activation_checkpointing`."""
        self.mlp_tile_size = config.mlp_tile_size
        """Tokens per tile of the MLP half, or ``None`` (Note [Sequence-tiled MLP])."""

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, **attn_kwargs: Any) -> torch.Tensor:
        """``(B, S, E) -> (B, S, E)`` on the local shard; ``position_ids`` ``(S,)`` are global."""
        if self.checkpointing == "full" and torch.is_grad_enabled():  # see Note [Activation checkpointing under CP]
            return checkpoint(self._block, x, position_ids, use_reentrant=False, **attn_kwargs)
        return self._block(x, position_ids, **attn_kwargs)

    def _block(self, x: torch.Tensor, position_ids: torch.Tensor, **attn_kwargs: Any) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), position_ids=position_ids, **attn_kwargs)
        if self.mlp_tile_size is not None:  # recomputed per tile in backward: no checkpoint needed
            params = [*self.mlp_norm.parameters(), *self.mlp.parameters()]
            return x + tiled_mlp(self._mlp, x, params, tile_size=self.mlp_tile_size)
        if self.checkpointing == "selective" and torch.is_grad_enabled():
            return x + checkpoint(self._mlp, x, use_reentrant=False)
        return x + self._mlp(x)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.mlp_norm(x))


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Set the activation checkpointing of every decoder block in ``model`` (in place).

    Call it before ``fully_shard`` (FSDP2) or DDP; it composes with tensor parallelism. See
    Note [Activation checkpointing under CP] for what each mode keeps and recomputes.

    Args:
        model: A :class:`TransformerWithCP` (or any module holding its decoder blocks).
        mode: One of :data:`AC_MODES`.

    Returns:
        ``model``.

    Raises:
        ValueError: ``mode`` is not in :data:`AC_MODES`.
    """
    if mode not in AC_MODES:
        valid = ", ".join(map(repr, AC_MODES))
        raise ValueError(f"Invalid activation checkpointing mode {mode!r}. Must be one of: {valid}.")
    for module in model.modules():
        if isinstance(module, DecoderBlock):
            module.checkpointing = mode
    return model


class TransformerWithCP(nn.Module):
    """A Llama-style decoder LM trained on sequences sharded over the cp axis.

    Examples:
        >>> model = TransformerWithCP(cp_group=cp_group)  # doctest: +SKIP
        >>> loss = model(cp_group.partition_sequence(batch["input_ids"], seq_dim=1))
        >>> loss.backward()

    Args:
        config: The shape; default :class:`ModelConfig`'s defaults.
        cp_group: The group from :func:`~cp_dtensor.init_context_parallel_group`.

    Raises:
        ValueError: From :class:`~cp_dtensor.ContextParallelAttention` for inconsistent head counts
            or an unknown strategy.
    """

    def __init__(self, config: ModelConfig | None = None, *, cp_group: ContextParallelGroup) -> None:
        super().__init__()
        self.config = config = config or ModelConfig()
        tile = config.mlp_tile_size
        if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 1):
            raise ValueError(f"mlp_tile_size must be None or a positive integer, got {tile!r}.")
        self.cp_group = cp_group
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(config, cp_group) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        apply_activation_checkpointing(self, config.activation_checkpointing)
        chunk = config.loss_chunk_size
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"loss_chunk_size must be None or a positive integer, got {config.loss_chunk_size!r}.")

    def tp_plan(self, tp_size: int) -> dict[str, ParallelStyle]:
        """This model's tensor-parallel plan (:func:`~cp_dtensor.parallelize_for_tp` calls it).

        See Note [Tensor parallelism inside context parallelism] in
        :mod:`cp_dtensor.parallel.tensor_parallel`.

        Raises:
            ValueError: The heads do not split over ``tp_size``.
        """
        attn = attention_plan(self.layers[0].attn, tp_size, "layers.*.attn.") if len(self.layers) else {}
        return {
            "embed": RowwiseParallel(input_layouts=Replicate()),  # vocab-parallel: rows of the table
            "layers.*.attn_norm": ReplicateParallel(),
            **attn,
            "layers.*.mlp_norm": ReplicateParallel(),
            **swiglu_plan("layers.*.mlp"),
            "norm": ReplicateParallel(),
            "lm_head": ColwiseParallel(output_layouts=Replicate()),  # whole logits for the loss
        }

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, ``init_std``) weights; residual output projections scaled by ``1/sqrt(2 * layers)``."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "w2.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.config.num_layers))
            else:
                p.normal_(0.0, std)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        return_logits: bool = False,
        return_sharded_loss: bool = False,
        position_ids: torch.Tensor | None = None,
        **attn_kwargs: Any,
    ) -> torch.Tensor | ShardedLoss:
        """The global-mean loss of this step (or the local logits).

        Args:
            input_ids: This rank's shard ``(B, S)`` of the token ids
                (``cp_group.partition_sequence(ids, seq_dim=1)``).
            labels: This rank's shard ``(B, S)`` of the labels, shifted on the FULL sequence
                (:func:`~cp_dtensor.nn.loss.shift_labels`) and partitioned like ``input_ids``; default
                next-token labels of ``input_ids`` (one all-gather of the ids over cp), which never
                cross a boundary of the ``document_ids`` given in ``attn_kwargs``.
            return_logits: Return the local logits instead of the loss.
            return_sharded_loss: Return the whole :class:`~cp_dtensor.ShardedLoss` (with the token
                and correct counts) instead of its ``loss``.
            position_ids: Global positions ``(S,)`` of the local tokens; default from ``cp_group``.
            **attn_kwargs: Passed to every attention call.

        Returns:
            The scalar loss, averaged over every supervised token of the global batch (all cp and dp
            ranks; see Note [Loss across shards]); or logits ``(B, S, V)`` with ``return_logits``.
            With ``config.loss_chunk_size`` the logits are made tile by tile for the loss
            (Note [Chunked LM-head loss]); the value and gradients are the same.
        """
        s = input_ids.shape[1]
        if position_ids is None:
            position_ids = self.cp_group.position_ids(s * self.cp_group.size, device=input_ids.device)
        h_BSE = self.embed(input_ids)
        for layer in self.layers:
            h_BSE = layer(h_BSE, position_ids, **attn_kwargs)
        h_BSE = self.norm(h_BSE)
        if return_logits:
            return self.lm_head(h_BSE)
        if labels is None:
            labels = labels_from_local_ids(input_ids, self.cp_group, document_ids=attn_kwargs.get("document_ids"))
        if self.config.loss_chunk_size is None:
            out = cross_entropy_across_shards(self.lm_head(h_BSE), labels, self.cp_group)
        else:
            out = chunked_cross_entropy_across_shards(
                h_BSE,
                self.lm_head.weight,
                labels,
                self.cp_group,
                bias=self.lm_head.bias,
                chunk_size=self.config.loss_chunk_size,
            )
        return out if return_sharded_loss else out.loss
