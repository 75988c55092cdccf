"""Context-parallel attention for Hugging Face transformers models, through ``AttentionInterface``.

:func:`register` adds one attention implementation per strategy (``"cp_ring"``, ``"cp_ulysses"``,
``"cp_allgather"``, ``"cp_hybrid"``) to transformers' public registries, so any model that routes its
attention through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2, Mistral and most decoder models)
runs with context parallelism when built with ``attn_implementation="cp_ring"``::

    register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="cp_ring")
    batch = shard_batch(input_ids, cp_group)               # cp_dtensor.integrations.batch
    logits = model(**batch.model_inputs()).logits          # this rank's shard
    loss = causal_lm_loss(logits, batch).loss              # the global token mean

The model never sees the whole sequence: the batch carries the group and the packed-document ids
(``cp_group=``, ``cp_document_ids=``), which transformers passes through to the attention call.

Note [What transformers passes to an attention function]
--------------------------------------------------------
The call is ``fn(module, query (B, H, S, D), key (B, H_kv, S, D), value, attention_mask, **kwargs)``
and must return ``(output (B, S, H, D), attention_weights or None)``. Each argument is honoured or
rejected, never dropped:

* ``scaling`` -> ``scale``; ``sliding_window=w`` (transformers: a query sees itself and the ``w - 1``
  keys before it) -> ``window=(w - 1, 0)``; ``is_causal`` or ``module.is_causal`` -> ``causal``;
  ``softcap`` (Gemma 2's logit soft-capping) -> ``softcap``; ``s_aux`` (GPT-OSS's attention sinks,
  one learned logit per head) -> ``sinks``, whose gradient flows to the model's parameter.
* ``dropout > 0``, ``output_attentions=True``, flash-attention varlen arguments (``cu_seq_lens_q``
  ...) and a 4-D ``attention_mask``: ValueError.
  A 2-D padding mask is rejected earlier, when the model builds its masks (our mask function);
  express padding and packing as documents instead (:func:`~cp_dtensor.integrations.batch.shard_batch`).
* Arguments that belong to the model, not the attention (``position_ids``, already used by RoPE;
  ``use_cache``; the loss's ``shift_labels`` / ``num_items_in_batch``) are accepted. Any other
  argument raises, naming it, so a new transformers feature cannot be silently ignored.

Legend: ``B`` batch, ``H`` query heads, ``H_kv`` K/V heads, ``S`` local sequence length, ``D`` head dim.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from cp_dtensor.attention.api import STRATEGIES, context_parallel_attention
from cp_dtensor.mesh.group import ContextParallelGroup

__all__ = ["ATTENTION_NAMES", "cp_attention_forward", "register"]

PREFIX = "cp_"
ATTENTION_NAMES: dict[str, str] = {PREFIX + name: name for name in STRATEGIES}
"""``attn_implementation`` name -> strategy, e.g. ``"cp_ring" -> "ring"``."""

REJECTED = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
ACCEPTED = (
    "position_ids",
    "use_cache",
    "shift_labels",
    "num_items_in_batch",
    "output_hidden_states",
    "return_dict",
    "output_router_logits",  # a mixture-of-experts model's (GPT-OSS), passed through every layer
)
MIN_TRANSFORMERS = "5.24"  # the version the tests ran on


def _reject(name: str, value: object, why: str) -> None:
    raise ValueError(f"Context-parallel attention got {name}={value!r}: {why}")


def _check_model_arguments(attention_mask, dropout, output_attentions, kwargs) -> None:
    """Raise for every argument we cannot honour (see Note [What transformers passes to an attention function])."""
    if attention_mask is not None:
        _reject(
            "attention_mask",
            type(attention_mask).__name__,
            "express padding and packing as document ids "
            "(shard_batch(position_ids=... or cu_seqlens=...)); a mask of the whole sequence cannot be sharded.",
        )
    if dropout:
        _reject("dropout", dropout, "attention dropout is not supported; set config.attention_dropout=0.0.")
    if output_attentions:
        _reject("output_attentions", output_attentions, "the attention weights are never materialised.")
    for name in REJECTED:
        if kwargs.get(name) is not None:
            _reject(
                name,
                "<tensor>",
                "flash-attention varlen inputs are not supported; pass packed documents to shard_batch instead.",
            )
    unknown = sorted(set(kwargs) - set(REJECTED) - set(ACCEPTED))
    if unknown:
        raise ValueError(
            f"Context-parallel attention does not know the argument(s) {unknown}; accepted: "
            f"{', '.join(ACCEPTED)}. Refusing to ignore them."
        )


def cp_attention_forward(
    strategy: str,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    cp_group: ContextParallelGroup | None = None,
    cp_document_ids: torch.Tensor | None = None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    output_attentions: bool = False,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Exact attention over the sharded sequence, in transformers' attention-function convention.

    Args:
        strategy: A name in :data:`cp_dtensor.STRATEGIES` (bound by :func:`register`).
        module: The model's attention module (``module.is_causal`` is read when ``is_causal`` is None).
        query: Local queries ``(B, H, S, D)`` (RoPE already applied with global positions).
        key: Local keys ``(B, H_kv, S, D)``.
        value: Local values ``(B, H_kv, S, D)``.
        attention_mask: Must be ``None`` (see the Note in this module).
        cp_group: The group, passed to the model call by ``ShardedBatch.model_inputs()``.
        cp_document_ids: This rank's packed-document ids ``(B, S)`` or ``None``.
        dropout: Must be 0.
        scaling: Softmax scale; default ``D ** -0.5``.
        sliding_window: Transformers' window: the query and the ``sliding_window - 1`` keys before it.
        softcap: Logit soft-capping ``softcap * tanh(s / softcap)`` (Gemma 2), or ``None``.
        is_causal: Causal masking; default ``module.is_causal`` (True if absent).
        output_attentions: Must be False.
        s_aux: Attention sinks, one logit per query head ``(H,)`` (GPT-OSS), or ``None``.
        **kwargs: Model arguments the attention does not need (see the Note); anything else raises.

    Returns:
        ``(output (B, S, H, D), None)``.

    Raises:
        ValueError: ``cp_group`` missing, an argument we cannot honour, a KV cache longer than the
            queries, or what the strategy raises (heads, shapes).
    """
    _check_model_arguments(attention_mask, dropout, output_attentions, kwargs)
    if not isinstance(cp_group, ContextParallelGroup):
        raise ValueError(
            f"Context-parallel attention needs cp_group=, got {cp_group!r}: call the model with "
            "**shard_batch(...).model_inputs()."
        )
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"keys have {key.shape[2]} positions but queries {query.shape[2]}: a KV cache (generation) is not "
            "supported under context parallelism; call the model with use_cache=False."
        )
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if sliding_window is not None and not causal:
        _reject("sliding_window", sliding_window, "a window is supported on causal attention only.")
    window = None if sliding_window is None else (sliding_window - 1, 0)
    out_BHSD = context_parallel_attention(
        query,
        key,
        value,
        cp_group,
        strategy=strategy,
        causal=causal,
        scale=scaling,
        document_ids=cp_document_ids,
        window=window,
        softcap=softcap,
        sinks=s_aux,
    )
    return out_BHSD.transpose(1, 2).contiguous(), None


