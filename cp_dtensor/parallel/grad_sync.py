"""Gradient sync under CP x DP: parameters are replicated over BOTH axes, so gradients are summed over both.

Note [Gradient sync over dp x cp]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Every rank of the ``("dp", "cp")`` mesh holds a full copy of the parameters. A dp rank sees other
sequences; a cp rank sees other TOKENS of the same sequences. Either way its backward produces only
the gradient of its own tokens' loss, so the full gradient is the SUM over all ``dp * cp`` ranks
(the loss already divides by the global token count; see Note [Loss across shards] in
:mod:`cp_dtensor.nn.loss`). Reducing over dp alone, the usual DDP setup, silently trains each cp rank
on part of each sequence and lets the replicas drift apart.

Choice: PyTorch ``DistributedDataParallel`` over the whole mesh (every rank is one replica), with a
comm hook that sums instead of averaging. Why this one:

* It is exact and simple: one bucketed all-reduce of the gradients, overlapped with the backward,
  over a group every rank is in; parameters stay plain tensors, so the same ``state_dict`` loads
  into a ``cp_size=1`` model and checkpoints need no resharding.
* It runs unchanged on gloo (CPU) and NCCL (CUDA).
* The alternatives: an explicit ``all_reduce`` of each ``.grad`` after ``backward`` is the same
  math without the overlap. FSDP2 ``fully_shard`` on the flattened dp x cp mesh (torchtitan's
  ``dp_shard_cp``) also shards parameters, gradients and optimizer state over those ranks, saving
  ``~16 bytes x params x (1 - 1 / (dp * cp))`` per rank with Adam, at the cost of parameter
  all-gathers in forward and backward and DTensor parameters. Choose it when the model's states,
  not the activations, are what does not fit; the loss needs no change (its gradient divide
  factor is 1, since the loss is already a global mean): :func:`~cp_dtensor.apply_fsdp`, Note [FSDP
  over dp x cp] in :mod:`cp_dtensor.parallel.fsdp`.

With tensor parallelism (a ``"tp"`` mesh axis, :mod:`cp_dtensor.parallel.tensor_parallel`) the replicas are the
dp x cp ranks that hold the SAME tp shard: every tp rank already has the whole gradient of what it
holds (Note [Tensor parallelism inside context parallelism]), so the sum runs over the flattened
``"dp_cp"`` axis, never over tp. DDP does not take DTensor parameters (it fails broadcasting them,
torch 2.13), so a tp-parallelized model gets the same sum from a gradient hook per parameter: an
all-reduce of the local shard's gradient over dp x cp, in the order backward produces them (the
same on every rank). On GPU the call only enqueues the collective; what is lost against DDP is the
bucketing, not the overlap.
"""

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from cp_dtensor.mesh.group import ContextParallelGroup

__all__ = ["apply_ddp"]


def _sum_hook(group: dist.ProcessGroup, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: all-reduce SUM of one gradient bucket (DDP's default divides by the world size).

    DDP checks these annotations at runtime, so this module does not use ``from __future__ import
    annotations``.
    """
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _sum_over_replicas(model: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """Make ``backward`` sum every (DTensor) gradient's local shard over ``group``; broadcast the weights first.

    A tensor hook on a leaf sees the gradient of ONE backward before it is accumulated, so several
    backwards before a step (gradient accumulation) each add their own reduced share, as with DDP.
    """
    src = dist.get_global_rank(group, 0)
    for param in dict.fromkeys(model.parameters()):  # tied weights: once
        local = param.to_local() if isinstance(param, DTensor) else param
        with torch.no_grad():
            dist.broadcast(local, src=src, group=group)
        param.register_hook(lambda grad: _all_reduce_local(grad, group))
    return model


def _all_reduce_local(grad: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``grad`` with its local tensor summed over ``group`` (out of place: the engine may share ``grad``)."""
    if not isinstance(grad, DTensor):
        summed = grad.clone()
        dist.all_reduce(summed, group=group)
        return summed
    summed = grad.to_local().clone()
    dist.all_reduce(summed, group=group)
    return DTensor.from_local(summed, grad.device_mesh, grad.placements, shape=grad.shape, stride=grad.stride())


def apply_ddp(
    model: nn.Module, cp_group: ContextParallelGroup, **ddp_kwargs: Any
) -> DistributedDataParallel | nn.Module:
    """Wrap ``model`` so that ``backward`` sums its gradients over every dp and cp rank.

    See Note [Gradient sync over dp x cp]. Rank 0's parameters are broadcast to all ranks at wrap
    time, so the replicas start identical. A model parallelized with
    :func:`~cp_dtensor.parallelize_for_tp` (DTensor parameters) is not wrapped: it gets gradient
    hooks that sum over the dp x cp ranks of its tp index, and is returned itself.

    Args:
        model: The model, on this rank's device; its loss must be a global-token mean as
            :func:`~cp_dtensor.nn.loss.cross_entropy_across_shards` makes it.
        cp_group: The group from :func:`~cp_dtensor.init_context_parallel_group`.
        **ddp_kwargs: Passed to ``DistributedDataParallel`` (e.g. ``bucket_cap_mb``).

    Returns:
        The wrapped model, ``wrapped.module`` being ``model``; or ``model`` itself under tensor parallelism.

    Raises:
        ValueError: ``ddp_kwargs`` given for a tensor-parallel model (there is no DDP to take them).
    """
    group = cp_group.replica_group
    if any(isinstance(p, DTensor) for p in model.parameters()):
        if ddp_kwargs:
            raise ValueError(f"A tensor-parallel model is synced without DDP; drop the DDP arguments {ddp_kwargs}.")
        return _sum_over_replicas(model, group)
    if cp_group.device_type == "cuda":
        ddp_kwargs.setdefault("device_ids", [torch.cuda.current_device()])
    ddp = DistributedDataParallel(model, process_group=group, **ddp_kwargs)
    ddp.register_comm_hook(group, _sum_hook)
    return ddp
