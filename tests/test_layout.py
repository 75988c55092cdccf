"""Layouts as pure index arithmetic: every token placed once, equal shards, DocumentZigzag's balance."""

from __future__ import annotations

import mp_pool
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cp_dtensor import DocumentZigzag, document_ids_from_cu_seqlens
from cp_dtensor.positions.layout import (
    LAYOUTS,
    check_seq_len,
    num_chunks,
    padded_length,
    relayout_pieces,
    shard_positions,
    shard_runs,
)
from cp_dtensor.reference import shard_indices as reference_shard_indices


def causal_document_work(ids_L: torch.Tensor, positions: torch.Tensor) -> int:
    """Visible (query, key) pairs of these query positions under a causal document mask (-1: padding)."""
    i, j = positions[:, None], torch.arange(len(ids_L))[None, :]
    same = (ids_L[positions][:, None] == ids_L[None, :]) & (ids_L[positions][:, None] >= 0)
    return int((same & (j <= i)).sum())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_whole_row_layouts_place_tokens_as_the_reference_defines_them(layout, world_size):
    """Production positions equal the reference's (an independent definition), and whole-row zigzag gives
    every rank the same causal work. The ring's results cannot show a wrong order: any split that the
    unsharding inverts gives the same attention, only the balance changes."""
    L = num_chunks(world_size, layout) * 3
    for rank, want in enumerate(reference_shard_indices(L, world_size, layout)):
        assert shard_positions(L, world_size, rank, layout).tolist() == want.tolist(), (rank, layout)
    if layout == "zigzag":
        work = [
            causal_document_work(torch.zeros(L, dtype=torch.long), shard_positions(L, world_size, r, layout))
            for r in range(world_size)
        ]
        assert len(set(work)) == 1, work


def test_zigzag_example():
    """P = 2, L = 8: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2 (of 2P = 4 chunks)."""
    assert [shard_positions(8, 2, r, "zigzag").tolist() for r in range(2)] == [[0, 1, 6, 7], [2, 3, 4, 5]]


@given(world_size=st.integers(1, 5), pieces=st.lists(st.integers(1, 4), min_size=1, max_size=6))
def test_document_zigzag_places_every_token_once_and_balances_causal_documents(world_size, pieces):
    layout = DocumentZigzag(tuple(2 * world_size * m for m in pieces))
    L = layout.seq_len
    positions = [shard_positions(L, world_size, r, layout) for r in range(world_size)]
    assert torch.equal(torch.sort(torch.cat(positions)).values, torch.arange(L))  # a permutation
    assert all(len(p) == L // world_size for p in positions)  # equal shards
    bounds = torch.tensor(layout.lengths).cumsum(0).tolist()
    for r in range(world_size):  # pieces r and 2P-1-r of every segment, in order, none across a boundary
        runs = shard_runs(L, world_size, r, layout)
        assert all(a + n <= b for (a, n), (b, _) in zip(runs, runs[1:]))
        assert all(not a < e < a + n for a, n in runs for e in bounds)
    # Causal attention inside each segment: every rank does exactly the same number of pairs (the zigzag
    # pairing piece r with piece 2P-1-r, per document), whatever the mix of lengths.
    ids_L = document_ids_from_cu_seqlens(torch.tensor([0, *torch.tensor(layout.lengths).cumsum(0).tolist()]))
    work = [causal_document_work(ids_L, p) for p in positions]
    assert len(set(work)) == 1, work


def test_document_zigzag_beats_whole_row_zigzag_on_mixed_lengths():
    """One long document and many short ones: whole-row zigzag leaves a rank with more work, per-document not."""
    P, lengths = 4, (512, 64, 64, 64, 64, 32, 32, 32, 32, 32, 32, 32, 32)
    layout = DocumentZigzag(lengths)
    ids_L = document_ids_from_cu_seqlens(torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]))
    L = layout.seq_len
    imbalance = {}
    for name, lay in (("zigzag", "zigzag"), ("contiguous", "contiguous"), ("documents", layout)):
        work = [causal_document_work(ids_L, shard_positions(L, P, r, lay)) for r in range(P)]
        imbalance[name] = max(work) / (sum(work) / P)
    assert imbalance["documents"] == 1.0
    assert imbalance["zigzag"] > 1.05 and imbalance["contiguous"] > 1.05, imbalance


