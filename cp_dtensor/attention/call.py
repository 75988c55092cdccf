"""One attention call: the keyword arguments every strategy takes, checked and resolved once.

:class:`AttentionOptions` is the one list of the keyword arguments common to all strategies (a new
common option is one field here); a strategy's own options are a dataclass of its own
(:attr:`~cp_dtensor.attention.registry.Strategy.Options`). :func:`split_options` sorts a call's
keywords into the two, and :func:`resolve_call` validates local shards and options into an
:class:`AttentionCall`, the one value a strategy plans from. The executor
(:mod:`cp_dtensor.attention.executor`) resolves once per call, eager or compiled, and the backward
reuses the forward's resolution.

Legend: ``B`` batch, ``H`` query heads, ``H_kv`` K/V heads, ``S`` local sequence length, ``L = P * S``
global (padded) length, ``D`` head dim, ``P`` cp ranks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from cp_dtensor.attention.checks import check_qkv, resolve_scale
from cp_dtensor.comm.counter import record_comm
from cp_dtensor.local.kernels import accum_dtype
from cp_dtensor.local.logits import LogitSpec
from cp_dtensor.positions import masks
from cp_dtensor.positions.masks import MaskSpec, check_window, positions

if TYPE_CHECKING:
    from cp_dtensor.mesh.group import ContextParallelGroup

__all__ = [
    "COMMON_OPTIONS",
    "TENSOR_OPTIONS",
    "AttentionCall",
    "AttentionOptions",
    "mask_spec",
    "resolve_call",
    "split_options",
]


@dataclass(frozen=True)
class AttentionOptions:
    """The keyword arguments every strategy takes (:func:`cp_dtensor.context_parallel_attention`).

    Attributes:
        causal: Causal masking on GLOBAL positions (the layout is taken into account).
        scale: Softmax scale; ``None`` for ``D ** -0.5``.
        document_ids: Packed documents: integer ids ``(B, L)`` in global order, or this rank's shard
            ``(B, S)`` (``cp_group.partition_sequence(ids, seq_dim=1)``), or a DTensor of either; a
            query sees only keys of its own document; negative ids are padding. See
            :mod:`cp_dtensor.positions.masks`.
        window: ``(left, right)``: a query at ``i`` sees keys in ``[i - left, i + right]``; ``None``
            for an unbounded side.
        seq_len: Number of real tokens when the sequence was padded (``partition_sequence(...,
            pad=True)``); later positions are masked out as keys and produce zero output.
        validate: First check that every rank passes the same shapes, dtypes and arguments (one
            all-gather); also on with ``CP_DTENSOR_VALIDATE=1``. See :mod:`cp_dtensor.attention.debug`.
        debug_check: Recompute this rank's output with fp64 attention of the gathered sequence and
            warn on mismatch (small runs only); also on with ``CP_DTENSOR_DEBUG_CHECK=1``.
        sinks: Attention sinks (GPT-OSS): one learned logit per query head ``(H,)`` in every row's
            softmax denominator, with no value; differentiable (its gradient is this rank's share,
            summed over ranks by the data-parallel reduction). See Note [Attention sinks] in
            :mod:`cp_dtensor.local.merge`.
        softcap: Logit soft-capping (Gemma 2): each logit ``s`` becomes ``softcap * tanh(s / softcap)``.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` in FlexAttention's form, on
            GLOBAL query and key positions and global heads, applied after ``softcap``; written with
            tensor operations (it is called on broadcast tensors of a tile). See Note [Score
            functions under context parallelism] in :mod:`cp_dtensor.local.logits`.
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` in FlexAttention's form, on GLOBAL
            positions, and-ed with the other mask rules; tiles it hides are skipped. It must not
            depend on ``h`` (every head shares the mask; use ``score_mod`` returning ``-inf`` for a
            mask per head).
    """

    causal: bool = False
    scale: float | None = None
    document_ids: torch.Tensor | None = None
    window: tuple[int | None, int | None] | None = None
    seq_len: int | None = None
    validate: bool = False
    debug_check: bool = False
    sinks: torch.Tensor | None = None
    softcap: float | None = None
    score_mod: Callable | None = None
    mask_mod: Callable | None = None

    def static(self) -> dict[str, Any]:
        """Every option but the tensors (``document_ids``, ``sinks``), as plain values."""
        return {name: getattr(self, name) for name in COMMON_OPTIONS if name not in TENSOR_OPTIONS}


COMMON_OPTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(AttentionOptions))
"""The names of :class:`AttentionOptions`' fields (read once: ``torch.compile`` traces the executor)."""

