"""Every strategy as one PyTorch custom operator, so that ``torch.compile`` sees an attention call as one node.

Note [Attention as a custom op]
-------------------------------
A strategy's forward posts point-to-point sends (ring) or collectives (Ulysses, all-gather) between
its kernel calls, and plans its tiles on the host from the mask. Dynamo cannot trace that
(``isend``/``irecv`` are "P2P compilation disabled"), and should not: the schedule is data-dependent
host logic, not tensor math. So under ``torch.compile`` :func:`~cp_dtensor.call.run_strategy` calls
``torch.ops.cp_dtensor.attention`` instead, an opaque operator (``torch.library.custom_op``) whose
Python body runs the same local forward as eager (:func:`cp_dtensor.ring.ring_forward` and its
siblings), with

- a fake implementation that gives the output shapes from the arguments alone (no communication),
  so the compiler can plan the rest of the graph around it;
- ``register_autograd`` with a second operator, ``cp_dtensor::attention_backward``, that runs the
  strategy's backward from what the forward returned: the output and its log-sum-exp, and for the
  head-exchanging strategies (Ulysses, hybrid) the head-frame tensors their ring saw.

What is not a tensor cannot be an operator argument, except numbers, bools and strings. Each is
passed as such: the strategy's name, ``causal``, ``scale``, ``window``, ``seq_len``, the layout's
name and the group's :attr:`~cp_dtensor.ContextParallelGroup.key`, a string under which every
group registers itself when it is made (:meth:`~cp_dtensor.ContextParallelGroup.from_key`). They are
constants of the traced program: the compiled graph guards on them, and a second step with new data
of the same shapes runs the same graph, with no recompilation. ``document_ids`` is a tensor input,
so new documents are new data, not a new graph; the operator builds the mask and its tile plans
from it at run time, on the host, exactly as eager does.

The whole call runs inside the operator: the checks of :func:`~cp_dtensor.call.resolve_call` (a
``ValueError`` is raised when the compiled step runs), ``validate`` and ``debug_check``. Not
supported under compile, with a ``ValueError`` saying so: DTensor inputs (pass local shards, as
:class:`~cp_dtensor.training.TransformerWithCP` does) and a
:class:`~cp_dtensor.layout.DocumentZigzag` layout (its segments change with every batch; use the
default zigzag layout with ``document_ids``).

Eager calls keep their autograd functions (the same local forward and backward), so eager
behaviour, communication and numerics do not depend on this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from cp_dtensor.group import ContextParallelGroup
from cp_dtensor.masks import check_window

__all__ = ["attention", "LocalStrategy"]


@dataclass(frozen=True)
class LocalStrategy:
    """A strategy on local shards, in four functions the custom operators call.

    Attributes:
        prepare: ``(call, **options) -> state``: plans the call (raises ``ValueError`` for bad options).
        forward: ``(q, k, v, state) -> (out, lse, saved)``: ``saved`` a tuple of tensors the backward
            needs besides the inputs, the output and ``lse`` (may be empty).
        backward: ``(dout, q, k, v, out, lse, saved, state) -> (dq, dk, dv)``.
        fake: ``(q, k, v, state) -> (lse, saved)``: empty tensors of the forward's shapes and dtypes.
    """

    prepare: Callable[..., Any]
    forward: Callable[..., tuple]
    backward: Callable[..., tuple]
    fake: Callable[..., tuple]


def _local(name: str) -> LocalStrategy:
    from cp_dtensor import allgather, hybrid, ring, ulysses  # they import this module (through call.py)
    from cp_dtensor.kernels import accum_dtype

    def in_place_fake(q, k, v, state):  # out and lse in the frame of the local queries
        return q.new_empty(q.shape[:3], dtype=accum_dtype(q.dtype)), ()

    def heads_fake(q, k, v, state):
        exchange, _ = state
        acc = accum_dtype(q.dtype)
        if exchange._is_identity():
            return q.new_empty(q.shape[:3], dtype=acc), ()
        n, (b, h, s, d) = exchange.size, q.shape
        h_kv = k.shape[1] * ulysses.kv_replication(k.shape[1], n)
        q_h, kv_h = q.new_empty(b, h // n, n * s, d), k.new_empty(b, h_kv // n, n * s, d)
        return q.new_empty(b, h // n, n * s, dtype=acc), (q_h, kv_h, torch.empty_like(kv_h), torch.empty_like(q_h))

    def ring_prepare(call):
        return ring.make_plan(call.cp_group, call.q.shape[2], call.causal, call.scale, call.mask)

    heads = {
        "forward": lambda q, k, v, state: ulysses.heads_forward(q, k, v, *state),
        "backward": lambda dout, q, k, v, out, lse, saved, state: ulysses.heads_backward(
            dout, q, k, v, out, lse, saved, *state
        ),
        "fake": heads_fake,
    }
    return {
        "ring_attention": LocalStrategy(
            ring_prepare,
            lambda q, k, v, plan: (*ring.ring_forward(q, k, v, plan), ()),
            lambda dout, q, k, v, out, lse, saved, plan: ring.ring_backward(dout, q, k, v, out, lse, plan),
            in_place_fake,
        ),
        "allgather_kv_attention": LocalStrategy(
            allgather._make_plan,
            lambda q, k, v, plan: (*allgather.allgather_forward(q, k, v, plan), ()),
            lambda dout, q, k, v, out, lse, saved, plan: allgather.allgather_backward(dout, q, k, v, out, lse, plan),
            in_place_fake,
        ),
        "ulysses_attention": LocalStrategy(ulysses._make_plan, **heads),
        "hybrid_attention": LocalStrategy(hybrid._make_plan, **heads),
    }[name]


def _window(window: list[int] | None) -> tuple[int | None, int | None] | None:
    return None if window is None else tuple(None if w < 0 else w for w in window)


def _call(q, k, v, document_ids, name, group, layout, causal, scale, window, seq_len):
    from cp_dtensor.call import resolve_call
    from cp_dtensor.sharding import global_document_ids

    cp_group = ContextParallelGroup.from_key(group).with_layout(layout)
    ids = global_document_ids(document_ids, cp_group)
    mask_args = {"document_ids": ids, "window": _window(window), "seq_len": seq_len}
    return resolve_call(q, k, v, cp_group, causal=causal, scale=scale, **mask_args)


def _options(name: str, kv_heads_per_gather: int | None) -> dict[str, Any]:
    return {"kv_heads_per_gather": kv_heads_per_gather} if name == "allgather_kv_attention" else {}


_Saved = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("cp_dtensor::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    document_ids: torch.Tensor | None,
    name: str,
    group: str,
    layout: str,
    causal: bool,
    scale: float | None,
    window: list[int] | None,
    seq_len: int | None,
    kv_heads_per_gather: int | None,
    validate: bool,
    debug_check: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, lse, *saved)``; ``saved`` four tensors, or four empty ones for strategies that save none."""
    from cp_dtensor.debug import check_call, recheck_output

    cp_group = ContextParallelGroup.from_key(group).with_layout(layout)
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
        document_ids=document_ids,
        window=_window(window),
        seq_len=seq_len,
        **_options(name, kv_heads_per_gather),
    )
    call = _call(q, k, v, document_ids, name, group, layout, causal, scale, window, seq_len)
    strategy = _local(name)
    state = strategy.prepare(call, **_options(name, kv_heads_per_gather))
    out, lse, saved = strategy.forward(call.q, call.k, call.v, state)
    recheck_output(name, out, q, k, v, cp_group, debug_check=debug_check, scale=call.scale, mask=call.mask)
    return _unaliased([out, lse, *(saved or [q.new_empty(0) for _ in range(4)])], (q, k, v))


