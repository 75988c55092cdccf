"""Ring attention, simulated on P virtual ranks in one process: forward and backward.

Full-length tensors go in and come out; inside, the sequence is sharded with a layout
(`cp_dtensor.reference.layouts`), and each virtual rank only ever touches its own shard and the one K/V
block in its buffer, exactly as a real rank would. The math of one block lives in
`cp_dtensor.reference.attention`; this file owns the ranks, the buffers and the "sends".
Its production twin is `cp_dtensor/attention/ring.py`: Note [The two rings] there maps the names and
names the three differences.

Note [Ring schedule]
    Rank ``r`` keeps its query shard ``Q_r`` for the whole pass. Its K/V buffer starts as its own
    ``(K_r, V_r)``. At every step each rank attends ``Q_r`` to the block in its buffer, merges the
    result into its running ``(out, lse)``, and sends the buffer to rank ``r + 1`` (receiving rank
    ``r - 1``'s). So at step ``t`` rank ``r`` holds the block of rank ``(r - t) mod P``
    (``P = 4``)::

                   step 0  step 1  step 2  step 3
            rank 0   kv0     kv3     kv2     kv1
            rank 1   kv1     kv0     kv3     kv2
            rank 2   kv2     kv1     kv0     kv3
            rank 3   kv3     kv2     kv1     kv0

    After ``P`` steps every rank has met every block. The forward needs ``P - 1`` sends (the last
    block is not passed on). The backward walks the same schedule; the dK/dV accumulators travel
    with their K/V block, and one more send (``P`` in all) brings each accumulator home.

    A mask (`cp_dtensor.reference.masks`: causal, packed documents, a window, padding) does not change the
    schedule: it decides, from the global positions of ``Q_r`` and of the held block, which pairs
    a step computes, and a step whose block the mask hides entirely is skipped. The simulation
    always runs all ``P`` steps so that the trace shows every skipped block;
    `cp_dtensor.reference.trace.ring_steps_needed` tells after how many steps a real ring may stop.

Shape legend: B batch, H query heads, H_kv key/value heads, L sequence length, P world size,
S = L / P tokens per rank, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TypeVar

import torch
from torch.autograd.function import once_differentiable

from .attention import (
    attention_block,
    attention_block_backward,
    check_attention_inputs,
    default_scale,
)
from .layouts import shard, shard_indices, unshard
from .masks import AttentionMask, make_mask
from .trace import TraceEntry, make_entry

__all__ = [
    "KVBuffer",
    "merge",
    "send_to_next_rank",
    "simulate_ring_attention",
    "simulate_ring_attention_backward",
    "simulate_ring_attention_forward",
]

T = TypeVar("T")


@dataclass
class KVBuffer:
    """The K/V block a rank currently holds: what travels around the ring."""

    source: int
    """The rank this block belongs to (its home)."""
    k: torch.Tensor
    """Keys, shape (B, H_kv, S, D)."""
    v: torch.Tensor
    """Values, shape (B, H_kv, S, D)."""
    dk: torch.Tensor | None = None
    """Backward only: gradient accumulated for ``k`` so far, shape (B, H_kv, S, D)."""
    dv: torch.Tensor | None = None
    """Backward only: gradient accumulated for ``v`` so far, shape (B, H_kv, S, D)."""


def send_to_next_rank(buffers: list[T]) -> list[T]:
    """One hop of the ring: rank ``r`` sends its buffer to rank ``(r + 1) % P``.

    Args:
        buffers: What each of the P ranks holds, indexed by rank.

    Returns:
        What each rank holds after the hop: rank ``r`` now has rank ``r - 1``'s buffer.
    """
    return buffers[-1:] + buffers[:-1]


def merge(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one block's partial attention result into a running one (the online-softmax merge).

    A partial result over a set of keys ``A`` is its softmax-weighted average of values and the
    log of its softmax denominator (``s_j`` the scores of one query row)::

        out_A = sum_{j in A} exp(s_j - lse_A) * v_j,      lse_A = log sum_{j in A} exp(s_j)

    For two disjoint key sets ``A`` and ``B``, the result over ``A + B`` is::

        lse = log(exp(lse_A) + exp(lse_B))                 (torch.logaddexp, stable)
        out = exp(lse_A - lse) * out_A + exp(lse_B - lse) * out_B

    The two weights lie in [0, 1] and sum to 1: each partial output is re-weighted by its share
    of the common denominator. Adding the partial outputs (``output += attn``) is wrong, because
    each was normalised by its own denominator. A row that has seen no key yet has
    ``lse = -inf`` and ``out = 0`` and gets weight ``exp(-inf) = 0``. (ring-flash-attention
    PR #34 writes the same merge as ``out_A - sigmoid(lse_B - lse_A) * (out_A - out_B)``.)

    Args:
        out: Running output, shape (B, H, S, D).
        lse: Running log-sum-exp, shape (B, H, S); ``-inf`` where no key has been seen.
        block_out: This block's output, shape (B, H, S, D).
        block_lse: This block's log-sum-exp, shape (B, H, S); ``-inf`` where the block has
            no visible key.

    Returns:
        The merged ``(out, lse)``, same shapes.
    """
    new_lse = torch.logaddexp(lse, block_lse)  # (B, H, S)
    finite_lse = new_lse.masked_fill(new_lse == float("-inf"), 0.0)  # rows with no key at all yet
    weight = torch.exp(lse - finite_lse)[..., None]  # (B, H, S, 1)
    block_weight = torch.exp(block_lse - finite_lse)[..., None]  # (B, H, S, 1)
    return weight * out + block_weight * block_out, new_lse