TENSOR_OPTIONS: tuple[str, ...] = ("document_ids", "sinks")
"""The options that are tensors: inputs of the compiled operator, not constants of its graph."""


def split_options(
    strategy_name: str, options_type: type, own_names: tuple[str, ...], kwargs: dict[str, Any]
) -> tuple[AttentionOptions, Any]:
    """Sort a call's keyword arguments into the common options and the strategy's own.

    Args:
        strategy_name: The strategy's name, for the message.
        options_type: The strategy's options dataclass.
        own_names: Its field names (:attr:`~cp_dtensor.attention.registry.Strategy.option_names`).
        kwargs: The keyword arguments of the call.

    Returns:
        ``(common, own)``: an :class:`AttentionOptions` and an ``options_type``.

    Raises:
        ValueError: A keyword neither takes, naming the valid ones.
    """
    unknown = [name for name in kwargs if name not in COMMON_OPTIONS and name not in own_names]
    if unknown:
        raise ValueError(
            f"Invalid keyword argument(s) {', '.join(map(repr, unknown))} for strategy {strategy_name!r}. "
            f"Must be among: {', '.join(sorted(COMMON_OPTIONS + own_names))}."
        )
    common = AttentionOptions(**{k: v for k, v in kwargs.items() if k in COMMON_OPTIONS})
    return common, options_type(**{k: v for k, v in kwargs.items() if k in own_names})