def _unaliased(outputs: list[torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``outputs``, contiguous as the fakes say, each copied if it shares memory with an input or an earlier one."""
    seen = {x.untyped_storage().data_ptr() for x in inputs}
    result = []
    for x in outputs:
        x = x.contiguous()
        if x.numel() and x.untyped_storage().data_ptr() in seen:
            x = x.clone(memory_format=torch.contiguous_format)
        seen.add(x.untyped_storage().data_ptr())
        result.append(x)
    return tuple(result)


@_attention_op.register_fake
def _(
    q,
    k,
    v,
    document_ids,
    name,
    group,
    layout,
    causal,
    scale,
    window,
    seq_len,
    kv_heads_per_gather,
    validate,
    debug_check,
):
    from cp_dtensor.call import AttentionCall
    from cp_dtensor.masks import MaskSpec
    from cp_dtensor.validate import resolve_scale

    cp_group = ContextParallelGroup.from_key(group).with_layout(layout)
    seq_len_global = q.shape[2] * cp_group.size
    call = AttentionCall(
        q, k, v, cp_group, seq_len_global, causal, resolve_scale(scale, q.shape[-1]), MaskSpec(causal=causal)
    )  # shapes do not depend on the mask
    strategy = _local(name)
    lse, saved = strategy.fake(q, k, v, strategy.prepare(call, **_options(name, kv_heads_per_gather)))
    return q.new_empty(q.shape), lse, *(saved or [q.new_empty(0) for _ in range(4)])


@torch.library.custom_op("cp_dtensor::attention_backward", mutates_args=())
def _attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    v_s: torch.Tensor,
    out_s: torch.Tensor,
    document_ids: torch.Tensor | None,
    name: str,
    group: str,
    layout: str,
    causal: bool,
    scale: float | None,
    window: list[int] | None,
    seq_len: int | None,
    kv_heads_per_gather: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of ``cp_dtensor::attention``."""
    call = _call(q, k, v, document_ids, name, group, layout, causal, scale, window, seq_len)
    strategy = _local(name)
    state = strategy.prepare(call, **_options(name, kv_heads_per_gather))
    saved = () if q_s.numel() == 0 else (q_s, k_s, v_s, out_s)
    dq, dk, dv = strategy.backward(dout, call.q, call.k, call.v, out, lse, saved, state)
    return _unaliased([dq, dk, dv], (dout, q, k, v, out, lse, q_s, k_s, v_s, out_s))


@_attention_backward_op.register_fake
def _(dout, q, k, v, *_):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_STATIC = ("name", "group", "layout", "causal", "scale", "window", "seq_len", "kv_heads_per_gather")


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, document_ids, *static = inputs
    out, lse, *saved = output
    ctx.save_for_backward(q, k, v, out, lse, *saved, document_ids)
    ctx.static = dict(zip(_STATIC, static[: len(_STATIC)], strict=True))


def _backward(ctx, dout, *_):
    q, k, v, out, lse, q_s, k_s, v_s, out_s, document_ids = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(dout, q, k, v, out, lse, q_s, k_s, v_s, out_s, document_ids, **ctx.static)
    return (dq, dk, dv) + (None,) * (1 + len(_STATIC) + 2)  # document_ids, the static args, validate, debug_check


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention(
    name: str,
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
    kv_heads_per_gather: int | None = None,
) -> torch.Tensor:
    """The strategy ``name`` as one ``cp_dtensor::attention`` node: what ``run_strategy`` runs under compile.

    See Note [Attention as a custom op]. Arguments as :func:`cp_dtensor.ring_attention`, on local shards.

    Returns:
        The local output ``(B, H, S, D)``.

    Raises:
        ValueError: DTensor inputs or a layout that is not a name (not supported under compile).
    """
    if any(isinstance(x, DTensor) for x in (q, k, v, document_ids)):
        raise ValueError(
            f"{name} under torch.compile takes local shards (cp_group.partition_sequence), not DTensors; "
            "call it eagerly for DTensor inputs."
        )
    if not isinstance(cp_group.layout, str):
        raise ValueError(
            f"{name} under torch.compile needs a named layout ('zigzag' or 'contiguous'), got "
            f"{type(cp_group.layout).__name__}: its segments change with every batch. Use the zigzag layout "
            "with document_ids."
        )
    window = check_window(window)
    window_arg = None if window is None else [-1 if w is None else w for w in window]
    out, *_ = _attention_op(
        q,
        k,
        v,
        document_ids,
        name,
        cp_group.key,
        cp_group.layout,
        causal,
        scale,
        window_arg,
        seq_len,
        kv_heads_per_gather,
        validate,
        debug_check,
    )
    return out
