"""``ContextParallel``: context parallelism as a ``ParallelStyle``, one entry of a ``parallelize_module`` plan.

Usage under ``torchrun --standalone --nproc-per-node 4 script.py`` (cp 2 x tp 2, a Hugging Face Llama)::

    cp_group = init_context_parallel_group(2, tp_size=2)        # mesh ("dp", "cp", "tp") = (1, 2, 2)
    plan = {
        "model.layers.*.self_attn": ContextParallel(cp_group),   # the sequence over "cp"
        "model.layers.*.self_attn.q_proj": ColwiseParallel(),     # the heads over "tp"
        ...
    }
    parallelize_module(model, cp_group.tp_mesh, plan)           # the mesh the TP styles need
    model = apply_fsdp(model, cp_group)                         # optional, after the plan
    batch = shard_batch(input_ids, cp_group, position_ids=position_ids)
    logits = model(**batch.model_inputs()).logits               # this rank's shard

Note [ContextParallel in a plan]
--------------------------------
What the style does depends on the module it is given, found when the plan is applied:

* A module whose ``forward`` calls ``F.scaled_dot_product_attention`` (itself, or a method or
  function it calls, two calls deep): each call runs inside
  :class:`~cp_dtensor.integrations.context_parallel_sdpa`, so every SDPA call of that forward is
  answered by the strategy.
* A transformers attention module (its ``forward`` looks up ``ALL_ATTENTION_FUNCTIONS``): the module
  gets its own copy of the model's config naming ``"cp_<strategy>"``
  (:func:`~cp_dtensor.integrations.transformers.register`), so its attention call goes to
  :func:`~cp_dtensor.integrations.transformers.cp_attention_forward`, which honours or rejects
  every argument transformers passes. Not through SDPA: a sliding window (Mistral, Qwen2) reaches
  the attention function, never ``F.scaled_dot_product_attention``. The model's own config and its
  other modules are not changed.
* A :class:`~cp_dtensor.ContextParallelAttention`: its group and strategy become the style's.

Anything else raises ``ValueError`` when the plan is applied, since its attention would stay on
this rank's shard; and a ``forward`` that then makes no SDPA call raises at the call.

The mesh. ``parallelize_module`` hands one mesh to every style of a plan, and the TP styles need the
1-D ``"tp"`` mesh, which has no cp axis. So the style takes its :class:`~cp_dtensor.ContextParallelGroup`
and ignores the mesh it is handed, after checking that it is the group's mesh or one of its
sub-meshes: on a ``("dp", "cp", "tp")`` mesh hand the plan ``cp_group.tp_mesh``; without TP,
``cp_group.mesh`` or ``cp_group.cp_mesh``. FSDP2 (:func:`~cp_dtensor.apply_fsdp`) goes after the plan.

Per call. ``cp_group=`` (the group that cut the batch: ``ShardedBatch.cp_group``, e.g. one with a
:class:`~cp_dtensor.DocumentZigzag` layout; the same cp mesh as the style's) and ``cp_document_ids=``
(packed documents, this rank's shard ``(B, S)`` or a DTensor) are keyword arguments of the module's
call, taken off before its ``forward`` runs. ``ShardedBatch.model_inputs()`` passes both, and a
transformers model hands its call's keyword arguments to every attention module; a plain model
passes them down itself. Any other ``cp_`` keyword raises. The layout is the group's
(``cp_group.with_layout(...)`` for another), never a separate option: inputs sharded in one layout
and attended in another would be silently wrong.

Transformers' mask. A transformers model builds its attention mask from the positions it is
given: a zigzag shard's positions jump, which transformers reads as packed sequences, so it makes a
mask of the shard alone, ``(B, 1, S, S)``, wrong under context parallelism. The style drops it once
it has checked that it hides no token from itself (a padding mask does, and raises: express
padding as documents). The strategies build the exact mask on global positions instead. Building
it costs ``B * S * S`` bytes per step, what the registry path
(``attn_implementation="cp_ring"``) never builds: prefer that path for very long shards.

Legend: ``B`` batch, ``S`` local sequence length.
"""

from __future__ import annotations

import ast
import copy
import functools
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ParallelStyle

from cp_dtensor.attention.api import get_strategy
from cp_dtensor.integrations.sdpa import context_parallel_sdpa
from cp_dtensor.integrations.transformers import PREFIX, register
from cp_dtensor.mesh.group import ContextParallelGroup
from cp_dtensor.mesh.sharding import SequenceDTensor, from_local_like, to_local_checked
from cp_dtensor.nn.module import ContextParallelAttention

__all__ = ["CALL_KEYWORDS", "ContextParallel", "attention_kind"]

CALL_KEYWORDS = ("cp_group", "cp_document_ids")
"""Keyword arguments of a parallelized module's call that the style takes off (see Note [ContextParallel in a plan])."""

