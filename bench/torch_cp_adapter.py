"""Benchmark-only adapter: PyTorch's built-in context parallelism on CPU. Not part of cp_dtensor.

``torch.distributed.tensor.experimental.context_parallel`` (torch 2.13) maps only the CUDA SDPA ops
(flash, efficient, cuDNN) to its ring. On CPU, ``F.scaled_dot_product_attention`` lowers to
``aten._scaled_dot_product_flash_attention_for_cpu``, which has no DTensor sharding strategy, so
causal SDPA fails with "Operator aten._scaled_dot_product_flash_attention_for_cpu.default does not
have a sharding strategy registered". This module mirrors how ``_context_parallel/_attention.py``
registers the CUDA flash op, for the CPU flash op and its backward:

* a ``Shard(2)`` sharding rule for each (like ``_sharding_rules._scaled_dot_product_flash_attention_cp_strategy``),
* a DTensor custom-op handler (like ``_attention._sdpa_handler``) that calls torch's own
  ``_templated_ring_attention`` / ``_templated_ring_attention_backward`` with the CPU kernels.

Everything else is torch's code, unchanged: its ``_SDPAMerger``, its rotaters (``set_rotate_method``:
``"allgather"``, the default, or ``"alltoall"``), its head-tail load balancing
(``_cp_options.enable_load_balance``), and ``F.scaled_dot_product_attention`` patched by its
dispatcher to wrap the local shards as ``DTensor``s placed ``Shard(2)``.

Usage (the local shards in head-tail order, which is cp_dtensor's ``"zigzag"`` layout)::

    with torch_context_parallel(cp_mesh, rotate_method="alltoall"):
        out = F.scaled_dot_product_attention(q_local, k_local, v_local, is_causal=True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._op_schema import OpSchema, OpStrategy, RuntimeSchemaInfo
from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy
from torch.distributed.tensor.experimental._context_parallel import _attention as tcp
from torch.distributed.tensor.experimental._context_parallel._sharding_rules import _op_strategy_context

__all__ = ["torch_context_parallel", "head_tail_positions", "ROTATE_METHODS"]

aten = torch.ops.aten
CPU_FWD = aten._scaled_dot_product_flash_attention_for_cpu.default
CPU_BWD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
ROTATE_METHODS = ("allgather", "alltoall")
SEQ_DIM = 2


# --------------------------------------------------------------------------- sharding rules (CP only)
def _cpu_flash_cp_strategy(op_schema: OpSchema) -> OpStrategy:
    # outputs (out, logsumexp), inputs (q, k, v): all sharded on the sequence dim.
    mesh = op_schema.get_mesh_from_args()
    return expand_to_full_mesh_op_strategy(mesh, op_schema, [[Shard(SEQ_DIM)] * 5], input_index=2)


def _cpu_flash_backward_cp_strategy(op_schema: OpSchema) -> OpStrategy:
    # outputs (dq, dk, dv), inputs (grad_out, q, k, v, out, logsumexp).
    mesh = op_schema.get_mesh_from_args(validate=False)
    return expand_to_full_mesh_op_strategy(mesh, op_schema, [[Shard(SEQ_DIM)] * 9], input_index=3)


# ------------------------------------------------------------------ the kernels torch's ring calls
def _cpu_flash_op(query, key, value, *, is_causal, dropout_p=0.0, scale=None):
    return aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal, scale=scale)


def _ring_cpu_flash(mesh: DeviceMesh, query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    if attn_mask is not None:
        raise NotImplementedError("attn_mask is not supported by torch's ring")
    return tcp._templated_ring_attention(
        mesh.get_group(),
        SEQ_DIM,
        _cpu_flash_op,
        query=query,
        key=key,
        value=value,
        is_causal=is_causal,
        dropout_p=dropout_p,
        scale=scale,
    )


def _ring_cpu_flash_backward(
    mesh: DeviceMesh, grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask=None, scale=None
):
    if attn_mask is not None:
        raise NotImplementedError("attn_mask is not supported by torch's ring")
    return tcp._templated_ring_attention_backward(
        mesh.get_group(),
        SEQ_DIM,
        CPU_BWD,
        grad_out=grad_out,
        grad_out_name="grad_out",
        query=query,
        key=key,
        value=value,
        out=out,
        logsumexp=logsumexp,
        is_causal=is_causal,
        dropout_p=dropout_p,
        scale=scale,
    )


_CALLS = {CPU_FWD: _ring_cpu_flash, CPU_BWD: _ring_cpu_flash_backward}


def _cpu_sdpa_handler(op_call, args, kwargs):
    """``tcp._sdpa_handler`` with the CPU ops in its call map."""
    op_info = DTensor._op_dispatcher.unwrap_to_op_info(op_call, args, kwargs)
    DTensor._op_dispatcher.sharding_propagator.propagate(op_info)
    output_sharding = op_info.output_sharding
    assert output_sharding is not None and not output_sharding.needs_redistribute
    local_results = _CALLS[op_call](op_info.compute_mesh, *op_info.local_args, **op_info.local_kwargs)
    return DTensor._op_dispatcher.wrap(local_results, output_sharding.output_spec)


@contextlib.contextmanager
def torch_context_parallel(
    cp_mesh: DeviceMesh, *, rotate_method: str = "allgather", load_balance: bool = True
) -> Iterator[None]:
    """Inside the block, ``F.scaled_dot_product_attention`` on local CPU shards runs torch's ring.

    Args:
        cp_mesh: 1-D mesh of the context-parallel ranks.
        rotate_method: ``"allgather"`` (torch's default) or ``"alltoall"``.
        load_balance: Torch's head-tail load balancing (needs causal; shards in head-tail order).

    Raises:
        ValueError: Unknown ``rotate_method``.
    """
    if rotate_method not in ROTATE_METHODS:
        raise ValueError(
            f"Invalid rotate_method {rotate_method!r}. Must be one of: {', '.join(map(repr, ROTATE_METHODS))}."
        )
    old_method, old_balance = tcp._cp_options.rotate_method, tcp._cp_options.enable_load_balance
    tcp.set_rotate_method(rotate_method)
    tcp._cp_options.enable_load_balance = load_balance
    tcp._dispatch_mode = tcp._DispatchMode.MONKEY_PATCH
    contexts = [
        _op_strategy_context(CPU_FWD, _cpu_flash_cp_strategy, RuntimeSchemaInfo(3)),
        _op_strategy_context(CPU_BWD, _cpu_flash_backward_cp_strategy, None),
    ]
    with contextlib.ExitStack() as stack:
        for ctx in contexts:
            stack.enter_context(ctx)
        tcp._enable_context_parallel_dispatcher_impl(seq_dim=SEQ_DIM, mesh=cp_mesh)
        handlers = DTensor._op_dispatcher._custom_op_handlers
        DTensor._op_dispatcher._custom_op_handlers = {
            **handlers,
            CPU_FWD: _cpu_sdpa_handler,
            CPU_BWD: _cpu_sdpa_handler,
        }
        try:
            yield
        finally:
            tcp._disable_context_parallel_dispatcher_impl()
            tcp._cp_options.rotate_method, tcp._cp_options.enable_load_balance = old_method, old_balance


def head_tail_positions(seq_len: int, size: int, rank: int) -> torch.Tensor:
    """Global positions torch's ``_HeadTailLoadBalancer`` gives ``rank`` (to check the layouts agree)."""
    from torch.distributed.tensor.experimental._context_parallel._load_balancer import _HeadTailLoadBalancer

    order = _HeadTailLoadBalancer(seq_len, size, torch.device("cpu"))._generate_indices(restore=False)[0]
    return order.chunk(size)[rank]