def _per_head(visible: torch.Tensor) -> torch.Tensor:
    """Visible pairs in a shape that broadcasts to (B, H, S_q, S_k): (S_q, S_k) or (B, 1, S_q, S_k)."""
    return visible if visible.dim() == 2 else visible[:, None]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Blocks and running statistics use at least float32, as flash-attention kernels do."""
    return torch.promote_types(dtype, torch.float32)


def _prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    world_size: int,
    layout: str,
    scale: float | None,
    mask_options: dict,
) -> tuple[list[torch.Tensor], float, torch.dtype, AttentionMask]:
    """Check the inputs; return each rank's global positions, the scale, the compute dtype and the mask."""
    check_attention_inputs(q, k, v)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q has {q.shape[2]} tokens but k/v have {k.shape[2]}; the ring shards one sequence, so they must be equal"
        )
    positions = [p.to(q.device) for p in shard_indices(q.shape[2], world_size, layout)]  # P x (S,)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    mask = make_mask(q.shape[0], q.shape[2], **mask_options)
    if mask.document_ids is not None:
        mask = replace(mask, document_ids=mask.document_ids.to(q.device))
    return positions, scale, _compute_dtype(q.dtype), mask


def simulate_ring_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    world_size: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "zigzag",
    document_ids: torch.Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[TraceEntry]]:
    """The forward ring on ``world_size`` virtual ranks (see Note [Ring schedule]).

    Every rule of the mask (`cp_dtensor.reference.masks`) is evaluated on the global positions of the held
    block; a block the mask hides entirely is skipped (no work, traced as ``"skipped"``).

    Args:
        q: Queries, shape (B, H, L, D), in global token order.
        k: Keys, shape (B, H_kv, L, D); H_kv divides H.
        v: Values, shape (B, H_kv, L, D).
        world_size: Number of virtual ranks P, at least 1.
        causal: If True, token ``i`` attends tokens ``j <= i``.
        scale: Multiplier of the scores; defaults to ``1 / sqrt(D)``.
        layout: How the sequence is sharded, one of `cp_dtensor.reference.layouts.LAYOUTS`.
        document_ids: Packed documents: integer ids, shape (B, L), in global token order; a query
            sees only keys of its own document, and a negative id (padding) sees nothing.
        window: ``(left, right)``: the query at ``i`` sees keys in ``[i - left, i + right]``;
            ``None`` for an unbounded side.
        seq_len: Number of real tokens; later positions are padding (no key, output 0).

    Returns:
        ``(out, lse, trace)``: the output (B, H, L, D) and the log-sum-exp of every query row
        (B, H, L), both in global order and in the compute dtype (q's dtype, but at least
        float32, as flash-attention kernels accumulate), and the schedule: one `TraceEntry` per
        (rank, step), in the order computed. A row with no visible key has output 0 and
        ``lse = -inf``.

    Raises:
        ValueError: If the shapes do not fit, ``world_size < 1``, the layout is unknown, L is
            not a multiple of the layout's chunk count, or a mask argument is malformed.
    """
    mask_options = {"causal": causal, "document_ids": document_ids, "window": window, "seq_len": seq_len}
    positions, scale, dtype, mask = _prepare(q, k, v, world_size, layout, scale, mask_options)
    q_shards = shard(q.to(dtype), world_size, layout, dim=2)  # P x (B, H, S, D)
    k_shards = shard(k.to(dtype), world_size, layout, dim=2)  # P x (B, H_kv, S, D)
    v_shards = shard(v.to(dtype), world_size, layout, dim=2)  # P x (B, H_kv, S, D)
    buffers = [KVBuffer(rank, k_shards[rank], v_shards[rank]) for rank in range(world_size)]
    outs = [torch.zeros_like(q_r) for q_r in q_shards]  # P x (B, H, S, D)
    lses = [q_r.new_full(q_r.shape[:-1], float("-inf")) for q_r in q_shards]  # P x (B, H, S)
    B, H, _, D = q.shape
    # QK^T and PV, 2 FLOPs per multiply-add each, per pair of every batch row (a per-row mask
    # counts its pairs row by row already)
    flops_per_pair = 4 * H * D * (1 if mask.document_ids is not None else B)
    trace = []
    for step in range(world_size):
        for rank in range(world_size):  # every rank does this at the same time
            held = buffers[rank]
            assert held.source == (rank - step) % world_size
            visible = mask.visible(positions[rank], positions[held.source])  # (S, S) or (B, ...)
            trace.append(make_entry(rank, step, held.source, visible, causal=causal, flops_per_pair=flops_per_pair))
            if not visible.any():
                continue  # the mask hides the whole block: skipped
            block_out, block_lse = attention_block(
                q_shards[rank], held.k, held.v, scale=scale, visible=_per_head(visible)
            )  # (B, H, S, D), (B, H, S)
            outs[rank], lses[rank] = merge(outs[rank], lses[rank], block_out, block_lse)
        if step < world_size - 1:
            buffers = send_to_next_rank(buffers)
    out = unshard(outs, world_size, layout, dim=2)  # (B, H, L, D)
    return out, unshard(lses, world_size, layout, dim=2), trace


