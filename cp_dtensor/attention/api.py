"""The public attention functions: one per strategy, and one switch over them.

Every function takes the same arguments: local shards (or sequence-sharded DTensors) ``q``, ``k``,
``v``, the ``cp_group``, and keyword arguments: those of
:class:`~cp_dtensor.attention.call.AttentionOptions` (``causal``, ``scale``, ``document_ids``,
``window``, ``seq_len``, ``validate``, ``debug_check``), written once there, and the strategy's own
(all-gather: ``kv_heads_per_gather``; dispatch: ``schedule``). Each runs :func:`~cp_dtensor.attention.executor.execute`.

Importing this module registers the five strategies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from cp_dtensor.attention import allgather, dispatch, hybrid, ring, ulysses
from cp_dtensor.attention.executor import execute

if TYPE_CHECKING:
    from cp_dtensor.mesh.group import ContextParallelGroup

__all__ = [
    "STRATEGIES",
    "allgather_kv_attention",
    "context_parallel_attention",
    "dispatch_attention",
    "get_strategy",
    "hybrid_attention",
    "ring_attention",
    "ulysses_attention",
]


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group: ContextParallelGroup, **kwargs: Any
) -> torch.Tensor:
    """Exact attention over the whole sequence, from this rank's shards, by passing K/V around a ring.

    See :mod:`cp_dtensor.attention.ring` (Note [The two rings] maps it onto the reference).

    Args:
        q: Local queries ``(B, H, S_local, D)``, as ``cp_group.partition_sequence(q, seq_dim=2)``
            makes them; or a DTensor sharded ``Shard(2)`` on the cp mesh, in natural order
            (``distribute_tensor``): moved into the layout and back, one all-to-all per tensor
            (see Note [Re-laying out a DTensor] in :mod:`cp_dtensor.mesh.sharding`).
        k: Local keys ``(B, H_kv, S_local, D)``; ``H_kv`` divides ``H`` (GQA). Rotated un-expanded.
        v: Local values, same shape as ``k``.
        cp_group: The group from :func:`~cp_dtensor.init_context_parallel_group`.
        **kwargs: ``causal``, ``scale``, ``document_ids``, ``window``, ``seq_len``, ``validate``,
            ``debug_check``: see :class:`~cp_dtensor.attention.call.AttentionOptions`; and the ring's
            own ``batched_p2p`` (:class:`~cp_dtensor.attention.ring.RingOptions`).

    Returns:
        The local output ``(B, H, S_local, D)`` in ``q``'s dtype (a DTensor if ``q`` was one).
        Differentiable with respect to ``q``, ``k`` and ``v``.

    Raises:
        ValueError: Bad shapes, dtypes, devices, head counts, a local length that does not fit the
            layout (zigzag needs an even local length), DTensors not sharded on the sequence dim, a
            malformed mask argument, or an unknown keyword; with ``validate``, ranks that disagree
            (the same error on every rank).
    """
    return execute(ring.RING.name, q, k, v, cp_group, kwargs)


def ulysses_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group: ContextParallelGroup, **kwargs: Any
) -> torch.Tensor:
    """Exact attention over the whole sequence by exchanging token shards for head shards.

    See Note [Ulysses all-to-all] in :mod:`cp_dtensor.attention.ulysses`. Uses the whole cp axis for
    the all-to-all: the cp size ``P`` must divide ``H``. If ``P`` does not divide ``H_kv`` the K/V
    heads are repeated just enough (``P / gcd(H_kv, P)`` times).

    Args:
        q: Local queries ``(B, H, S_local, D)`` or a DTensor, as in :func:`ring_attention`.
        k: Local keys ``(B, H_kv, S_local, D)``.
        v: Local values, same shape as ``k``.
        cp_group: The group from :func:`~cp_dtensor.init_context_parallel_group`, any layout.
        **kwargs: The common ones of :func:`ring_attention`.

    Returns:
        The local output ``(B, H, S_local, D)``, as :func:`ring_attention`.

    Raises:
        ValueError: ``P`` does not divide ``H`` (use ring); or as :func:`ring_attention`.
    """
    return execute(ulysses.ULYSSES.name, q, k, v, cp_group, kwargs)


def allgather_kv_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group: ContextParallelGroup, **kwargs: Any
) -> torch.Tensor:
    """Exact attention over the whole sequence by all-gathering K/V; the queries stay local.

    See :mod:`cp_dtensor.attention.allgather`.

    Args:
        q: Local queries ``(B, H, S_local, D)`` or a DTensor, as in :func:`ring_attention`.
        k: Local keys ``(B, H_kv, S_local, D)``; gathered un-expanded.
        v: Local values, same shape as ``k``.
        cp_group: The group from :func:`~cp_dtensor.init_context_parallel_group`, any layout.
        **kwargs: The common ones of :func:`ring_attention`, and ``kv_heads_per_gather``
            (:class:`~cp_dtensor.attention.allgather.AllGatherOptions`).

    Returns:
        The local output ``(B, H, S_local, D)``, as :func:`ring_attention`.

    Raises:
        ValueError: ``kv_heads_per_gather`` is not a positive int, or as :func:`ring_attention`.
    """
    return execute(allgather.ALLGATHER.name, q, k, v, cp_group, kwargs)


def hybrid_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group: ContextParallelGroup, **kwargs: Any
) -> torch.Tensor:
    """Exact attention: Ulysses all-to-all within groups of ``u`` ranks, ring attention across groups.

    See :mod:`cp_dtensor.attention.hybrid`. ``u`` must divide ``H``; if it does not divide ``H_kv``
    the K/V heads are repeated ``u / gcd(H_kv, u)`` times.

    Args:
        q: Local queries ``(B, H, S_local, D)`` or a DTensor, as in :func:`ring_attention`.
        k: Local keys ``(B, H_kv, S_local, D)``.
        v: Local values, same shape as ``k``.
        cp_group: A group built with ``init_context_parallel_group(cp_size, ulysses_size=u)``.
        **kwargs: The common ones of :func:`ring_attention`.

    Returns:
        The local output ``(B, H, S_local, D)``, as :func:`ring_attention`.

    Raises:
        ValueError: ``cp_group`` has no Ulysses axis, ``u`` does not divide ``H``, or as
            :func:`ring_attention`.
    """
    return execute(hybrid.HYBRID.name, q, k, v, cp_group, kwargs)


def dispatch_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group: ContextParallelGroup, **kwargs: Any
) -> torch.Tensor:
    """Exact attention that moves only the K/V rows the mask lets the local queries see.

    See :mod:`cp_dtensor.attention.dispatch`. For packed documents and sliding windows, where most
    of the sequence is invisible to most queries; under plain causal attention it moves about what
    all-gather moves.

    Args:
        q: Local queries ``(B, H, S_local, D)`` or a DTensor, as in :func:`ring_attention`.
        k: Local keys ``(B, H_kv, S_local, D)``; sent un-expanded.
        v: Local values, same shape as ``k``.
        cp_group: The group from :func:`~cp_dtensor.init_context_parallel_group`, any layout.
        **kwargs: The common ones of :func:`ring_attention`, and ``schedule`` and ``batched_p2p``
            (:class:`~cp_dtensor.attention.dispatch.DispatchOptions`).

    Returns:
        The local output ``(B, H, S_local, D)``, as :func:`ring_attention`.

    Raises:
        ValueError: ``schedule`` is not ``"pairwise"`` or ``"alltoall"``, or as :func:`ring_attention`.
    """
    return execute(dispatch.DISPATCH.name, q, k, v, cp_group, kwargs)


STRATEGIES: dict[str, Callable[..., torch.Tensor]] = {
    "ring": ring_attention,
    "ulysses": ulysses_attention,
    "allgather": allgather_kv_attention,
    "hybrid": hybrid_attention,  # needs init_context_parallel_group(..., ulysses_size=u)
    "dispatch": dispatch_attention,  # moves only the K/V rows the mask needs
}
"""Strategy name -> its attention function; every one takes the arguments of :func:`ring_attention`."""


def get_strategy(name: str) -> Callable[..., torch.Tensor]:
    """The attention function registered as ``name``.

    Raises:
        ValueError: ``name`` is not one of :data:`STRATEGIES`.
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"Invalid strategy {name!r}. Must be one of: {', '.join(map(repr, STRATEGIES))}"
            + (", or 'auto' (import cp_dtensor to register it)." if name == "auto" else ", or 'auto'.")
        )
    return STRATEGIES[name]


