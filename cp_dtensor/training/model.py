"""``TransformerWithCP``: a small Llama-style decoder whose sequence is sharded over the cp axis.

Embedding, then ``num_layers`` pre-norm blocks (RMSNorm, :class:`~cp_dtensor.ContextParallelAttention`
with RoPE on global positions, RMSNorm, SwiGLU MLP), a final RMSNorm and the LM head. Only the
attention talks to other ranks; everything else is per token, so it runs on the local shard as is.

Legend: ``B`` batch, ``S`` local sequence length, ``E`` hidden size, ``V`` vocab size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cp_dtensor.group import ContextParallelGroup
from cp_dtensor.loss import cross_entropy_across_shards, labels_from_local_ids
from cp_dtensor.module import ContextParallelAttention

__all__ = ["ModelConfig", "TransformerWithCP"]


@dataclass
class ModelConfig:
    """Shape of a :class:`TransformerWithCP`. The defaults fit :class:`~cp_dtensor.LongSequenceDataset`."""

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
            config.hidden_size, config.num_heads, cp_group, causal=config.causal,
            num_kv_heads=config.num_kv_heads, strategy=config.strategy, rope_base=config.rope_base,
        )
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.mlp_size)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, **attn_kwargs: Any) -> torch.Tensor:
        """``(B, S, E) -> (B, S, E)`` on the local shard; ``position_ids`` ``(S,)`` are global."""
        x = x + self.attn(self.attn_norm(x), position_ids=position_ids, **attn_kwargs)
        return x + self.mlp(self.mlp_norm(x))


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
        self.cp_group = cp_group
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(config, cp_group) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

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
        position_ids: torch.Tensor | None = None,
        **attn_kwargs: Any,
    ) -> torch.Tensor:
        """The global-mean loss of this step (or the local logits).

        Args:
            input_ids: This rank's shard ``(B, S)`` of the token ids
                (``cp_group.partition_sequence(ids, seq_dim=1)``).
            labels: This rank's shard ``(B, S)`` of the labels, shifted on the FULL sequence
                (:func:`~cp_dtensor.loss.shift_labels`) and partitioned like ``input_ids``; default
                next-token labels of ``input_ids`` (one all-gather of the ids over cp), which never
                cross a boundary of the ``document_ids`` given in ``attn_kwargs``.
            return_logits: Return the local logits instead of the loss.
            position_ids: Global positions ``(S,)`` of the local tokens; default from ``cp_group``.
            **attn_kwargs: Passed to every attention call.

        Returns:
            The scalar loss, averaged over every supervised token of the global batch (all cp and dp
            ranks; see Note [Loss across shards]); or logits ``(B, S, V)`` with ``return_logits``.
        """
        s = input_ids.shape[1]
        if position_ids is None:
            position_ids = self.cp_group.position_ids(s * self.cp_group.size, device=input_ids.device)
        h_BSE = self.embed(input_ids)
        for layer in self.layers:
            h_BSE = layer(h_BSE, position_ids, **attn_kwargs)
        logits_BSV = self.lm_head(self.norm(h_BSE))
        if return_logits:
            return logits_BSV
        if labels is None:
            labels = labels_from_local_ids(input_ids, self.cp_group, document_ids=attn_kwargs.get("document_ids"))
        return cross_entropy_across_shards(logits_BSV, labels, self.cp_group).loss
