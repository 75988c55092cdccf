"""FSDP2 over dp x cp: parameters, gradients and optimizer states sharded over every rank that holds a replica.

Usage under ``torchrun --standalone --nproc-per-node 8 script.py`` (3-D: dp 2 x cp 2 x tp 2)::

    cp_group = init_context_parallel_group(2, tp_size=2)   # mesh ("dp", "cp", "tp") = (2, 2, 2)
    model = TransformerWithCP(config, cp_group=cp_group)   # the same seed on every rank
    model = parallelize_for_tp(model, cp_group)             # 1. heads and MLP width over tp (if t > 1)
    # 2. activation checkpointing of the decoder blocks, if any, goes here
    model = apply_fsdp(model, cp_group)                     # 3. shards over the 4 dp x cp ranks
    optimizer = torch.optim.AdamW(model.parameters())      # after: it sees the sharded parameters

Note [FSDP over dp x cp]
~~~~~~~~~~~~~~~~~~~~~~~~
Which ranks share. The ranks that hold a replica of the same parameters are every dp AND every cp
rank of one tp index (Note [Gradient sync over dp x cp] in :mod:`cp_dtensor.parallel.grad_sync`),
so FSDP2's ``fully_shard`` runs on those ranks flattened to one mesh axis, ``"dp_cp"`` (torchtitan
calls it ``dp_shard_cp``). Each cp rank of a sequence then holds a different shard of the same
weights and all-gathers the rest before each block: the sequence's tokens stay split over cp, the
weights are gathered whole, exactly as for dp. With tensor parallelism the parameters are already
DTensors on the ``"tp"`` axis; ``fully_shard`` adds a ``Shard(0)`` over ``"dp_cp"`` in front of
their tp placement (a 2-D DTensor on ``("dp_cp", "tp")``), and never reduces over tp.

The gradient divide factor. The loss of rank ``r`` is ``S_r / N`` with ``N`` the supervised tokens
of the GLOBAL batch (Note [Loss across shards] in :mod:`cp_dtensor.nn.loss`), so the one-process
gradient is the SUM over the ``dp * cp`` ranks of their gradients. FSDP2 by default AVERAGES over
its shard group (a reduce-scatter with ``ReduceOp.AVG``, or a sum then a division by the group
size), which would make every gradient ``dp * cp`` times too small: a loss that is a per-rank
mean needs that, a global mean must not get it. So every FSDP unit gets
``set_gradient_divide_factor(1.0)`` and ``set_force_sum_reduction_for_comms(True)``: a plain
``ReduceOp.SUM`` reduce-scatter and no division (FSDP skips a division by 1). Forcing the sum also
keeps the reduction to an op every backend has: gloo has neither ``AVG`` nor ``PREMUL_SUM``, the
ops FSDP picks for fp32 and bf16 otherwise. AdamW's first step is almost blind to a constant scale
of the gradient, so the tests compare the gradients themselves, not only the weights
(tests/test_fsdp.py).

The wrapping, and activation checkpointing. One ``fully_shard`` per decoder block, then one on the
root (embedding, final norm, LM head; a tied embedding lives in the root, so both uses share one
unit). A block's parameters are all-gathered just before its forward and freed after it
(``reshard_after_forward=True``), and again in backward; the root's stay gathered from forward to
backward (it is needed first in backward anyway). Activation checkpointing must be applied to the
blocks BEFORE ``fully_shard``: ``fully_shard`` then wraps the checkpointed block, so the recompute
in backward runs inside that block's all-gather, with its parameters present. Wrapping in the other
order would leave the checkpoint's recompute outside FSDP's hooks.

Legend: ``P`` cp size, ``t`` tp size.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from cp_dtensor.mesh.group import ContextParallelGroup, _axis_options

__all__ = ["apply_fsdp", "dp_cp_mesh", "decoder_blocks"]


def dp_cp_mesh(cp_group: ContextParallelGroup) -> DeviceMesh:
    """The dp and cp axes of ``cp_group``'s mesh flattened to one, ``"dp_cp"``: the ranks FSDP shards over.

    With a ``"tp"`` axis this is ``cp_group.flat_dp_cp_mesh``. Without one the dp x cp axes are the
    whole mesh; it is flattened here (DeviceMesh caches the result, so a second call makes no new
    process group), with the timeout the mesh's own axes were given.

    Args:
        cp_group: The group from :func:`~cp_dtensor.init_context_parallel_group`.

    Returns:
        A 1-D mesh with axis ``"dp_cp"``, sharing ``cp_group.mesh`` as its root (so FSDP composes with
        DTensors on the ``"tp"`` axis).
    """
    if cp_group.flat_dp_cp_mesh is not None:
        return cp_group.flat_dp_cp_mesh
    assert "tp" not in (cp_group.mesh.mesh_dim_names or ()), "group.py flattens dp x cp whenever there is a tp axis"
    pg = cp_group.cp_mesh.get_group()
    timeout = pg._get_backend(torch.device(cp_group.mesh.device_type)).options._timeout  # the mesh's axes all have it
    options = _axis_options(cp_group.mesh.device_type, dist.get_backend(pg), timeout)
    return cp_group.mesh._flatten("dp_cp", backend_override=options)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model`` that each become one FSDP unit.

    ``model.layers`` (:class:`~cp_dtensor.training.TransformerWithCP`) or ``model.model.layers`` (Hugging Face
    causal LMs such as ``LlamaForCausalLM``).

    Raises:
        ValueError: ``model`` has neither; pass ``blocks=`` to :func:`apply_fsdp`.
    """
    for owner in (model, getattr(model, "model", None)):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return list(layers)
    raise ValueError(
        f"Cannot find the decoder blocks of {type(model).__name__}: it has no `layers` or `model.layers` "
        "ModuleList. Pass them as apply_fsdp(model, cp_group, blocks=[...])."
    )


