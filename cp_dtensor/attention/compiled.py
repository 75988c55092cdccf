"""Attention as one PyTorch custom operator, so that ``torch.compile`` sees an attention call as one node.

Note [Attention as a custom op]
-------------------------------
A strategy's forward posts point-to-point sends (ring) or collectives (Ulysses, all-gather) between
its kernel calls, and plans its tiles on the host from the mask. Dynamo cannot trace that
(``isend``/``irecv`` are "P2P compilation disabled"), and should not: the schedule is data-dependent
host logic, not tensor math. So under ``torch.compile`` the executor
(:mod:`cp_dtensor.attention.executor`) calls ``torch.ops.cp_dtensor.attention`` instead, an opaque
operator (``torch.library.custom_op``) whose Python body runs the same registered
:class:`~cp_dtensor.attention.registry.Strategy` as eager, with

- a fake implementation that gives the output shapes from the shapes and sizes alone
  (:meth:`Strategy.fake <cp_dtensor.attention.registry.Strategy.fake>`: no planning, no
  communication), so the compiler can plan the rest of the graph around it, symbolic sequence
  lengths included;
- ``register_autograd`` with a second operator, ``cp_dtensor::attention_backward``, that runs the
  strategy's backward from what the forward returned: the output and its log-sum-exp, the head-frame
  tensors of the head-exchanging strategies, and the global document ids the forward resolved (so a
  shard of ids is gathered once per call, as in eager).

What is not a tensor cannot be an operator argument, except numbers, bools and strings. Everything
static about a call travels as ONE string, a :class:`StaticCall` in JSON: the strategy's name, the
group's :attr:`~cp_dtensor.ContextParallelGroup.key` (under which every group registers itself when
it is made), the cp size, the Ulysses size and the layout (everything a fake output shape depends
on, so that no graph cache, Inductor's on-disk one included, can hand a graph traced for one world to
another), the common options but the tensors, and the strategy's own options. The string is a
constant of the traced program: the compiled graph guards on it, and a second step with new data of
the same shapes runs the same graph, with no recompilation. ``document_ids`` and ``sinks`` are
tensor inputs (the backward operator returns the sinks' gradient), so new documents are new data,
not a new graph; the operator builds the mask and its tile plans from them
at run time, on the host, exactly as eager does.

The whole call runs inside the operator: the checks of :func:`~cp_dtensor.attention.call.resolve_call`
(a ``ValueError`` is raised when the compiled step runs), ``validate`` and ``debug_check``. Not
supported under compile, with a ``ValueError`` saying so: ``score_mod`` and ``mask_mod`` (a Python
function is not a constant a graph can hold), DTensor inputs (pass local shards, as
:class:`~cp_dtensor.training.TransformerWithCP` does) and a
:class:`~cp_dtensor.positions.layout.DocumentZigzag` layout (its segments change with every batch;
use the default zigzag layout with ``document_ids``).
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from cp_dtensor.attention.call import AttentionOptions, resolve_call
from cp_dtensor.attention.debug import check_call, recheck_output
from cp_dtensor.attention.registry import Strategy, registered
from cp_dtensor.mesh.group import ContextParallelGroup
from cp_dtensor.positions.masks import check_window

__all__ = ["StaticCall", "attention"]

_PLAIN = (bool, int, float, str, type(None))


def _literal(value: Any) -> str:
    """``value`` (plain values, tuples of them, dicts with string keys) as a Python literal, dict keys sorted.

    Raises:
        ValueError: A value that is not plain (it could not be a constant of a compiled graph).
    """
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key!r}: {_literal(item)}" for key, item in sorted(value.items())) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + "".join(f"{_literal(item)}, " for item in value) + ")"
    if not isinstance(value, _PLAIN):
        raise ValueError(f"attention options under torch.compile must be plain values, got {value!r}.")
    return repr(value)


_NUM_SAVED = 4  # the most tensors a strategy saves for its backward (the head-frame q, k, v, out)


@dataclass(frozen=True)
class StaticCall:
    """Everything about one attention call that is not a tensor: the custom operator's one string argument.

    Attributes:
        strategy: The registered strategy's name.
        group: The cp group's key (:meth:`~cp_dtensor.ContextParallelGroup.from_key`).
        cp_size: Ranks on the cp axis.
        ulysses_size: Ranks per Ulysses group (hybrid), or ``None``.
        layout: The layout's name.
        common: The common options but ``document_ids`` (:meth:`AttentionOptions.static`).
        options: The strategy's own options, as a dict.
    """

    strategy: str
    group: str
    cp_size: int
    ulysses_size: int | None
    layout: str
    common: dict[str, Any]
    options: dict[str, Any]

    def encode(self) -> str:
        """The call as a Python literal with sorted keys: equal calls give equal strings.

        Written with ``repr`` and f-strings, which ``torch.compile`` traces as constants (``json`` it does not).
        """
        return _literal({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def decode(cls, text: str) -> StaticCall:
        """The inverse of :meth:`encode`."""
        return cls(**ast.literal_eval(text))

    def resolve(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        document_ids: torch.Tensor | None,
        sinks: torch.Tensor | None,
        *,
        checks: bool,
    ):
        """The strategy, its resolved call and its plan; ``checks`` runs ``check_call`` first.

        Returns:
            ``(strategy, call, plan)``.
        """
        strategy = registered(self.strategy)
        cp_group = ContextParallelGroup.from_key(self.group).with_layout(self.layout)
        assert cp_group.size == self.cp_size, "a group key names one mesh"
        common = AttentionOptions(document_ids=document_ids, sinks=sinks, **self.common)
        options = strategy.Options(**self.options)
        if checks:
            check_call(strategy.function, cp_group, q, k, v, common, options)
        call = resolve_call(q, k, v, cp_group, common, options)
        return strategy, call, strategy.plan(call)


def _padded(saved: tuple[torch.Tensor, ...], like: torch.Tensor) -> list[torch.Tensor]:
    """``saved``, or ``_NUM_SAVED`` empty tensors for a strategy that saves none: the op's outputs are fixed."""
    assert len(saved) in (0, _NUM_SAVED)
    return list(saved) or [like.new_empty(0) for _ in range(_NUM_SAVED)]


