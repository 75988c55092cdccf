"""Tensor parallelism inside context parallelism: heads split over the ``"tp"`` axis, the sequence over ``"cp"``.

Usage under ``torchrun --standalone --nproc-per-node 8 script.py`` (3-D: dp 2 x cp 2 x tp 2)::

    cp_group = init_context_parallel_group(2, tp_size=2)   # mesh ("dp", "cp", "tp") = (2, 2, 2)
    model = parallelize_for_tp(model, cp_group)              # the model's tp_plan(t), or one attention layer
    model = apply_ddp(model, cp_group)                      # gradients summed over dp x cp

Note [Tensor parallelism inside context parallelism]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The two splits are orthogonal. CP splits the TOKENS of a sequence: every cp rank holds ``S = L / P``
of them and attention is the only place where tokens meet. TP (Megatron-style, with PyTorch's own
:func:`~torch.distributed.tensor.parallel.parallelize_module`) splits the WIDTH of each layer:

* ``q_proj``, ``k_proj``, ``v_proj`` are ``ColwiseParallel``: tp rank ``r`` projects its ``S`` tokens
  to query heads ``[r H / t, (r + 1) H / t)`` and K/V heads ``[r H_kv / t, (r + 1) H_kv / t)``.
  Under GQA query head ``h`` reads K/V head ``h // (H / H_kv)``, so a rank's query heads read exactly
  its own K/V heads. When ``H_kv < t``, ``t / H_kv`` consecutive tp ranks share one K/V head: the
  K/V projections stay replicated and each rank keeps the head its query heads read
  (:class:`ReplicatedKVParallel`).
* Attention then runs over the cp axis on those LOCAL heads only: the strategies treat heads as a
  batch dim, so the ring (or Ulysses, ...) moves ``1 / t`` of the K/V bytes it moves without TP.
* ``o_proj`` is ``RowwiseParallel``: each rank's heads give a partial sum of the output, all-reduced
  over tp. The SwiGLU MLP is the same pair: ``w1`` and ``w3`` colwise, ``w2`` rowwise.
* The embedding is vocab-parallel (``RowwiseParallel``) and the LM head colwise with its logits
  all-gathered, so the loss (Note [Loss across shards]) sees whole logits.
* The norms keep whole weights, as ``Replicate`` DTensors (:class:`ReplicateParallel`): every
  parameter is then a DTensor on the tp mesh, so ``clip_grad_norm_``, the optimizer and
  ``torch.distributed.checkpoint`` see one kind of tensor.

Per layer and step that is 2 all-reduces of ``(B, S, E)`` over tp forward (after ``o_proj`` and
``w2``) and 4 backward (the input gradients of q, k, v and the MLP), plus the embedding's all-reduce
and the LM head's all-gather forward and one all-reduce backward. All of them stay inside a tp group,
which the mesh puts on consecutive ranks (one node). Every tp rank then holds the same activations
and the same loss, so the gradients of replicated weights are equal across tp and those of sharded
weights are complete per shard: either way, what is left is the sum over dp x cp
(:func:`~cp_dtensor.apply_ddp`, Note [Gradient sync over dp x cp]).

Legend: ``B`` batch, ``S`` local sequence length, ``E`` hidden size, ``H`` query heads, ``H_kv`` K/V
heads, ``D`` head dim, ``t`` tp size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from cp_dtensor.mesh.group import ContextParallelGroup
from cp_dtensor.nn.module import ContextParallelAttention

__all__ = ["ReplicateParallel", "ReplicatedKVParallel", "check_tp_heads", "parallelize_for_tp", "tp_plan"]


def check_tp_heads(num_heads: int, num_kv_heads: int, tp_size: int) -> None:
    """Raise ``ValueError`` unless ``tp_size`` ranks can split the heads evenly.

    Query heads must divide by ``tp_size``. K/V heads must divide by ``tp_size`` (each rank gets
    ``H_kv / t``), or ``tp_size`` must divide by them (each K/V head replicated on ``t / H_kv`` ranks).

    Args:
        num_heads: ``H``, query heads.
        num_kv_heads: ``H_kv``, K/V heads (dividing ``H``).
        tp_size: ``t``.

    Raises:
        ValueError: Names the head counts, ``tp_size`` and the valid choices.
    """
    if num_heads % tp_size:
        raise ValueError(
            f"num_heads={num_heads} must be divisible by tp_size={tp_size} (each tp rank holds num_heads / "
            f"tp_size query heads); choose tp_size among the divisors of {num_heads}."
        )
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(
            f"num_kv_heads={num_kv_heads} and tp_size={tp_size}: one must divide the other (K/V heads are split "
            f"over tp, or each is replicated on tp_size / num_kv_heads ranks)."
        )


def _replicate_input(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    """Mark the first input, equal on every tp rank, as a ``Replicate`` DTensor (its gradient is all-reduced)."""
    x = inputs[0]
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
    return (x, *inputs[1:])


class ReplicateParallel(ParallelStyle):
    """Keep a module whole on every tp rank: parameters become ``Replicate`` DTensors, local tensors in and out.

    For the norms: their input is the same on every tp rank, so is their output, and so is the
    gradient of their weights. Making those weights DTensors anyway lets one ``clip_grad_norm_``,
    optimizer and checkpoint call handle the whole model.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh, input_fn=_replicate_input, output_fn=lambda mod, out, mesh: out.to_local()
        )


