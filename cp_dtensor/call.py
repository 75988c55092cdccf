"""One attention call: its arguments checked and resolved, and the one wrapper every strategy runs.

Every strategy (:func:`~cp_dtensor.ring_attention`, :func:`~cp_dtensor.ulysses_attention`,
:func:`~cp_dtensor.allgather_kv_attention`, :func:`~cp_dtensor.hybrid_attention`) is
:func:`run_strategy` with its own ``attend``: a function of the resolved :class:`AttentionCall` that
plans and applies the strategy on local shards. The wrapper does the rest, in this order: check the
group (and, with ``validate``, that all ranks agree), unwrap DTensors, validate the tensors and mask
arguments into an :class:`AttentionCall`, ``attend``, re-check the output (``debug_check``), wrap
the output like the inputs. A new option common to all strategies is one field here. Under
``torch.compile`` the same call is one custom operator instead (Note [Attention as a custom op] in
:mod:`cp_dtensor.ops`).

Legend: ``B`` batch, ``H`` query heads, ``H_kv`` K/V heads, ``S`` local sequence length, ``L = P * S``
global (padded) length, ``D`` head dim, ``P`` cp ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from cp_dtensor import masks, ops
from cp_dtensor.comm import record_comm
from cp_dtensor.debug import check_call, recheck_output
from cp_dtensor.group import ContextParallelGroup
from cp_dtensor.masks import MaskSpec, check_window, positions
from cp_dtensor.sharding import from_local_like, global_document_ids, to_local_checked
from cp_dtensor.validate import check_qkv, resolve_scale

__all__ = ["AttentionCall", "mask_spec", "resolve_call", "run_strategy"]


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
        mask: Causality, windows, documents and padding on global positions.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cp_group: ContextParallelGroup
    seq_len: int
    causal: bool
    scale: float
    mask: MaskSpec


def resolve_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cp_group: ContextParallelGroup,
    *,
    causal: bool,
    scale: float | None,
    **mask_args: Any,
) -> AttentionCall:
    """Validate local shards and arguments like :func:`cp_dtensor.ring_attention` into an :class:`AttentionCall`.

    Args:
        q: Local queries ``(B, H, S, D)``.
        k: Local keys ``(B, H_kv, S, D)``.
        v: Local values ``(B, H_kv, S, D)``.
        cp_group: The context-parallel group.
        causal: Causal masking.
        scale: Softmax scale or ``None``.
        **mask_args: ``document_ids``, ``window``, ``seq_len`` (see :func:`mask_spec`).

    Returns:
        The resolved call.

    Raises:
        ValueError: As :func:`cp_dtensor.ring_attention`.
    """
    check_qkv(q, k, v)
    mask = mask_spec(cp_group, q, causal=causal, **mask_args)
    seq_len = q.shape[2] * cp_group.size
    cp_group.runs(seq_len)  # raises ValueError if the local length does not fit the layout
    return AttentionCall(q, k, v, cp_group, seq_len, causal, resolve_scale(scale, q.shape[-1]), mask)


def run_strategy(
    name: str,
    attend: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cp_group: ContextParallelGroup,
    *,
    causal: bool,
    scale: float | None,
    document_ids: torch.Tensor | None,
    window: tuple[int | None, int | None] | None,
    seq_len: int | None,
    validate: bool,
    debug_check: bool,
    **options: Any,
) -> torch.Tensor:
    """Run one strategy: check, unwrap, validate, ``attend(call, **options)``, re-check, wrap.

    Args:
        name: The strategy's public name, for messages.
        attend: Plans and applies the strategy on an :class:`AttentionCall`; returns the local output
            ``(B, H, S, D)``. Raises ``ValueError`` for options it cannot take.
        q: Queries, local or DTensor, as the strategy's caller passed them.
        k: Keys, likewise.
        v: Values, likewise.
        cp_group: The context-parallel group.
        causal: As :func:`cp_dtensor.ring_attention`.
        scale: As :func:`cp_dtensor.ring_attention`.
        document_ids: As :func:`cp_dtensor.ring_attention`.
        window: As :func:`cp_dtensor.ring_attention`.
        seq_len: As :func:`cp_dtensor.ring_attention`.
        validate: As :func:`cp_dtensor.ring_attention`.
        debug_check: As :func:`cp_dtensor.ring_attention`.
        **options: The strategy's own options, passed to ``attend`` (and compared across ranks).

    Returns:
        The local output (a DTensor if the inputs were).

    Under ``torch.compile`` the whole call, checks included, is ``torch.ops.cp_dtensor.attention``
    (:func:`cp_dtensor.ops.attention`); DTensor inputs are then a ``ValueError``.
    """
    if torch.compiler.is_compiling():  # one opaque node per call: see Note [Attention as a custom op]
        return ops.attention(
            name,
            q,
            k,
            v,
            cp_group,
            causal=causal,
            scale=scale,
            document_ids=document_ids,
            window=window,
            seq_len=seq_len,
            validate=validate,
            debug_check=debug_check,
            **options,
        )
    mask_args = {"document_ids": document_ids, "window": window, "seq_len": seq_len}
    check_call(
        name,
        cp_group,
        q,
        k,
        v,
        validate=validate,
        debug_check=debug_check,
        causal=causal,
        scale=scale,
        **options,
        **mask_args,
    )
    (q_l, k_l, v_l), like = to_local_checked((q, k, v), cp_group, seq_dim=2)
    mask_args["document_ids"] = global_document_ids(document_ids, cp_group)
    call = resolve_call(q_l, k_l, v_l, cp_group, causal=causal, scale=scale, **mask_args)
    out = attend(call, **options)
    recheck_output(name, out, q_l, k_l, v_l, cp_group, debug_check=debug_check, scale=call.scale, mask=call.mask)
    return from_local_like(out, like)


def mask_spec(
    cp_group,
    q_local: torch.Tensor,
    *,
    causal: bool,
    document_ids: torch.Tensor | None = None,
    window=None,
    seq_len: int | None = None,
) -> MaskSpec:
    """Validate the mask arguments of an attention call and build its :class:`MaskSpec`.

    ``document_ids`` may be global ``(B, L)`` or this rank's shard ``(B, S_local)``, on any device; a
    shard is all-gathered over the cp axis once per call (``B * L`` integers, counted as
    ``"mask_gather"``). The spec holds its own CPU copy of the ids (plans are made on the host), so no
    later edit of the caller's tensor can reach it; tile plans are reused across calls with equal
    content (Note [Reusing tile plans across layers] in :mod:`cp_dtensor.tiles`).

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
    if document_ids is None:
        return MaskSpec(causal=causal, window=window, seq_len=seq_len, tile=tile)
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
        ids = document_ids.detach().to("cpu", copy=True)
    else:  # a shard: gathered at every call (a collective is never skipped on some ranks only)
        ids = _gather_ids(cp_group, document_ids.to(q_local.device)).to("cpu")  # the collective runs on q's device
    return MaskSpec(causal=causal, window=window, document_ids=ids, seq_len=seq_len, tile=tile)


def _gather_ids(cp_group, ids_local: torch.Tensor) -> torch.Tensor:
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