@torch.library.custom_op("cp_dtensor::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    document_ids: torch.Tensor | None,
    sinks: torch.Tensor | None,
    static: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, lse, *saved, ids)``: ``ids`` the global ``(B, L)`` document ids the call resolved (empty for none)."""
    spec = StaticCall.decode(static)
    strategy, call, plan = spec.resolve(q, k, v, document_ids, sinks, checks=True)
    out, lse, saved = strategy.forward(call.q, call.k, call.v, plan)
    recheck_output(
        strategy.function, out, q, k, v, call.cp_group, debug_check=spec.common["debug_check"], scale=call.scale,
        mask=call.mask, logits=call.logits,
    )  # fmt: skip
    ids = call.mask.document_ids
    ids = torch.empty(0, dtype=torch.int64) if ids is None else ids
    return _unaliased([out, lse, *_padded(saved, q), ids], (q, k, v, document_ids, sinks))


def _unaliased(outputs: list[torch.Tensor], inputs: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor, ...]:
    """``outputs``, contiguous as the fakes say, each copied if it shares memory with an input or an earlier one."""
    seen = {x.untyped_storage().data_ptr() for x in inputs if x is not None}
    result = []
    for x in outputs:
        x = x.contiguous()
        if x.numel() and x.untyped_storage().data_ptr() in seen:
            x = x.clone(memory_format=torch.contiguous_format)
        seen.add(x.untyped_storage().data_ptr())
        result.append(x)
    return tuple(result)


@_attention_op.register_fake
def _(q, k, v, document_ids, sinks, static):
    spec = StaticCall.decode(static)
    strategy = registered(spec.strategy)
    cp_group = ContextParallelGroup.from_key(spec.group)
    lse, saved = strategy.fake(q, k, v, cp_group, strategy.Options(**spec.options))
    if document_ids is None:
        ids = torch.empty(0, dtype=torch.int64, device="cpu")
    else:
        ids = torch.empty(q.shape[0], q.shape[2] * spec.cp_size, dtype=torch.int64, device="cpu")
    return q.new_empty(q.shape), lse, *_padded(saved, q), ids


@torch.library.custom_op("cp_dtensor::attention_backward", mutates_args=())
def _attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    saved: list[torch.Tensor],
    ids: torch.Tensor,
    sinks: torch.Tensor | None,
    static: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dsinks)`` of ``cp_dtensor::attention``, from the forward's outputs and its global ids.

    ``dsinks`` is empty when the call has no sinks.
    """
    spec = StaticCall.decode(static)
    strategy, call, plan = spec.resolve(q, k, v, ids if ids.numel() else None, sinks, checks=False)
    saved = () if saved[0].numel() == 0 else tuple(saved)
    dq, dk, dv, dsinks = strategy.backward(dout, call.q, call.k, call.v, out, lse, saved, plan)
    dsinks = q.new_empty(0) if dsinks is None else dsinks.to(sinks.dtype)
    return _unaliased([dq, dk, dv, dsinks], (dout, q, k, v, out, lse, *saved, ids, sinks))


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, saved, ids, sinks, static):
    dsinks = q.new_empty(0) if sinks is None else sinks.new_empty(sinks.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, _, sinks, static = inputs
    out, lse, *saved, ids = output
    ctx.save_for_backward(q, k, v, out, lse, ids, *saved)
    ctx.sinks, ctx.static = sinks, static


def _backward(ctx, dout, *_):
    q, k, v, out, lse, ids, *saved = ctx.saved_tensors
    sinks = None if ctx.sinks is None else ctx.sinks.detach()
    dq, dk, dv, dsinks = _attention_backward_op(dout, q, k, v, out, lse, saved, ids, sinks, ctx.static)
    return dq, dk, dv, None, None if sinks is None else dsinks, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention(
    strategy: Strategy,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cp_group: ContextParallelGroup,
    common: AttentionOptions,
    options: Any,
) -> torch.Tensor:
    """``strategy`` as one ``cp_dtensor::attention`` node: what the executor runs under compile.

    See Note [Attention as a custom op]. Arguments as :func:`cp_dtensor.ring_attention`, on local shards.

    Returns:
        The local output ``(B, H, S, D)``.

    Raises:
        ValueError: DTensor inputs or a layout that is not a name (not supported under compile).
    """
    if any(isinstance(x, DTensor) for x in (q, k, v, common.document_ids, common.sinks)):
        raise ValueError(
            f"{strategy.function} under torch.compile takes local shards (cp_group.partition_sequence), not "
            "DTensors; call it eagerly for DTensor inputs."
        )
    if not isinstance(cp_group, ContextParallelGroup):
        check_call(strategy.function, cp_group, q, k, v, common, options)  # raises, naming the type
    if not isinstance(cp_group.layout, str):
        raise ValueError(
            f"{strategy.function} under torch.compile needs a named layout ('zigzag' or 'contiguous'), got "
            f"{type(cp_group.layout).__name__}: its segments change with every batch. Use the zigzag layout "
            "with document_ids."
        )
    functions = [name for name in ("score_mod", "mask_mod") if getattr(common, name) is not None]
    if functions:
        raise ValueError(
            f"{strategy.function} under torch.compile does not take {' or '.join(functions)} (a Python function "
            "cannot be a constant of the compiled graph); call attention eagerly (torch.compiler.disable on the "
            "attention call) or use softcap, sinks and the mask arguments, which compile."
        )
    static = dict(common.static(), window=check_window(common.window))
    spec = StaticCall(
        strategy=strategy.name,
        group=cp_group.key,
        cp_size=cp_group.size,
        ulysses_size=cp_group.ulysses_size,
        layout=cp_group.layout,
        common=static,
        options={name: getattr(options, name) for name in strategy.option_names},
    )
    out, *_ = _attention_op(q, k, v, common.document_ids, common.sinks, spec.encode())
    return out