def simulate_ring_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    world_size: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "zigzag",
    document_ids: torch.Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward ring: gradients of q, k, v from the saved forward output and log-sum-exp.

    Same schedule as the forward (see Note [Ring schedule]); nothing global is recomputed. Each
    rank keeps its dQ at home; the dK/dV accumulators travel with their K/V block, gather the
    contribution of every rank they visit (`cp_dtensor.reference.attention.attention_block_backward`), and a
    final send brings them home.

    Args:
        dout: Gradient of the output, shape (B, H, L, D), in global token order.
        q: Queries, shape (B, H, L, D).
        k: Keys, shape (B, H_kv, L, D).
        v: Values, shape (B, H_kv, L, D).
        out: The forward output, shape (B, H, L, D).
        lse: The forward log-sum-exp, shape (B, H, L).
        world_size: Number of virtual ranks P.
        causal: As in the forward.
        scale: As in the forward; defaults to ``1 / sqrt(D)``.
        layout: As in the forward.
        document_ids: As in the forward.
        window: As in the forward.
        seq_len: As in the forward.

    Returns:
        ``(dq, dk, dv)``, shaped and typed like q, k, v, in global token order.

    Raises:
        ValueError: As `simulate_ring_attention_forward`.
    """
    mask_options = {"causal": causal, "document_ids": document_ids, "window": window, "seq_len": seq_len}
    positions, scale, dtype, mask = _prepare(q, k, v, world_size, layout, scale, mask_options)
    q_shards, dout_shards, out_shards, k_shards, v_shards = (
        shard(x.to(dtype), world_size, layout, dim=2) for x in (q, dout, out, k, v)
    )  # P x (B, H, S, D) for q, dout, out; P x (B, H_kv, S, D) for k, v
    lse_shards = shard(lse.to(dtype), world_size, layout, dim=2)  # P x (B, H, S)
    deltas = [(do * o).sum(-1) for do, o in zip(dout_shards, out_shards, strict=True)]  # P x (B, H, S)
    dqs = [torch.zeros_like(q_r) for q_r in q_shards]  # P x (B, H, S, D), stay home
    buffers = [
        KVBuffer(r, k_shards[r], v_shards[r], torch.zeros_like(k_shards[r]), torch.zeros_like(v_shards[r]))
        for r in range(world_size)
    ]
    for step in range(world_size):
        for rank in range(world_size):
            held = buffers[rank]
            assert held.source == (rank - step) % world_size
            visible = mask.visible(positions[rank], positions[held.source])
            if not visible.any():
                continue  # the forward skipped this block; no gradient flows through it
            dq, dk, dv = attention_block_backward(
                dout_shards[rank], q_shards[rank], held.k, held.v, lse_shards[rank], deltas[rank],
                scale=scale, visible=_per_head(visible),
            )  # fmt: skip
            dqs[rank] += dq  # (B, H, S, D)
            held.dk += dk  # (B, H_kv, S, D), travels with the block
            held.dv += dv
        if step < world_size - 1:
            buffers = send_to_next_rank(buffers)  # K, V, dK, dV move on together
    # The P-th send: K/V are no longer needed; only dK/dV travel, and each lands on its home rank.
    home = send_to_next_rank([(held.source, held.dk, held.dv) for held in buffers])
    assert all(source == rank for rank, (source, _, _) in enumerate(home))
    dq = unshard(dqs, world_size, layout, dim=2).to(q.dtype)  # (B, H, L, D)
    dk = unshard([dk for _, dk, _ in home], world_size, layout, dim=2).to(k.dtype)  # (B, H_kv, L, D)
    dv = unshard([dv for _, _, dv in home], world_size, layout, dim=2).to(v.dtype)  # (B, H_kv, L, D)
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    """Autograd glue: the simulated forward ring, and the simulated backward ring as its gradient."""

    @staticmethod
    def forward(ctx, q, k, v, world_size, options, trace_sink):  # noqa: D102
        out, lse, trace = simulate_ring_attention_forward(q, k, v, world_size, **options)
        trace_sink.extend(trace)
        ctx.save_for_backward(q, k, v, out, lse)  # out unrounded: bf16 rounds only once, at the end
        ctx.world_size, ctx.options = world_size, options
        return out.to(q.dtype)

    @staticmethod
    @once_differentiable  # the backward ring itself is not differentiated again
    def backward(ctx, dout):  # noqa: D102
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = simulate_ring_attention_backward(dout, q, k, v, out, lse, ctx.world_size, **ctx.options)
        return dq, dk, dv, None, None, None


def simulate_ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    world_size: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "zigzag",
    document_ids: torch.Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    seq_len: int | None = None,
    trace: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[TraceEntry]]:
    """Attention computed by a simulated ring of ``world_size`` ranks; differentiable.

    Equal to `cp_dtensor.reference.attention.full_attention` (up to rounding), given the dense mask of the
    same rules (`cp_dtensor.reference.masks.AttentionMask.dense`) when ``document_ids``, ``window`` or
    ``seq_len`` is set. ``.backward()`` through the result runs `simulate_ring_attention_backward`.

    Args:
        q: Queries, shape (B, H, L, D), in global token order.
        k: Keys, shape (B, H_kv, L, D); H_kv divides H (grouped-query attention).
        v: Values, shape (B, H_kv, L, D).
        world_size: Number of virtual ranks P, at least 1.
        causal: If True, token ``i`` attends tokens ``j <= i``.
        scale: Multiplier of the scores; defaults to ``1 / sqrt(D)``.
        layout: How the sequence is sharded, one of `cp_dtensor.reference.layouts.LAYOUTS`.
        document_ids: Packed documents: integer ids, shape (B, L), in global token order; a query
            sees only keys of its own document, and a negative id (padding) sees nothing.
        window: ``(left, right)``: the query at ``i`` sees keys in ``[i - left, i + right]``;
            ``None`` for an unbounded side.
        seq_len: Number of real tokens; later positions are padding (no key, output 0).
        trace: If True, also return the schedule.

    Returns:
        The output, shape (B, H, L, D), in q's dtype and global token order; with ``trace=True``,
        the tuple ``(out, trace)`` where ``trace`` lists one `TraceEntry` per (rank, step).

    Raises:
        ValueError: If the shapes do not fit, ``world_size < 1``, the layout is unknown, L is not
            a multiple of the layout's chunk count (`cp_dtensor.reference.layouts.num_chunks`), or a mask
            argument is malformed (`cp_dtensor.reference.masks.make_mask`).
    """
    entries: list[TraceEntry] = []
    options = {
        "causal": causal, "scale": scale, "layout": layout,
        "document_ids": document_ids, "window": window, "seq_len": seq_len,
    }  # fmt: skip
    out = _RingAttention.apply(q, k, v, world_size, options, entries)
    return (out, entries) if trace else out
