"""``ContextParallelAttention``: a multi-head attention layer whose sequence is sharded over the cp axis.

The layer is ordinary everywhere except in the one place where tokens meet: the projections,
rotary embeddings and output projection act on the local tokens alone; the attention itself goes
through :func:`cp_dtensor.attention.api.context_parallel_attention`, which sees the whole sequence
(ring attention by default; any name in :data:`~cp_dtensor.attention.api.STRATEGIES`).

Parameters are plain replicated tensors, so a ``state_dict`` moves freely between a ``cp_size=1``
layer (the whole sequence on one device) and a sharded one, and gives the same outputs.

Legend: ``B`` batch, ``S`` local sequence length, ``E`` hidden size, ``H`` query heads, ``H_kv``
K/V heads, ``D`` head dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cp_dtensor.arguments import check_positive_int
from cp_dtensor.attention.api import context_parallel_attention, get_strategy
from cp_dtensor.mesh.group import ContextParallelGroup
from cp_dtensor.mesh.sharding import from_local_like, to_local_checked
from cp_dtensor.nn.rope import apply_rope, rope_cos_sin

__all__ = ["ContextParallelAttention"]


def _check_heads(hidden_size: int, num_heads: int, num_kv_heads: int) -> None:
    for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        check_positive_int(name, value)
    if hidden_size % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}.")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads} (GQA/MQA).")


class ContextParallelAttention(nn.Module):
    """Multi-head (GQA) self-attention over a sequence sharded on the cp axis, with RoPE.

    Examples:
        >>> cp_group = init_context_parallel_group(cp_size=4)  # doctest: +SKIP
        >>> attention = ContextParallelAttention(hidden_size=4096, num_heads=32, cp_group=cp_group)
        >>> out_local = attention(x_local)  # x_local = cp_group.partition_sequence(x, seq_dim=1)

    Args:
        hidden_size: ``E``, the model width.
        num_heads: ``H``; must divide ``E`` (head dim ``D = E // H``).
        cp_group: The group from :func:`~cp_dtensor.init_context_parallel_group`.
        causal: Causal masking on global positions.
        num_kv_heads: ``H_kv`` for grouped-query attention; default ``H``. Must divide ``H``.
        rope: Apply rotary embeddings at the tokens' GLOBAL positions.
        bias: Biases in the four projections.
        strategy: How attention is split over the cp axis: a name in
            :data:`~cp_dtensor.attention.api.STRATEGIES` (``"ring"``, ...).
        rope_base: RoPE base (theta).

    Raises:
        ValueError: A size is not a positive int, ``H`` does not divide ``E``, ``H_kv`` does not
            divide ``H``, ``D`` is odd with ``rope=True``, or ``strategy`` is unknown.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        cp_group: ContextParallelGroup,
        *,
        causal: bool = True,
        num_kv_heads: int | None = None,
        rope: bool = True,
        bias: bool = False,
        strategy: str = "ring",
        rope_base: float = 10_000.0,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _check_heads(hidden_size, num_heads, num_kv_heads)
        self.head_dim = hidden_size // num_heads
        if rope and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got hidden_size / num_heads = {self.head_dim}.")
        if strategy != "auto":  # "auto" decides per call shape (context_parallel_attention)
            get_strategy(strategy)  # fail early on a typo; looked up again at call time
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.cp_group, self.causal, self.rope, self.rope_base = cp_group, causal, rope, rope_base
        self.strategy = strategy
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, *, position_ids: torch.Tensor | None = None, **attn_kwargs: Any) -> torch.Tensor:
        """Attend this rank's tokens to the whole sequence.

        Args:
            x: Local hidden states ``(B, S, E)``, as ``cp_group.partition_sequence(x, seq_dim=1)``
                makes them; or a DTensor sharded ``Shard(1)`` on the cp mesh, in natural order
                (``distribute_tensor`` or ``cp_group.distribute_sequence(x, seq_dim=1)``): moved into the
                layout and the output back, one all-to-all each (q, k and v are not moved).
            position_ids: Global positions of the local tokens ``(S,)``; default
                ``cp_group.position_ids(S * P)``, right for any shard the group made.
            **attn_kwargs: Passed to the attention strategy (e.g. ``scale``, or the mask options of
                strategies that take them).

        Returns:
            ``(B, S, E)``: the local output, or a natural-order DTensor placed like ``x`` if ``x`` is one.

        Raises:
            ValueError: ``x`` is not ``(B, S, E)``, is a DTensor placed otherwise, or ``S * P`` does not
                fit the layout.
        """
        (x_local,), like = to_local_checked([x], self.cp_group, seq_dim=1)
        if x_local.dim() != 3 or x_local.shape[-1] != self.hidden_size:
            raise ValueError(
                f"x must be (batch, seq_local, hidden_size={self.hidden_size}), got shape {tuple(x_local.shape)}."
            )
        b, s, _ = x_local.shape
        # Head counts come from the projections' widths: under tensor parallelism (cp_dtensor.parallel.tensor_parallel)
        # each rank projects to its own H / tp query heads and K/V heads, and attends over those alone.
        q_BHSD = self.q_proj(x_local).view(b, s, -1, self.head_dim).transpose(1, 2)
        k_BHSD = self.k_proj(x_local).view(b, s, -1, self.head_dim).transpose(1, 2)
        v_BHSD = self.v_proj(x_local).view(b, s, -1, self.head_dim).transpose(1, 2)
        if self.rope:
            if position_ids is None:
                position_ids = self.cp_group.position_ids(s * self.cp_group.size, device=x_local.device)
            angle_dtype = torch.float64 if q_BHSD.dtype == torch.float64 else torch.float32
            cos, sin = rope_cos_sin(position_ids, self.head_dim, base=self.rope_base, dtype=angle_dtype)
            q_BHSD, k_BHSD = apply_rope(q_BHSD, cos, sin), apply_rope(k_BHSD, cos, sin)
        out_BHSD = context_parallel_attention(
            q_BHSD, k_BHSD, v_BHSD, self.cp_group, strategy=self.strategy, causal=self.causal, **attn_kwargs
        )
        out_BSE = self.o_proj(out_BHSD.transpose(1, 2).reshape(b, s, -1))
        return from_local_like(out_BSE, like)

    def extra_repr(self) -> str:
        """Sizes and options, shown by ``print(module)``."""
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"causal={self.causal}, rope={self.rope}, strategy={self.strategy!r}, cp_size={self.cp_group.size}"
        )
