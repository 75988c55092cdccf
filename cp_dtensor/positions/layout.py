"""Sequence layouts: which global token positions each context-parallel rank holds.

A layout cuts a sequence of ``seq_len`` tokens into equal chunks and deals them to ``world_size``
ranks. Each rank's shard is a list of *runs* ``(start, length)`` of consecutive global positions, in
the order the shard stores them. The layouts:

* ``"contiguous"``: ``P`` chunks, rank ``r`` holds chunk ``r``.
* ``"zigzag"``: ``2P`` chunks, rank ``r`` holds chunk ``r`` then chunk ``2P - 1 - r``; the causal
  load-balancing layout of Llama 3 and Megatron (see Note [Causal load balance] in
  :mod:`cp_dtensor.positions.blocks`).
* :class:`DocumentZigzag`: the zigzag of every packed document (segment) on its own, so that each
  rank holds an early and a late piece of every document; balanced causal work for documents of
  any mix of lengths, as long as each is a multiple of ``2P`` (pad them).

Every strategy and helper works from the runs alone, so all layouts serve all of them.

Everything here is pure index arithmetic; no communication.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "LAYOUTS",
    "DocumentZigzag",
    "Layout",
    "num_chunks",
    "check_seq_len",
    "shard_runs",
    "shard_positions",
    "padded_length",
    "relayout_pieces",
]

LAYOUTS = ("zigzag", "contiguous")
"""Names of the whole-row layouts; a :class:`DocumentZigzag` is passed as an object instead."""

Run = tuple[int, int]  # (global start position, number of tokens)


@dataclass(frozen=True)
class DocumentZigzag:
    """Zigzag inside every packed document: rank ``r`` holds pieces ``r`` and ``2P - 1 - r`` of each.

    Whole-row zigzag balances one long causal sequence, and many short documents balance themselves,
    but a mix of long and short documents leaves the ranks holding the late tokens of the long ones
    with most of the work (measured in ``docs/document-balance.md``). Cutting each document into
    ``2P`` equal pieces and dealing them as zigzag does gives every rank the same share of every
    document's causal work, whatever the lengths. TransformerEngine's THD format and PyTorch's
    per-document load balancer place tokens the same way.

    The layout only places tokens; what a query sees is still set by the attention call's
    ``document_ids`` (and ``causal``, ``window``). All rows of a batch share the segments.

    Examples:
        >>> ids_L = document_ids_from_cu_seqlens(torch.tensor([0, 512, 640, 1024]))  # doctest: +SKIP
        >>> group = cp_group.with_layout(DocumentZigzag.from_document_ids(ids_L))  # 3 documents
        >>> q_local = group.partition_sequence(q, seq_dim=2)  # P = 4: 8 divides each length
        >>> out = ring_attention(q_local, k_local, v_local, group, causal=True,
        ...                      document_ids=group.partition_sequence(ids_L[None], seq_dim=1))

    Attributes:
        lengths: Token counts of the consecutive segments (documents, each with any padding after
            it) that make up the row, in order; they sum to the sequence length, and each must be a
            multiple of ``2P`` for ``P`` ranks.
    """

    lengths: tuple[int, ...]

    def __post_init__(self) -> None:
        lengths = self.lengths
        if isinstance(lengths, torch.Tensor):
            lengths = lengths.tolist()
        if (
            not isinstance(lengths, Sequence)
            or isinstance(lengths, str)
            or len(lengths) == 0
            or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in lengths)
        ):
            raise ValueError(f"DocumentZigzag lengths must be a non-empty sequence of positive ints, got {lengths!r}.")
        object.__setattr__(self, "lengths", tuple(lengths))

    @classmethod
    def from_document_ids(cls, document_ids: torch.Tensor) -> DocumentZigzag:
        """The segments of a packed row: runs of equal ids, each padding run (id ``-1``) joined to the one before.

        Args:
            document_ids: ``(L,)`` or ``(B, L)`` integer ids in global order; every row must have the
                same boundaries.

        Raises:
            ValueError: Not an integer tensor of 1 or 2 dims, or rows with different boundaries.
        """
        ids = document_ids
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dim() not in (1, 2) or ids.numel() == 0:
            raise ValueError(f"document_ids must be a non-empty integer tensor (L,) or (B, L), got {document_ids!r}.")
        ids_BL = document_ids.reshape(-1, document_ids.shape[-1]).cpu()
        starts_BL = torch.ones_like(ids_BL, dtype=torch.bool)
        starts_BL[:, 1:] = (ids_BL[:, 1:] != ids_BL[:, :-1]) & (ids_BL[:, 1:] >= 0)  # padding joins the one before
        if not bool((starts_BL == starts_BL[:1]).all()):
            raise ValueError(
                "DocumentZigzag needs the same document boundaries in every row of document_ids "
                "(one layout places the whole batch); pack rows alike, or use layout='zigzag'."
            )
        starts = starts_BL[0].nonzero().flatten().tolist() + [ids_BL.shape[1]]
        return cls(tuple(b - a for a, b in zip(starts, starts[1:])))

    @property
    def seq_len(self) -> int:
        """The sequence length the segments add up to."""
        return sum(self.lengths)

    def check(self, seq_len: int, world_size: int) -> None:
        """Raise ``ValueError`` unless the segments fill ``seq_len`` and each splits into ``2P`` pieces."""
        if seq_len != self.seq_len:
            raise ValueError(
                f"Sequence length {seq_len} does not match the DocumentZigzag layout, whose {len(self.lengths)} "
                f"segments add up to {self.seq_len} tokens."
            )
        bad = [(i, n) for i, n in enumerate(self.lengths) if n % (2 * world_size)]
        if bad:
            shown = ", ".join(f"#{i}: {n}" for i, n in bad[:5]) + (", ..." if len(bad) > 5 else "")
            raise ValueError(
                f"DocumentZigzag cuts every segment into 2P = {2 * world_size} pieces, but {len(bad)} segment "
                f"length(s) are not multiples of {2 * world_size} ({shown}). Pad each document with padding "
                "tokens (document id -1) to a multiple, or use layout='zigzag' (any document lengths)."
            )

    def runs(self, world_size: int, rank: int) -> list[Run]:
        """Rank ``rank``'s runs: pieces ``rank`` and ``2P - 1 - rank`` of every segment.

        The two pieces of a segment form one run when they touch (the middle rank's), but runs never
        span two segments, so that the tile planner never mixes two documents in one tile (see
        :func:`cp_dtensor.positions.tiles.tile_edges`).
        """
        runs: list[Run] = []
        offset = 0
        for length in self.lengths:
            piece = length // (2 * world_size)
            early, late = offset + rank * piece, offset + (2 * world_size - 1 - rank) * piece
            runs += [(early, 2 * piece)] if early + piece == late else [(early, piece), (late, piece)]
            offset += length
        return runs


Layout = str | DocumentZigzag  # a name in LAYOUTS, or a DocumentZigzag


def check_layout(layout: Layout) -> None:
    """Raise ``ValueError`` unless ``layout`` is a known layout name or a :class:`DocumentZigzag`."""
    if not isinstance(layout, DocumentZigzag) and layout not in LAYOUTS:
        raise ValueError(
            f"Invalid layout {layout!r}. Must be one of: {', '.join(map(repr, LAYOUTS))}, or a DocumentZigzag."
        )


def num_chunks(world_size: int, layout: Layout) -> int:
    """Chunks a layout cuts the sequence into: ``P``, or ``2P`` (per segment for :class:`DocumentZigzag`).

    Raises:
        ValueError: ``layout`` is unknown or ``world_size < 1``.
    """
    check_layout(layout)
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}.")
    return world_size if layout == "contiguous" else 2 * world_size


def padded_length(seq_len: int, world_size: int, layout: Layout) -> int:
    """The smallest length ``>= seq_len`` that the layout can split evenly.

    A :class:`DocumentZigzag` fixes the length: its padding is part of its segments.
    """
    if isinstance(layout, DocumentZigzag):
        layout.check(seq_len, world_size)
        return seq_len
    multiple = num_chunks(world_size, layout)
    return -(-seq_len // multiple) * multiple


def check_seq_len(seq_len: int, world_size: int, layout: Layout) -> None:
    """Raise ``ValueError`` unless ``seq_len`` splits evenly into the layout's chunks.

    Raises:
        ValueError: naming the length, the required multiple and the fix.
    """
    if isinstance(layout, DocumentZigzag):
        num_chunks(world_size, "zigzag")  # validates world_size
        layout.check(seq_len, world_size)
        return
    multiple = num_chunks(world_size, layout)
    if seq_len <= 0 or seq_len % multiple != 0:
        raise ValueError(
            f"Sequence length {seq_len} is not a positive multiple of {multiple} "
            f"(the {layout!r} layout cuts the sequence into {multiple} chunks for {world_size} ranks). "
            f"Pad it to {padded_length(max(seq_len, 1), world_size, layout)} tokens, e.g. "
            "partition_sequence(x, seq_dim=..., pad=True), or choose another sequence length."
        )


def shard_runs(seq_len: int, world_size: int, rank: int, layout: Layout) -> list[Run]:
    """The runs of global positions that ``rank`` holds, in local storage order.

    Args:
        seq_len: Global sequence length (a multiple of ``num_chunks(world_size, layout)``).
        world_size: Number of context-parallel ranks ``P``.
        rank: This rank's index in ``[0, P)``.
        layout: ``"zigzag"``, ``"contiguous"`` or a :class:`DocumentZigzag`.

    Returns:
        A list of ``(start, length)`` runs; lengths sum to ``seq_len // P``.
    """
    check_seq_len(seq_len, world_size, layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}.")
    if isinstance(layout, DocumentZigzag):
        return layout.runs(world_size, rank)
    chunk = seq_len // num_chunks(world_size, layout)
    if layout == "contiguous":
        return [(rank * chunk, chunk)]
    return [(rank * chunk, chunk), ((2 * world_size - 1 - rank) * chunk, chunk)]


def shard_positions(seq_len: int, world_size: int, rank: int, layout: Layout) -> torch.Tensor:
    """Global positions of the tokens ``rank`` holds, in local order: a ``(seq_len // P,)`` long tensor."""
    runs = shard_runs(seq_len, world_size, rank, layout)
    return torch.cat([torch.arange(start, start + length) for start, length in runs])


Piece = tuple[int, int, int, int]  # (source rank, offset in the source shard, offset in the destination shard, length)


def relayout_pieces(seq_len: int, world_size: int, src: Layout, dst: Layout) -> tuple[tuple[Piece, ...], ...]:
    """What each rank receives when shards move from layout ``src`` to layout ``dst``.

    Both layouts hold every position exactly once, so moving between them is a permutation of the
    sequence: destination rank ``j`` fills its shard, in its storage order, with pieces cut from the
    source shards (see Note [Re-laying out a DTensor] in :mod:`cp_dtensor.mesh.sharding`).

    Args:
        seq_len: Global sequence length; both layouts must split it evenly.
        world_size: Number of ranks ``P``.
        src: The layout the shards are in.
        dst: The layout they should be in.

    Returns:
        For every destination rank, its pieces ``(source rank, source offset, destination offset,
        length)`` in destination storage order; they tile ``[0, seq_len // P)`` of the destination.

    Raises:
        ValueError: ``seq_len`` does not split evenly into either layout.
    """
    sources = []  # (global start, length, source rank, offset in the source shard), sorted by start
    for rank in range(world_size):
        offset = 0
        for start, length in shard_runs(seq_len, world_size, rank, src):
            sources.append((start, length, rank, offset))
            offset += length
    sources.sort()
    starts = [s[0] for s in sources]
    pieces = []
    for rank in range(world_size):
        mine, dst_offset = [], 0
        for start, length in shard_runs(seq_len, world_size, rank, dst):
            i = bisect.bisect_right(starts, start) - 1  # the source run that holds `start`
            end = start + length
            while start < end:
                src_start, src_length, src_rank, src_offset = sources[i]
                take = min(end, src_start + src_length) - start
                mine.append((src_rank, src_offset + start - src_start, dst_offset, take))
                start, dst_offset, i = start + take, dst_offset + take, i + 1
        pieces.append(tuple(mine))
    return tuple(pieces)