@dataclass(frozen=True)
class AttentionCall:
    """One attention call on this rank, after every check: local shards and resolved arguments.

    Attributes:
        q: Local queries ``(B, H, S, D)``.
        k: Local keys ``(B, H_kv, S, D)``.
        v: Local values ``(B, H_kv, S, D)``.
        cp_group: The context-parallel group.
        seq_len: The global (padded) sequence length ``L = P * S``.
        causal: Causal masking on global positions.
        scale: The softmax scale (resolved: ``D ** -0.5`` by default).
        mask: Causality, windows, documents, padding and ``mask_mod`` on global positions.
        options: The strategy's own options (its ``Options`` dataclass).
        logits: Soft-capping, ``score_mod`` and sinks (detached), or ``None`` for plain logits.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cp_group: ContextParallelGroup
    seq_len: int
    causal: bool
    scale: float
    mask: MaskSpec
    options: Any = None
    logits: LogitSpec | None = None


def resolve_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cp_group: ContextParallelGroup,
    common: AttentionOptions,
    options: Any = None,
) -> AttentionCall:
    """Validate local shards and the call's options into an :class:`AttentionCall`.

    Args:
        q: Local queries ``(B, H, S, D)``.
        k: Local keys ``(B, H_kv, S, D)``.
        v: Local values ``(B, H_kv, S, D)``.
        cp_group: The context-parallel group.
        common: The options every strategy takes; ``document_ids`` local (not a DTensor).
        options: The strategy's own options.

    Returns:
        The resolved call.

    Raises:
        ValueError: As :func:`cp_dtensor.ring_attention`.
    """
    check_qkv(q, k, v)
    mask = mask_spec(
        cp_group,
        q,
        causal=common.causal,
        document_ids=common.document_ids,
        window=common.window,
        seq_len=common.seq_len,
        mask_mod=common.mask_mod,
        num_heads=q.shape[1],
    )
    seq_len = q.shape[2] * cp_group.size
    cp_group.runs(seq_len)  # raises ValueError if the local length does not fit the layout
    scale = resolve_scale(common.scale, q.shape[-1])
    logits = logit_spec(q, sinks=common.sinks, softcap=common.softcap, score_mod=common.score_mod)
    return AttentionCall(q, k, v, cp_group, seq_len, common.causal, scale, mask, options, logits)


def logit_spec(
    q_local: torch.Tensor,
    *,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    score_mod: Callable | None = None,
) -> LogitSpec | None:
    """Validate the logit arguments of a call into a :class:`~cp_dtensor.local.logits.LogitSpec` (``None`` if none).

    Raises:
        ValueError: naming the bad argument and the expected form.
    """
    num_heads = q_local.shape[1]
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point() or tuple(sinks.shape) != (num_heads,):
            raise ValueError(
                f"sinks must be a floating-point tensor of shape ({num_heads},) (one logit per query head on this "
                f"rank), got {getattr(sinks, 'shape', sinks)!r}."
            )
        sinks = sinks.detach().to(q_local.device, accum_dtype(q_local.dtype))
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0 or softcap == float("inf")
    ):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}.")
    if score_mod is not None and not callable(score_mod):
        raise ValueError(
            f"score_mod must be None or a function (score, b, h, q_idx, kv_idx) -> score, got {score_mod!r}."
        )
    if sinks is None and softcap is None and score_mod is None:
        return None
    return LogitSpec(softcap=None if softcap is None else float(softcap), score_mod=score_mod, sinks=sinks)


def mask_spec(
    cp_group: ContextParallelGroup,
    q_local: torch.Tensor,
    *,
    causal: bool,
    document_ids: torch.Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    seq_len: int | None = None,
    mask_mod: Callable | None = None,
    num_heads: int = 1,
) -> MaskSpec:
    """Validate the mask arguments of an attention call and build its :class:`MaskSpec`.

    ``document_ids`` may be global ``(B, L)`` or this rank's shard ``(B, S_local)``, on any device; a
    shard is all-gathered over the cp axis once per call (``B * L`` integers, counted as
    ``"mask_gather"``). The spec holds its own CPU copy of the ids (plans are made on the host), so no
    later edit of the caller's tensor can reach it; tile plans are reused across calls with equal
    content (Note [Reusing tile plans across layers] in :mod:`cp_dtensor.positions.tiles`).

    Raises:
        ValueError: naming the bad argument and the expected form.
    """
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}.")
    batch, seq_local = q_local.shape[0], q_local.shape[2]
    total = seq_local * cp_group.size
    window = check_window(window)
    if seq_len is not None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 0 < seq_len <= total:
            raise ValueError(f"seq_len must be an int in [1, {total}] (the padded length), got {seq_len!r}.")
        if seq_len == total:
            seq_len = None
    tile = masks.DEFAULT_TILE  # read at call time: tests set small tiles
    if mask_mod is not None:
        masks.check_mask_mod(mask_mod, batch=batch, num_heads=num_heads, seq_len=total)
    extra = dict(mask_mod=mask_mod, batch=batch) if mask_mod is not None else {}
    if document_ids is None:
        return MaskSpec(causal=causal, window=window, seq_len=seq_len, tile=tile, **extra)
    if not isinstance(document_ids, torch.Tensor) or document_ids.is_floating_point() or document_ids.dim() != 2:
        raise ValueError(
            "document_ids must be an integer tensor (batch, seq), got "
            f"{getattr(document_ids, 'shape', document_ids)!r}."
        )
    if document_ids.shape[0] != batch or document_ids.shape[1] not in (seq_local, total):
        raise ValueError(
            f"document_ids has shape {tuple(document_ids.shape)}; expected ({batch}, {total}) in global order "
            f"or this rank's shard ({batch}, {seq_local})."
        )
    # Plans are arithmetic on the host (a GPU would sync at every tile's any()/all()): the ids live on
    # the CPU, and each mask goes to the device when its kernel call runs.
    if document_ids.shape[1] == total:
        ids = document_ids.detach().to("cpu", torch.int64, copy=True)
    else:  # a shard: gathered at every call (a collective is never skipped on some ranks only)
        # the collective runs on q's device
        ids = _gather_ids(cp_group, document_ids.to(q_local.device)).to("cpu", torch.int64)
    return MaskSpec(causal=causal, window=window, document_ids=ids, seq_len=seq_len, tile=tile, **extra)


def _gather_ids(cp_group: ContextParallelGroup, ids_local: torch.Tensor) -> torch.Tensor:
    """All-gather a ``(B, S_local)`` shard of ids into ``(B, L)`` global order."""
    if cp_group.size == 1:
        return ids_local
    ids_local = ids_local.to(torch.int64).contiguous()
    shards = [torch.empty_like(ids_local) for _ in range(cp_group.size)]
    dist.all_gather(shards, ids_local, group=cp_group.process_group)
    record_comm("mask_gather", ids_local.numel() * ids_local.element_size() * (cp_group.size - 1))
    seq_len = ids_local.shape[1] * cp_group.size
    full = torch.empty(ids_local.shape[0], seq_len, dtype=ids_local.dtype, device=ids_local.device)
    for rank, shard in enumerate(shards):
        full[:, positions(cp_group.runs(seq_len, rank)).to(full.device)] = shard
    return full
