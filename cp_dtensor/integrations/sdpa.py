"""Context parallelism for a plain PyTorch model that calls ``F.scaled_dot_product_attention``.

Inside ``with context_parallel_sdpa(cp_group):`` every call to
``torch.nn.functional.scaled_dot_product_attention`` is answered by a context-parallel strategy on
this rank's shards, through a ``TorchFunctionMode`` (PyTorch's own ``context_parallel()``
intercepts the same function by replacing it while it is active). The model's code does not
change; its inputs do: feed it this rank's shard with GLOBAL positions
(:func:`~cp_dtensor.integrations.batch.shard_batch`). Backward needs no mode: the strategies'
autograd functions carry their own plans. Keep the forward inside the ``with``.

Each SDPA argument is honoured or rejected: ``is_causal``, ``scale`` and ``enable_gqa`` are honoured;
``dropout_p > 0`` and an ``attn_mask`` raise ValueError (a mask of the whole sequence cannot be
sharded: give ``document_ids`` and ``window`` to the context manager instead).

Under ``torch.compile(fullgraph=True)`` the mode may sit either outside the compiled model
(``with context_parallel_sdpa(g): compiled_model(x)``) or inside the compiled function: dynamo
traces the mode's ``__torch_function__`` and the attention becomes one ``cp_dtensor::attention``
node in the graph, with the same output and gradients as eager. Dynamo guards on the active mode:
a new ``context_parallel_sdpa`` with the same settings reuses the graph; calling the compiled model
with no mode (plain SDPA) or another strategy compiles a second graph.

Legend: ``B`` batch, ``H`` query heads, ``H_kv`` K/V heads, ``S`` local sequence length, ``D`` head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from cp_dtensor.attention.api import get_strategy
from cp_dtensor.mesh.group import ContextParallelGroup

__all__ = ["context_parallel_sdpa"]


class context_parallel_sdpa(TorchFunctionMode):  # noqa: N801 (used like a function: `with context_parallel_sdpa(g):`)
    """Route ``F.scaled_dot_product_attention`` through context-parallel attention while active.

    Examples:
        >>> with context_parallel_sdpa(cp_group, strategy="ring"):  # doctest: +SKIP
        ...     logits = model(batch.input_ids, batch.position_ids)

    Args:
        cp_group: The group from :func:`~cp_dtensor.init_context_parallel_group`.
        strategy: A name in :data:`cp_dtensor.STRATEGIES`.
        document_ids: Packed documents, this rank's shard ``(B, S)`` (``ShardedBatch.document_ids``)
            or ``None``.
        window: ``(left, right)`` sliding window on global positions, or ``None``.

    Raises:
        ValueError: An unknown ``strategy``; inside the block, an SDPA call with ``attn_mask`` or
            ``dropout_p > 0``, or ``H != H_kv`` without ``enable_gqa=True`` (as SDPA itself).
    """

    def __init__(
        self,
        cp_group: ContextParallelGroup,
        *,
        strategy: str = "ring",
        document_ids: torch.Tensor | None = None,
        window: tuple[int | None, int | None] | None = None,
    ) -> None:
        super().__init__()
        self.attention = get_strategy(strategy)
        self.cp_group, self.document_ids, self.window = cp_group, document_ids, window

    def __torch_function__(self, func, types, args=(), kwargs=None):
        """Answer SDPA calls; pass every other call through (the mode is off while this runs)."""
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        return self._attend(*args, **kwargs)

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError(
                "scaled_dot_product_attention got attn_mask under context_parallel_sdpa: a mask of the whole "
                "sequence cannot be sharded; pass document_ids= and window= to context_parallel_sdpa instead."
            )
        if dropout_p:
            raise ValueError(f"scaled_dot_product_attention got dropout_p={dropout_p}: not supported; use 0.0.")
        if key.shape[-3] != query.shape[-3] and not enable_gqa:
            raise ValueError(
                f"query has {query.shape[-3]} heads and key {key.shape[-3]}: pass enable_gqa=True (as SDPA requires)."
            )
        return self.attention(
            query,
            key,
            value,
            self.cp_group,
            causal=is_causal,
            scale=scale,
            document_ids=self.document_ids,
            window=self.window,
        )