@functools.cache
def _routes_attention(model_type: str | None) -> bool:
    """Whether the transformers model of ``model_type`` calls its attention through ``AttentionInterface``.

    transformers marks such models with ``_supports_attention_backend``; a model without it (Bloom,
    MPT, ...) computes attention itself and would never call ours.
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    model_class = getattr(transformers, MODEL_MAPPING_NAMES.get(model_type, ""), None)
    return bool(getattr(model_class, "_supports_attention_backend", False))


def _no_mask(*args, attention_mask: torch.Tensor | None = None, config: Any = None, **kwargs) -> None:
    """The mask function registered with each name: the masks are made inside the strategy, on global positions.

    transformers calls it when a model builds its masks, before any layer runs: the place to refuse a
    model that would drop the mask and attend on its own shard alone.

    Raises:
        ValueError: The model does not route attention through ``AttentionInterface`` (it would compute
            attention itself, without our masks or the other ranks' keys), or a 2-D padding
            ``attention_mask`` hides a token (express padding as documents).
    """
    model_type = getattr(config, "model_type", None)
    if not _routes_attention(model_type):
        raise ValueError(
            f"The transformers model of type {model_type!r} does not call its attention through transformers' "
            "AttentionInterface (its class lacks _supports_attention_backend), so a context-parallel "
            "attn_implementation would never run: it would attend within each rank's shard, without the mask. "
            "Use a model that does (Llama, Qwen2, Mistral, Gemma, ... build it with attn_implementation="
            "'cp_ring'), or call F.scaled_dot_product_attention under cp_dtensor.integrations.context_parallel_sdpa."
        )
    if attention_mask is not None and not bool(attention_mask.all()):
        _reject(
            "attention_mask",
            "<padding mask>",
            "express padding and packing as document ids (shard_batch(position_ids=... or cu_seqlens=...)).",
        )
    return None


def register() -> list[str]:
    """Register every strategy with transformers' attention and mask registries (idempotent).

    Returns:
        The names to pass as ``attn_implementation``: ``["cp_ring", "cp_ulysses", "cp_allgather",
        "cp_hybrid"]`` (hybrid needs ``init_context_parallel_group(..., ulysses_size=u)``).

    Raises:
        ImportError: transformers is not installed (``pip install 'cp-dtensor[hf]'``).
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as err:
        raise ImportError(
            f"cp_dtensor.integrations.transformers needs transformers>={MIN_TRANSFORMERS}: pip install 'cp-dtensor[hf]'"
        ) from err
    for name, strategy in ATTENTION_NAMES.items():
        AttentionInterface.register(name, functools.partial(cp_attention_forward, strategy))
        AttentionMaskInterface.register(name, _no_mask)
    return list(ATTENTION_NAMES)
