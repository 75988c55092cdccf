"""How many bytes each strategy sends per rank, forward and backward: the communication model.

Pure arithmetic, no ranks. "Bytes sent" is defined in Note [Bytes sent] in
:mod:`cp_dtensor.comm.collectives` (the payload that leaves the rank), and the model names bytes by the
operation that :func:`cp_dtensor.count_comm` reports them under, so a test can compare the two
dictionaries exactly.

Symbols: ``B`` batch, ``L`` global sequence length, ``S = L / P`` tokens per rank, ``H`` query
heads, ``H_kv`` K/V heads, ``D`` head dim, ``P`` cp ranks, ``e`` bytes per element of the inputs,
``a`` bytes per element of the gradient accumulators (4, or 8 for fp64 inputs). One K/V shard
(K and V of one rank) is ``KV = 2 B H_kv S D e`` bytes; its fp32 gradient ``dKV = 2 B H_kv S D a``.

=========  ======================================  ===================================================
strategy   forward                                 backward
=========  ======================================  ===================================================
ring       ``(P-1) KV``                            ``(P-1) KV + P dKV``
allgather  ``(P-1) KV``                            ``(P-1) KV + (P-1) dKV``
ulysses    ``(P-1)/P (2 B H S D e + r KV)``        same as forward (``dout``, ``dq``, ``dk``, ``dv``)
hybrid     Ulysses over ``u`` + ring over ``P/u``  Ulysses over ``u`` + ring over ``P/u``
=========  ======================================  ===================================================

with ``r = P / gcd(H_kv, P)`` copies of each K/V head (1 when ``P`` divides ``H_kv``). The hybrid
ring passes the group's replicated K/V: blocks of ``r_u KV`` bytes, ``r_u = u / gcd(H_kv, u)``.
A ring of one rank sends nothing (its gradient never leaves home).

The dispatch strategy moves what the mask needs, so its bytes depend on the mask and the layout,
not on the shapes alone, and differ by rank: :func:`dispatch_bytes` computes the same routes the
strategy computes (:func:`cp_dtensor.positions.dispatch.routes`) and prices them. A rank sending ``n``
rows and receiving ``m`` sends ``n`` rows of K/V (``2 B H_kv D e`` bytes each) in the forward and again
in the backward, and the gradients of the ``m`` rows it received (``2 B H_kv D a`` each) home.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from cp_dtensor.local.kernels import accum_dtype
from cp_dtensor.positions.dispatch import routes
from cp_dtensor.positions.layout import Run
from cp_dtensor.positions.masks import MaskSpec

__all__ = ["CommVolume", "comm_bytes", "dispatch_bytes", "MODELS"]


@dataclass(frozen=True)
class CommVolume:
    """Bytes one rank sends in one attention call, by operation name.

    Attributes:
        forward: ``{op name: bytes}`` of the forward (only operations that send something).
        backward: ``{op name: bytes}`` of the backward.
    """

    forward: dict[str, int] = field(default_factory=dict)
    backward: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Forward plus backward bytes."""
        return sum(self.forward.values()) + sum(self.backward.values())


