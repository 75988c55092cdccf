"""A strategy is a value: what each way of splitting attention across the cp axis must provide.

Each strategy module (:mod:`~cp_dtensor.attention.ring`, :mod:`~cp_dtensor.attention.ulysses`,
:mod:`~cp_dtensor.attention.allgather`, :mod:`~cp_dtensor.attention.hybrid`) defines one
:class:`Strategy` and registers it under its name with :func:`register`; it imports nothing above
this module. The executor (:mod:`cp_dtensor.attention.executor`) runs any registered strategy, eagerly
through one autograd function or compiled through one custom operator, and finds it by name: no
runner imports a strategy.

A strategy's own keyword arguments are the fields of its :attr:`Strategy.Options` dataclass (JSON
values only: they travel in compiled graphs as text). Adding one touches that strategy's module and
that one field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from cp_dtensor.local.kernels import accum_dtype

if TYPE_CHECKING:
    from cp_dtensor.attention.call import AttentionCall
    from cp_dtensor.mesh.group import ContextParallelGroup

__all__ = ["NoOptions", "Strategy", "register", "registered", "strategy_names"]


@dataclass(frozen=True)
class NoOptions:
    """The options of a strategy that takes none beyond the common ones."""


class Strategy:
    """One way to compute exact attention over a sequence sharded across the cp axis.

    Subclasses set the class attributes and implement the four methods. Tensors are local shards:
    ``q`` ``(B, H, S, D)``, ``k`` and ``v`` ``(B, H_kv, S, D)``.

    Attributes:
        name: The name users pass as ``strategy=`` (``"ring"``).
        function: The public function's name, for messages (``"ring_attention"``).
        Options: The dataclass of the strategy's own keyword arguments.
    """

    name: ClassVar[str]
    function: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    option_names: ClassVar[tuple[str, ...]] = ()
    """The field names of :attr:`Options`, set by :func:`register`."""

    def plan(self, call: AttentionCall) -> Any:
        """Everything the forward and backward need besides the tensors, from the resolved call.

        Raises:
            ValueError: The call cannot be served (an option out of range, heads that do not split).
        """
        raise NotImplementedError

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Any
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """``(out, lse, saved)``: ``out`` like ``q``; ``lse`` fp32 (fp64 for fp64); ``saved`` what the backward needs.

        ``saved`` holds the tensors beyond the inputs, ``out`` and ``lse`` (zero or four of them).
        """
        raise NotImplementedError

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        saved: tuple[torch.Tensor, ...],
        plan: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dq, dk, dv)`` shaped and typed like ``q``, ``k``, ``v``."""
        raise NotImplementedError

    def fake(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group: ContextParallelGroup, options: Any
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``(lse, saved)`` as empty tensors of the forward's shapes, for the compiler.

        From shapes and sizes alone: no planning, no communication; shapes may be symbolic. This
        default serves strategies whose queries stay in place (``lse`` ``(B, H, S)``, nothing saved).
        """
        return q.new_empty(q.shape[:3], dtype=accum_dtype(q.dtype)), ()


_REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Make ``strategy`` findable by its name, and return it: each strategy module ends with one such line."""
    assert strategy.name not in _REGISTRY, f"strategy {strategy.name!r} registered twice"
    type(strategy).option_names = tuple(f.name for f in dataclasses.fields(strategy.Options))
    _REGISTRY[strategy.name] = strategy
    return strategy


def strategy_names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_REGISTRY)


def registered(name: str) -> Strategy:
    """The strategy registered as ``name``.

    Raises:
        ValueError: No strategy has that name, naming the valid ones.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Invalid strategy {name!r}. Must be one of: {', '.join(map(repr, _REGISTRY))}.")
    return _REGISTRY[name]
