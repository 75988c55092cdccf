"""One switch over the ways to split attention across the cp axis.

Every strategy has the signature of :func:`cp_dtensor.ring_attention`:
``fn(q, k, v, cp_group, *, causal=False, scale=None) -> Tensor`` on local shards (or DTensors).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cp_dtensor.allgather import allgather_kv_attention
from cp_dtensor.hybrid import hybrid_attention
from cp_dtensor.ring import ring_attention
from cp_dtensor.ulysses import ulysses_attention

__all__ = ["STRATEGIES", "get_strategy", "context_parallel_attention"]

STRATEGIES: dict[str, Callable[..., torch.Tensor]] = {
    "ring": ring_attention,
    "ulysses": ulysses_attention,
    "allgather": allgather_kv_attention,
    "hybrid": hybrid_attention,  # needs init_context_parallel_group(..., ulysses_size=u)
}
"""Strategy name -> its attention function; every one takes the arguments of ``ring_attention``."""


def get_strategy(name: str) -> Callable[..., torch.Tensor]:
    """The attention function registered as ``name``.

    Raises:
        ValueError: ``name`` is not one of :data:`STRATEGIES`.
    """
    if name not in STRATEGIES:
        raise ValueError(f"Invalid strategy {name!r}. Must be one of: {', '.join(map(repr, STRATEGIES))}.")
    return STRATEGIES[name]


def context_parallel_attention(q, k, v, cp_group, *, strategy: str = "ring", **kwargs) -> torch.Tensor:
    """Exact attention over the sharded sequence with the chosen ``strategy``; see :data:`STRATEGIES`."""
    return get_strategy(strategy)(q, k, v, cp_group, **kwargs)