SDPA, TRANSFORMERS, MODULE = "sdpa", "transformers", "module"  # the three kinds of module the style takes
SEARCH_DEPTH = 2  # calls followed from forward when looking for an SDPA call


class ContextParallel(ParallelStyle):
    """Make a module's attention context-parallel, as an entry of a ``parallelize_module`` plan.

    See Note [ContextParallel in a plan] in :mod:`cp_dtensor.integrations.parallel_style` for the
    modules it takes, the mesh, and the per-call keywords.

    Examples:
        >>> plan = {"layers.*.self_attn": ContextParallel(cp_group, strategy="ring")}  # doctest: +SKIP
        >>> parallelize_module(model, cp_group.mesh, plan)
        >>> logits = model(batch.input_ids, batch.position_ids, cp_document_ids=batch.document_ids)

    Args:
        cp_group: The group from :func:`~cp_dtensor.init_context_parallel_group`. It, not the mesh
            ``parallelize_module`` hands the style, says which ranks share a sequence.
        strategy: A name in :data:`cp_dtensor.STRATEGIES`.
        window: ``(left, right)`` sliding window on global positions for every SDPA call, or ``None``.
            Transformers modules state their own (``sliding_window``), so they refuse this.
        sequence_dtensors: ``False``: the module's sequence inputs and outputs are this rank's shards
            in the group's layout (``shard_batch``, ``partition_sequence``). ``True``: they are
            DTensors placed ``Shard(seq_dim)`` on the cp mesh, in natural order: each is moved into
            the layout on the way in and back on the way out (one all-to-all each, see Note
            [Re-laying out a DTensor] in :mod:`cp_dtensor.mesh.sharding`).
        seq_dim: The sequence dimension of those DTensors.

    Raises:
        ValueError: ``cp_group`` is not a :class:`~cp_dtensor.ContextParallelGroup`, ``strategy`` is
            unknown, or ``window`` is not a pair.
    """

    def __init__(
        self,
        cp_group: ContextParallelGroup,
        *,
        strategy: str = "ring",
        window: tuple[int | None, int | None] | None = None,
        sequence_dtensors: bool = False,
        seq_dim: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(cp_group, ContextParallelGroup):
            raise ValueError(
                f"ContextParallel takes the ContextParallelGroup from init_context_parallel_group, got "
                f"{type(cp_group).__name__}."
            )
        get_strategy(strategy)  # an unknown name raises, listing the valid ones
        if window is not None and not (isinstance(window, tuple) and len(window) == 2):
            raise ValueError(f"window must be None or a pair (left, right), got {window!r}.")
        self.cp_group, self.strategy, self.window = cp_group, strategy, window
        self.sequence_dtensors, self.seq_dim = sequence_dtensors, seq_dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check_mesh(device_mesh, self.cp_group)
        if _is_parallelized(module):
            raise ValueError(f"{type(module).__name__} is context-parallel already: give it one ContextParallel.")
        kind = attention_kind(module)
        if kind == TRANSFORMERS:
            if self.window is not None:
                raise ValueError(
                    f"ContextParallel(window={self.window}) on the transformers module {type(module).__name__}: "
                    "transformers modules pass their own sliding_window; leave window=None."
                )
            register()
            module.config = copy.deepcopy(module.config)  # this module's alone: the model's config is untouched
            module.config._attn_implementation = PREFIX + self.strategy
        elif kind == MODULE:
            module.cp_group, module.strategy = self.cp_group, self.strategy
        calls: list[_Call] = []  # one entry per call in progress, from the pre-hook to the hook
        module.register_forward_pre_hook(functools.partial(self._before, kind, calls), with_kwargs=True)
        module.register_forward_hook(functools.partial(self._after, calls), always_call=True)
        return module

    def _before(self, kind: str, calls: list, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Take off the per-call keywords, move DTensor inputs into the layout, route the attention."""
        call = _Call()
        calls.append(call)  # first: the hook pops it even if this raises
        kwargs = dict(kwargs)
        group, document_ids = self._call_options(kwargs)
        (args, kwargs), call.like = self._local_inputs((args, kwargs), group)
        if kind == TRANSFORMERS:
            args, kwargs = _drop_shard_mask(module, args, kwargs)
            kwargs.update(cp_group=group, cp_document_ids=document_ids)
        elif kind == MODULE:
            call.module_group, module.cp_group = module.cp_group, group
            options = {"document_ids": document_ids, "window": self.window}
            kwargs.update({k: v for k, v in options.items() if v is not None})
        else:
            call.mode = _CountingSDPA(group, strategy=self.strategy, document_ids=document_ids, window=self.window)
            call.mode.__enter__()  # last: nothing after it can raise and leave the mode on
        return args, kwargs

    def _after(self, calls: list, module: nn.Module, args: tuple, output: Any) -> Any:
        """Leave the mode, restore the module's group, check an SDPA call was made, wrap outputs as the inputs were."""
        if not calls:  # an earlier pre-hook raised before ours ran
            return None
        call = calls.pop()
        if call.mode is not None:
            call.mode.__exit__(None, None, None)
        if call.module_group is not None:
            module.cp_group = call.module_group
        if output is None:  # forward raised: cleaning up was all there was to do
            return None
        if call.mode is not None and call.mode.num_calls == 0:
            raise ValueError(
                f"{type(module).__name__}.forward made no F.scaled_dot_product_attention call under ContextParallel: "
                "its attention ran on this rank's shard alone. Apply the style to the module that calls SDPA."
            )
        return None if call.like is None else _map_tensors(lambda t: from_local_like(t, call.like), output)

    def _call_options(self, kwargs: dict) -> tuple[ContextParallelGroup, Any]:
        """Pop this call's ``cp_group`` and ``cp_document_ids`` from ``kwargs``; refuse other ``cp_`` keywords."""
        unknown = sorted(k for k in kwargs if k.startswith("cp_") and k not in CALL_KEYWORDS)
        if unknown:
            raise ValueError(
                f"ContextParallel got unknown keyword(s) {unknown}; per call it takes {list(CALL_KEYWORDS)}."
            )
        group = kwargs.pop("cp_group", None)
        if group is None:
            group = self.cp_group
        elif not isinstance(group, ContextParallelGroup) or group.cp_mesh != self.cp_group.cp_mesh:
            raise ValueError(
                f"cp_group= of a call must be a ContextParallelGroup on the style's cp mesh {self.cp_group.cp_mesh} "
                f"(ShardedBatch.cp_group, or cp_group.with_layout(...)), got {group!r}."
            )
        return group, kwargs.pop("cp_document_ids", None)

    def _local_inputs(self, tree: Any, group: ContextParallelGroup) -> tuple[Any, SequenceDTensor | None]:
        """``tree`` with its DTensors on the cp mesh moved into ``group``'s layout, and how to wrap outputs."""
        found = [t for t in _tensors(tree) if isinstance(t, DTensor) and t.device_mesh == group.cp_mesh]
        if not self.sequence_dtensors:
            if found:
                raise ValueError(
                    "ContextParallel got a DTensor on the cp mesh, but takes local shards in the group's layout: "
                    "pass ContextParallel(..., sequence_dtensors=True) for natural-order DTensors."
                )
            return tree, None
        if not found:
            raise ValueError(
                f"ContextParallel(sequence_dtensors=True) got no DTensor on the cp mesh: pass the sequence as "
                f"cp_group.distribute_sequence(x, seq_dim={self.seq_dim}), or use sequence_dtensors=False."
            )
        locals_, like = to_local_checked(found, group, self.seq_dim)
        swap = {id(t): local for t, local in zip(found, locals_)}
        return _map_tensors(lambda t: swap.get(id(t), t), tree), like


@dataclass
class _Call:
    """What one call of a parallelized module carries from its pre-hook to its hook."""

    like: SequenceDTensor | None = None
    mode: _CountingSDPA | None = None
    module_group: ContextParallelGroup | None = None


class _CountingSDPA(context_parallel_sdpa):
    """The SDPA mode, counting the calls it answers: a forward that made none attended on its shard alone."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_calls = 0

    def _attend(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.num_calls += 1
        return super()._attend(*args, **kwargs)


# ---- which module, which mesh -------------------------------------------------------------------------


def attention_kind(module: nn.Module) -> str:
    """How :class:`ContextParallel` makes ``module``'s attention context-parallel (Note [ContextParallel in a plan]).

    Args:
        module: The module a plan entry names.

    Returns:
        ``"module"`` (a :class:`~cp_dtensor.ContextParallelAttention`), ``"transformers"`` (a transformers
        attention module) or ``"sdpa"`` (``forward`` calls ``F.scaled_dot_product_attention``).

    Raises:
        ValueError: None of the three: the module's attention would stay on this rank's shard.
    """
    if isinstance(module, ContextParallelAttention):
        return MODULE
    forward = getattr(module.forward, "__func__", module.forward)
    names, _ = _read(forward, type(module))
    if "ALL_ATTENTION_FUNCTIONS" in names and hasattr(getattr(module, "config", None), "_attn_implementation"):
        return TRANSFORMERS
    if _calls_sdpa(forward, type(module), SEARCH_DEPTH, set()):
        return SDPA
    raise ValueError(
        f"ContextParallel needs a module whose forward calls F.scaled_dot_product_attention, a transformers "
        f"attention module or a ContextParallelAttention; {type(module).__name__}.forward calls no SDPA (looked "
        f"{SEARCH_DEPTH} calls deep), so its attention would stay on this rank's shard. Put the style on the "
        "attention module itself (e.g. '*.self_attn')."
    )


def _read(fn: Callable, owner: type) -> tuple[set[str], list[Callable]]:
    """The names ``fn``'s source mentions, and the Python functions it calls (globals, ``self.`` methods, ``mod.f``)."""
    fn = inspect.unwrap(fn)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):  # no source (a builtin, a REPL function): nothing to follow
        return set(), []
    names, callees = set(), []
    scope = getattr(fn, "__globals__", {})
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        if isinstance(node, ast.Call):
            callees.append(_resolve(node.func, owner, scope))
    return names, [c for c in callees if inspect.isfunction(c)]


def _resolve(func: ast.expr, owner: type, scope: dict) -> object:
    """What a call's ``f``, ``self.f`` or ``mod.f`` names, when it can be found without running anything."""
    if isinstance(func, ast.Name):
        return scope.get(func.id)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        base = owner if func.value.id == "self" else scope.get(func.value.id)
        return inspect.getattr_static(base, func.attr, None) if base is not None else None
    return None


def _calls_sdpa(fn: Callable, owner: type, depth: int, seen: set) -> bool:
    """Whether ``fn``, or a function it calls up to ``depth`` calls deep, mentions ``scaled_dot_product_attention``."""
    if fn in seen:
        return False
    seen.add(fn)
    names, callees = _read(fn, owner)
    if "scaled_dot_product_attention" in names:
        return True
    return depth > 0 and any(_calls_sdpa(c, owner, depth - 1, seen) for c in callees)


def _check_mesh(mesh: DeviceMesh, group: ContextParallelGroup) -> None:
    """Raise unless ``mesh`` is ``group``'s mesh or a sub-mesh of it (the style ignores it; a stranger is a mistake)."""
    names = tuple(mesh.mesh_dim_names or ())
    root_names = tuple(group.mesh.mesh_dim_names or ())
    known = [group.mesh, group.cp_mesh, group.flat_dp_cp_mesh]
    if names and tuple(n for n in root_names if n in names) == names:
        known.append(group.mesh[names])
    if not any(m is not None and mesh == m for m in known):
        raise ValueError(
            f"parallelize_module handed ContextParallel the mesh {mesh}, which is not its group's mesh "
            f"{group.mesh} or a sub-mesh of it: pass cp_group.tp_mesh for a plan with TP styles, else cp_group.mesh."
        )


def _is_parallelized(module: nn.Module) -> bool:
    """Whether a :class:`ContextParallel` already hooks ``module``."""
    return any(
        isinstance(getattr(getattr(hook, "func", None), "__self__", None), ContextParallel)
        for hook in module._forward_pre_hooks.values()
    )


# ---- inputs and outputs ---------------------------------------------------------------------------------


def _tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors in nested tuples, lists and dicts, in order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [t for item in tree for t in _tensors(item)]
    if isinstance(tree, dict):
        return [t for item in tree.values() for t in _tensors(item)]
    return []


def _map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], tree: Any) -> Any:
    """``tree`` with ``fn`` applied to each tensor in nested tuples, lists and dicts."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map_tensors(fn, item) for item in tree)
    if isinstance(tree, dict):
        return {k: _map_tensors(fn, v) for k, v in tree.items()}
    return tree


def _drop_shard_mask(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call with transformers' mask of the shard set to ``None`` (see Note [ContextParallel in a plan]).

    Raises:
        ValueError: The mask hides a token from itself (padding), or is not a 4-D tensor.
    """
    params = list(inspect.signature(module.forward).parameters)
    index = params.index("attention_mask") if "attention_mask" in params else None
    if "attention_mask" in kwargs:
        _check_shard_mask(kwargs["attention_mask"])
        kwargs["attention_mask"] = None
    elif index is not None and index < len(args):
        _check_shard_mask(args[index])
        args = (*args[:index], None, *args[index + 1 :])
    return args, kwargs


def _check_shard_mask(mask: Any) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError(
            f"ContextParallel got an attention_mask {type(mask).__name__} it cannot read (a 4-D tensor, or None, is "
            "what transformers makes with attn_implementation='sdpa' or 'eager'): build the model with one of those."
        )
    diagonal = mask.diagonal(dim1=-2, dim2=-1)
    if not bool((diagonal if mask.dtype == torch.bool else diagonal == 0).all()):
        raise ValueError(
            "ContextParallel got an attention_mask that hides a token from itself: a padding mask, which cannot be "
            "sharded. Express padding and packing as documents (shard_batch(position_ids=... or cu_seqlens=...))."
        )
