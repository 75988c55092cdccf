"""The executor: every strategy, every call, eager or compiled, runs through :func:`execute`.

In this order, once per call: sort the keywords into the common options and the strategy's own,
check the group (and, with ``validate``, that all ranks agree), unwrap DTensors, resolve the call
(:func:`~cp_dtensor.attention.call.resolve_call`: checks, the mask, a shard of document ids
gathered), plan, run the strategy's forward inside ONE autograd function (its backward reuses the
forward's plan: nothing is resolved or gathered again), re-check the output (``debug_check``), and
wrap it like the inputs. Under ``torch.compile`` the same steps run inside one custom operator
instead (Note [Attention as a custom op] in :mod:`cp_dtensor.attention.compiled`).

The executor finds strategies by name in :mod:`cp_dtensor.attention.registry`; it imports none.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch.autograd.function import once_differentiable
from torch.profiler import record_function

from cp_dtensor.attention import compiled
from cp_dtensor.attention.call import resolve_call, split_options
from cp_dtensor.attention.debug import check_call, recheck_output
from cp_dtensor.attention.registry import Strategy, registered
from cp_dtensor.mesh.sharding import from_local_like, global_document_ids, local_sinks, to_local_checked

if TYPE_CHECKING:
    from cp_dtensor.mesh.group import ContextParallelGroup

__all__ = ["execute"]


class _Attention(torch.autograd.Function):
    """Any strategy's local forward and backward as one autograd node."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, strategy: Strategy, plan: Any):
        # ``sinks`` is an input for its gradient only: the plan holds the detached values it computes with
        with record_function(f"cp_dtensor.{strategy.name}.forward"):
            out, lse, saved = strategy.forward(q, k, v, plan)
        ctx.save_for_backward(q, k, v, out, lse, *saved)
        ctx.strategy, ctx.plan = strategy, plan
        ctx.sinks_dtype = None if sinks is None else sinks.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, *saved = ctx.saved_tensors
        with record_function(f"cp_dtensor.{ctx.strategy.name}.backward"):
            dq, dk, dv, dsinks = ctx.strategy.backward(dout, q, k, v, out, lse, tuple(saved), ctx.plan)
        dsinks = None if dsinks is None or ctx.sinks_dtype is None else dsinks.to(ctx.sinks_dtype)
        return dq, dk, dv, dsinks, None, None


def execute(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cp_group: ContextParallelGroup,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """Run the strategy registered as ``name`` on one call.

    Args:
        name: The strategy's name (``"ring"``...).
        q: Queries, local ``(B, H, S, D)`` or a sequence-sharded DTensor.
        k: Keys, likewise ``(B, H_kv, S, D)``.
        v: Values, likewise.
        cp_group: The context-parallel group.
        kwargs: The call's keyword arguments: those of
            :class:`~cp_dtensor.attention.call.AttentionOptions` and of the strategy's ``Options``.

    Returns:
        The local output ``(B, H, S, D)`` (a DTensor if the inputs were).

    Raises:
        ValueError: As :func:`cp_dtensor.ring_attention`, or a keyword the strategy does not take.
    """
    strategy = registered(name)
    common, options = split_options(name, strategy.Options, strategy.option_names, kwargs)
    if torch.compiler.is_compiling():  # one opaque node per call: see Note [Attention as a custom op]
        return compiled.attention(strategy, q, k, v, cp_group, common, options)
    check_call(strategy.function, cp_group, q, k, v, common, options)
    (q_l, k_l, v_l), like = to_local_checked((q, k, v), cp_group, seq_dim=2)
    sinks = local_sinks(common.sinks)
    local = dataclasses.replace(common, document_ids=global_document_ids(common.document_ids, cp_group), sinks=sinks)
    call = resolve_call(q_l, k_l, v_l, cp_group, local, options)
    out = _Attention.apply(call.q, call.k, call.v, sinks, strategy, strategy.plan(call))
    recheck_output(
        strategy.function, out, q_l, k_l, v_l, cp_group, debug_check=common.debug_check, scale=call.scale,
        mask=call.mask, logits=call.logits,
    )  # fmt: skip
    return from_local_like(out, like)