class ReplicatedKVParallel(ParallelStyle):
    """A K or V projection for ``H_kv < t``: whole weights on every rank, each rank keeps the one head it reads.

    tp rank ``r`` holds query heads ``[r H / t, (r + 1) H / t)``, which all read K/V head
    ``r // (t / H_kv)``. The projection is computed whole (it is ``H_kv D`` wide, small) and the
    other heads are dropped. Rank ``r``'s gradient then covers only its own query heads: it is a
    ``Partial`` sum over tp, for the input (all-reduced like a colwise input) and for the weights
    (all-reduced by a hook here, so the ``.grad`` of a ``Replicate`` weight is whole, as for any other).

    Args:
        num_kv_heads: ``H_kv``, dividing ``t``.
        head_dim: ``D``.
    """

    def __init__(self, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp_size, tp_rank = device_mesh.size(), device_mesh.get_local_rank()
        assert tp_size % self.num_kv_heads == 0, "check_tp_heads guarantees it"
        head = tp_rank // (tp_size // self.num_kv_heads)
        cols = slice(head * self.head_dim, (head + 1) * self.head_dim)

        def keep_own_head(mod: nn.Module, out: DTensor, mesh: DeviceMesh) -> torch.Tensor:
            # out: (B, S, H_kv * D), the same on every tp rank -> (B, S, D), this rank's K/V head
            return out.to_local(grad_placements=[Partial()])[..., cols]

        distribute_module(module, device_mesh, input_fn=_replicate_input, output_fn=keep_own_head)
        for param in module.parameters():
            param.register_hook(lambda grad: grad.redistribute(placements=[Replicate()]))
        return module


def attention_plan(attn: ContextParallelAttention, tp_size: int, prefix: str = "") -> dict[str, ParallelStyle]:
    """The plan of one :class:`~cp_dtensor.ContextParallelAttention`: q/k/v colwise, o rowwise.

    Args:
        attn: The attention module (its head counts pick the K/V style).
        tp_size: ``t``.
        prefix: Prepended to each submodule name (``"layers.*.attn."``).

    Returns:
        Submodule name to its ``ParallelStyle``.

    Raises:
        ValueError: The heads do not split over ``tp_size`` (:func:`check_tp_heads`).
    """
    check_tp_heads(attn.num_heads, attn.num_kv_heads, tp_size)
    if attn.num_kv_heads % tp_size == 0:
        k_style, v_style = ColwiseParallel(), ColwiseParallel()
    else:
        k_style, v_style = (ReplicatedKVParallel(attn.num_kv_heads, attn.head_dim) for _ in range(2))
    return {
        f"{prefix}q_proj": ColwiseParallel(),
        f"{prefix}k_proj": k_style,
        f"{prefix}v_proj": v_style,
        f"{prefix}o_proj": RowwiseParallel(),
    }


def swiglu_plan(name: str) -> dict[str, ParallelStyle]:
    """The plan of a SwiGLU MLP at ``name`` (submodules ``w1``, ``w3`` colwise, ``w2`` rowwise).

    One ``Replicate`` DTensor feeds ``w1`` and ``w3``, so their input gradients meet before one all-reduce.
    """
    to_dtensor = PrepareModuleInput(
        input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),), use_local_output=False
    )
    return {
        name: to_dtensor,
        f"{name}.w1": ColwiseParallel(),
        f"{name}.w3": ColwiseParallel(),
        f"{name}.w2": RowwiseParallel(),
    }