_AUTO_CHOOSER: list[Callable[..., Any]] = []
"""Set once at import by :mod:`cp_dtensor.estimate.planner` (a layer above): ``(q, k, cp_group, causal)`` -> choice."""


def set_auto_chooser(chooser: Callable[..., Any]) -> None:
    """Register what ``strategy="auto"`` asks (the planner's attention model); called once, at its import."""
    _AUTO_CHOOSER[:] = [chooser]


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cp_group: ContextParallelGroup,
    *,
    strategy: str = "ring",
    **kwargs: Any,
) -> torch.Tensor:
    """Exact attention over the sharded sequence with the chosen ``strategy``.

    Args:
        q: Local queries ``(B, H, S_local, D)`` or a DTensor, as in :func:`ring_attention`.
        k: Local keys ``(B, H_kv, S_local, D)``.
        v: Local values, same shape as ``k``.
        cp_group: The context-parallel group.
        strategy: One of :data:`STRATEGIES`: ``"ring"``, ``"ulysses"``, ``"allgather"``, ``"hybrid"``,
            ``"dispatch"``;
            or ``"auto"``: the one the planner's model predicts fastest for these shapes, group and
            device (cached per shape; :func:`cp_dtensor.estimate.planner.auto_strategy` says which and why).
        **kwargs: As the strategy's function.

    Returns:
        The local output ``(B, H, S_local, D)``, as :func:`ring_attention`.

    Raises:
        ValueError: An unknown ``strategy``, or as the strategy's function.
    """
    if strategy == "auto" and _AUTO_CHOOSER:
        strategy = _AUTO_CHOOSER[0](q, k, cp_group, causal=kwargs.get("causal", False)).strategy
    return get_strategy(strategy)(q, k, v, cp_group, **kwargs)