@dataclass(frozen=True)
class _Shape:
    batch: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int
    world_size: int
    elem: int  # bytes per input element
    acc: int  # bytes per accumulator element

    def tokens_bytes(self, heads: int, elem: int) -> int:
        """Bytes of ``heads`` heads of one rank's ``S`` tokens."""
        return self.batch * heads * (self.seq_len // self.world_size) * self.head_dim * elem


def _nonzero(**ops: int) -> dict[str, int]:
    return {op: n for op, n in ops.items() if n}


def _ulysses_ring(s: _Shape, u: int) -> CommVolume:
    """Ulysses all-to-all over ``u`` ranks, then a ring over ``P / u`` groups (u=1: ring, u=P: Ulysses)."""
    r = u // math.gcd(s.kv_heads, u)  # copies of each K/V head
    ring = s.world_size // u
    kv_block = 2 * s.tokens_bytes(s.kv_heads * r, s.elem)  # K and V, replicated, of the group's share
    # all-to-all keeps 1/u of its input: q, k, v in; out back (backward: dout in; dq, dk, dv back)
    a2a = (u - 1) * (2 * s.tokens_bytes(s.heads, s.elem) + kv_block) // u
    grad_block = 2 * s.tokens_bytes(s.kv_heads * r, s.acc)
    grad_hops = ring if ring > 1 else 0
    return CommVolume(
        forward=_nonzero(all_to_all=a2a, ring_send=(ring - 1) * kv_block),
        backward=_nonzero(all_to_all=a2a, ring_send=(ring - 1) * kv_block, ring_send_grad=grad_hops * grad_block),
    )


def _ring(s: _Shape, ulysses_size: int | None) -> CommVolume:
    return _ulysses_ring(s, 1)


def _ulysses(s: _Shape, ulysses_size: int | None) -> CommVolume:
    return _ulysses_ring(s, s.world_size)


def _hybrid(s: _Shape, ulysses_size: int | None) -> CommVolume:
    if ulysses_size is None or s.world_size % ulysses_size:
        raise ValueError(f"hybrid needs ulysses_size dividing world_size={s.world_size}, got {ulysses_size!r}.")
    return _ulysses_ring(s, ulysses_size)


def _allgather(s: _Shape, ulysses_size: int | None) -> CommVolume:
    p = s.world_size
    kv = 2 * s.tokens_bytes(s.kv_heads, s.elem)
    dkv = 2 * s.tokens_bytes(s.kv_heads, s.acc)
    return CommVolume(
        forward=_nonzero(all_gather=(p - 1) * kv),
        backward=_nonzero(all_gather=(p - 1) * kv, reduce_scatter=(p - 1) * dkv),
    )


MODELS = {"ring": _ring, "ulysses": _ulysses, "allgather": _allgather, "hybrid": _hybrid}


def comm_bytes(
    strategy: str,
    *,
    batch: int,
    seq_len: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    world_size: int,
    dtype: torch.dtype,
    ulysses_size: int | None = None,
) -> CommVolume:
    """Bytes one rank sends for one attention call of ``strategy``, forward and backward.

    Args:
        strategy: ``"ring"``, ``"ulysses"``, ``"allgather"`` or ``"hybrid"``.
        batch: ``B``.
        seq_len: Global sequence length ``L`` (a multiple of ``world_size``).
        heads: Query heads ``H``.
        kv_heads: K/V heads ``H_kv`` (dividing ``H``).
        head_dim: ``D``.
        world_size: cp ranks ``P``.
        dtype: dtype of ``q``, ``k``, ``v``.
        ulysses_size: ``u`` for ``"hybrid"`` (ignored by the others).

    Returns:
        The :class:`CommVolume`, by the operation names :func:`cp_dtensor.count_comm` reports.

    Raises:
        ValueError: Unknown strategy, or ``"hybrid"`` without a ``ulysses_size`` dividing ``world_size``.
    """
    if strategy == "dispatch":
        raise ValueError(
            "strategy 'dispatch' moves what the mask needs, which the shapes alone do not tell: use "
            "dispatch_bytes(mask, shard_runs, rank, ...)."
        )
    if strategy not in MODELS:
        raise ValueError(f"Invalid strategy {strategy!r}. Must be one of: {', '.join(map(repr, MODELS))}.")
    shape = _Shape(
        batch, seq_len, heads, kv_heads, head_dim, world_size, elem=dtype.itemsize, acc=accum_dtype(dtype).itemsize
    )
    return MODELS[strategy](shape, ulysses_size)


def dispatch_bytes(
    mask: MaskSpec,
    shard_runs: list[list[Run]],
    rank: int,
    *,
    batch: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    sharded_ids_itemsize: int = 0,
) -> CommVolume:
    """Bytes rank ``rank`` sends for one call of the dispatch strategy, forward and backward.

    Args:
        mask: The call's mask on global positions (``MaskSpec(causal=...)`` for plain attention).
        shard_runs: ``shard_runs[r]``: the runs of rank ``r``'s tokens (``cp_group.runs(L, r)``).
        rank: The rank whose bytes are wanted.
        batch: ``B``.
        kv_heads: ``H_kv`` (K/V move un-repeated).
        head_dim: ``D``.
        dtype: dtype of ``q``, ``k``, ``v``.
        sharded_ids_itemsize: Bytes per element of ``document_ids`` when each rank passes its own
            shard (they are gathered once, in the forward); 0 when they are passed whole.

    Returns:
        The :class:`CommVolume`, by the operation names :func:`cp_dtensor.count_comm` reports
        (``dispatch_kv``, ``dispatch_grad``, ``mask_gather``).
    """
    size = len(shard_runs)
    if size == 1:
        return CommVolume()
    rt = routes(mask, shard_runs, rank)
    row = 2 * batch * kv_heads * head_dim  # K and V of one token, elements
    kv = rt.sent() * row * dtype.itemsize
    grads = sum(rt.recv_rows) * row * accum_dtype(dtype).itemsize
    ids = batch * sum(n for _, n in shard_runs[rank]) * sharded_ids_itemsize * (size - 1)
    return CommVolume(
        forward=_nonzero(dispatch_kv=kv, mask_gather=ids), backward=_nonzero(dispatch_kv=kv, dispatch_grad=grads)
    )