def tp_plan(module: nn.Module, tp_size: int) -> dict[str, ParallelStyle]:
    """The ``parallelize_module`` plan for ``module``, by submodule name.

    See Note [Tensor parallelism inside context parallelism]. A whole model states its own plan as a
    method ``tp_plan(tp_size)`` (the demo model's is built from :func:`attention_plan` and
    :func:`swiglu_plan`); one :class:`~cp_dtensor.ContextParallelAttention` gets :func:`attention_plan`.

    Args:
        module: A :class:`~cp_dtensor.ContextParallelAttention`, or a model with a ``tp_plan`` method.
        tp_size: ``t``.

    Returns:
        Submodule name (``"*"`` matches any layer index) to its ``ParallelStyle``.

    Raises:
        ValueError: The heads do not split over ``tp_size`` (:func:`check_tp_heads`), or ``module`` has
            no plan.
    """
    if isinstance(module, ContextParallelAttention):
        return attention_plan(module, tp_size)
    if callable(getattr(module, "tp_plan", None)):
        return module.tp_plan(tp_size)
    raise ValueError(
        f"parallelize_for_tp takes a ContextParallelAttention or a model with a tp_plan(tp_size) method "
        f"(as cp_dtensor.training.TransformerWithCP has), got {type(module).__name__}; for other modules call "
        "torch.distributed.tensor.parallel.parallelize_module with your own plan."
    )


def _tied_parameters(module: nn.Module) -> list[list[str]]:
    """Names of parameters that are one tensor (tied weights), each group with more than one name."""
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _retie(module: nn.Module, tied: list[list[str]]) -> None:
    """Make each group of ``tied`` names one parameter again, as before ``parallelize_module``.

    ``parallelize_module`` distributes the uses of a tied matrix separately; when their placements
    agree (the demo's embedding and LM head are both row-sharded over the vocab) they share one
    DTensor again.

    Raises:
        ValueError: Tied uses got different placements.
    """
    for first, *others in tied:
        param = module.get_parameter(first)
        for name in others:
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            if getattr(owner, attr).placements != param.placements:
                raise ValueError(
                    f"{first} and {name} are tied but the tp plan places them differently "
                    f"({param.placements} vs {getattr(owner, attr).placements}); give both the same style."
                )
            setattr(owner, attr, param)


def parallelize_for_tp(module: nn.Module, cp_group: ContextParallelGroup) -> nn.Module:
    """Split ``module``'s heads and MLP width over ``cp_group``'s ``"tp"`` axis, in place.

    Call it on the whole model (or one attention layer) built as for one tp rank, with the same
    seed everywhere, before :func:`~cp_dtensor.apply_ddp` and before making the optimizer. tp rank 0's
    weights are scattered to the others, so the result is the same model split, not a new one. The
    sequence stays sharded over cp as before: inputs, outputs and the loss are local tensors, the
    same on every tp rank. Parameters become DTensors on ``cp_group.tp_mesh``; ``full_tensor()``
    gives a whole one; tied weights stay tied. See Note [Tensor parallelism inside context parallelism].

    Args:
        module: A model with a ``tp_plan(tp_size)`` method (as
            :class:`~cp_dtensor.training.TransformerWithCP`) or a :class:`~cp_dtensor.ContextParallelAttention`.
        cp_group: A group built with ``init_context_parallel_group(..., tp_size=t)``; with ``t = 1``
            (or no ``"tp"`` axis) ``module`` is returned unchanged.

    Returns:
        ``module``, parallelized.

    Raises:
        ValueError: The query heads do not divide by ``t``, the K/V heads and ``t`` do not divide one
            another, or ``module`` has no plan.
    """
    tp_size = cp_group.tp_size
    if tp_size == 1:
        return module
    plan = tp_plan(module, tp_size)
    tied = _tied_parameters(module)
    parallelize_module(module, cp_group.tp_mesh, plan)
    _retie(module, tied)
    return module