def apply_fsdp(
    model: nn.Module,
    cp_group: ContextParallelGroup,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
    blocks: Iterable[nn.Module] | None = None,
) -> nn.Module:
    """Shard ``model`` with FSDP2 over the dp x cp ranks, summing (not averaging) gradients.

    See Note [FSDP over dp x cp]. Call it after :func:`~cp_dtensor.parallelize_for_tp` and after
    activation checkpointing of the blocks, and before making the optimizer. Every rank must build
    the model with the same seed (FSDP keeps each rank's own slice of its own copy; it does not
    broadcast). Parameters become DTensors; ``full_tensor()`` gives a whole one, and
    :func:`~cp_dtensor.save_checkpoint` saves the shards, loadable into any split or into one process.

    Args:
        model: The model, on this rank's device; its loss must be a global-token mean as
            :func:`~cp_dtensor.nn.loss.cross_entropy_across_shards` makes it.
        cp_group: The group from :func:`~cp_dtensor.init_context_parallel_group`.
        mp_policy: FSDP2's mixed precision, e.g. ``MixedPrecisionPolicy(param_dtype=torch.bfloat16,
            reduce_dtype=torch.float32)`` on GPU: bf16 compute and all-gathers, fp32 gradient
            reduction and fp32 sharded weights for the optimizer. ``None``: the parameters' own dtype.
        reshard_after_forward: Free each block's gathered weights after its forward (re-gathered in
            backward: less memory, one more all-gather per block); ``False`` keeps them to backward.
        blocks: The modules to shard one by one; default :func:`decoder_blocks`.

    Returns:
        ``model`` itself, now an ``FSDPModule`` (so are the blocks).

    Raises:
        ValueError: ``model`` is wrapped in DDP already, or its blocks cannot be found.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("apply_fsdp takes the bare model, got a DistributedDataParallel: use apply_ddp OR apply_fsdp.")
    mesh = dp_cp_mesh(cp_group)
    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for block in decoder_blocks(model) if blocks is None else blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)  # the root is needed first in backward
    for module in model.modules():
        if isinstance(module, FSDPModule):  # see Note [FSDP over dp x cp]: the loss is a global mean
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model