def test_document_zigzag_from_document_ids_joins_padding_to_the_document_before():
    ids = torch.tensor([[0, 0, 0, -1, 1, 1, -1, -1, 2, 2, 2, 2, 2, 2, 2, 2]] * 2)
    assert DocumentZigzag.from_document_ids(ids) == DocumentZigzag((4, 4, 8))
    assert DocumentZigzag.from_document_ids(ids[0]) == DocumentZigzag((4, 4, 8))
    assert DocumentZigzag.from_document_ids(torch.tensor([-1, -1, 0, 0])).lengths == (2, 2)  # leading padding
    assert DocumentZigzag(torch.tensor([4, 4])).lengths == (4, 4)


def test_document_zigzag_errors_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match="positive ints"):
        DocumentZigzag((4, 0))
    with pytest.raises(ValueError, match="positive ints"):
        DocumentZigzag(())
    with pytest.raises(ValueError, match="positive ints"):
        DocumentZigzag((4.0,))
    with pytest.raises(ValueError, match="same document boundaries"):
        DocumentZigzag.from_document_ids(torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="integer tensor"):
        DocumentZigzag.from_document_ids(torch.zeros(4))
    layout = DocumentZigzag((8, 12))
    with pytest.raises(ValueError, match=r"not multiples of 8 \(#1: 12\).*document id -1"):
        check_seq_len(20, 4, layout)
    check_seq_len(20, 2, layout)  # 4 divides both
    with pytest.raises(ValueError, match="add up to 20"):
        shard_runs(24, 2, 0, layout)
    with pytest.raises(ValueError, match="add up to 20"):
        padded_length(18, 2, layout)  # its padding is part of its segments
    assert padded_length(20, 2, layout) == 20
    with pytest.raises(ValueError, match=f"Must be one of: {', '.join(map(repr, LAYOUTS))}, or a DocumentZigzag"):
        shard_runs(8, 2, 0, "documents")


def with_layout_case(world_size: int) -> dict:
    group = mp_pool.group(world_size)
    mesh = group.cp_mesh
    layout = DocumentZigzag((4 * world_size, 2 * world_size))
    moved = group.with_layout(layout)
    try:
        group.with_layout("stripes")
        raised = False
    except ValueError:
        raised = True
    return {
        "same_mesh": moved.cp_mesh is mesh and moved.mesh is group.mesh,
        "layout": moved.layout,
        "original": group.layout,
        "raised": raised,
        "runs": moved.runs(layout.seq_len),
    }


def test_with_layout_keeps_the_meshes_and_changes_only_the_layout():
    for rank, r in enumerate(mp_pool.run_on_ranks(2, with_layout_case, 2)):
        assert r["same_mesh"] and r["raised"] and r["original"] == "zigzag"
        assert r["runs"] == shard_runs(12, 2, rank, DocumentZigzag((8, 4)))
        # P = 2: pieces of 2 and 1 tokens; rank 0 holds pieces 0 and 3 of each segment (no run spans
        # two segments), rank 1 pieces 1 and 2, which touch: one run per segment
        assert shard_runs(12, 2, 0, DocumentZigzag((8, 4))) == [(0, 2), (6, 2), (8, 1), (11, 1)]
        assert shard_runs(12, 2, 1, DocumentZigzag((8, 4))) == [(2, 4), (9, 2)]


@given(world_size=st.integers(1, 5), units=st.lists(st.integers(1, 3), min_size=1, max_size=4), data=st.data())
def test_relayout_pieces_move_every_token_to_where_the_other_layout_wants_it(world_size, units, data):
    """Filling each destination shard from the pieces gives exactly the destination layout's positions."""
    layouts = ["zigzag", "contiguous", DocumentZigzag(tuple(2 * world_size * u for u in units))]
    src, dst = data.draw(st.sampled_from(layouts)), data.draw(st.sampled_from(layouts))
    seq_len = 2 * world_size * sum(units)  # splits under all three
    sources = [shard_positions(seq_len, world_size, r, src) for r in range(world_size)]
    for rank, pieces in enumerate(relayout_pieces(seq_len, world_size, src, dst)):
        got = torch.full((seq_len // world_size,), -1)
        for src_rank, src_offset, dst_offset, length in pieces:
            got[dst_offset : dst_offset + length] = sources[src_rank][src_offset : src_offset + length]
        assert torch.equal(got, shard_positions(seq_len, world_size, rank, dst)), (src, dst, rank)
