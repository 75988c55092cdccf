"""reference.trace: invariants of the ring's schedule (coverage, block kinds, load balance)."""

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cp_dtensor.reference import (
    BLOCK_KINDS,
    LAYOUTS,
    num_chunks,
    shard_indices,
    simulate_ring_attention,
    trace_work_per_rank,
)

BATCH, HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 3


def run_trace(world_size, layout, causal, seq_len):
    """The schedule of one forward ring on small random inputs."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, HEADS, seq_len, HEAD_DIM, generator=gen)
    k, v = (torch.randn(BATCH, KV_HEADS, seq_len, HEAD_DIM, generator=gen) for _ in range(2))
    _, trace = simulate_ring_attention(q, k, v, world_size, causal=causal, layout=layout, trace=True)
    return trace


def computed_pair_counts(trace, seq_len, world_size, layout):
    """How often each global (query, key) pair was computed; shape (S, S)."""
    positions = shard_indices(seq_len, world_size, layout)
    counts = torch.zeros(seq_len, seq_len, dtype=torch.long)
    for entry in trace:
        rows, cols = positions[entry.rank][:, None], positions[entry.kv_source][None, :]
        counts[rows, cols] += entry.visible.long()
    return counts


schedules = st.tuples(st.integers(1, 8), st.sampled_from(LAYOUTS), st.booleans(), st.integers(1, 3)).map(
    lambda t: (t[0], t[1], t[2], num_chunks(t[0], t[1]) * t[3])
)


@settings(derandomize=True, deadline=None, max_examples=80)
@given(schedule=schedules)
def test_every_allowed_pair_is_computed_exactly_once_and_no_other(schedule):
    world_size, layout, causal, seq_len = schedule
    trace = run_trace(world_size, layout, causal, seq_len)
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()  # (S, S): query i may see keys j <= i
    counts = computed_pair_counts(trace, seq_len, world_size, layout)
    assert torch.equal(counts, allowed.long())


@settings(derandomize=True, deadline=None, max_examples=80)
@given(schedule=schedules)
def test_entries_follow_the_ring_and_count_their_work(schedule):
    world_size, layout, causal, seq_len = schedule
    trace = run_trace(world_size, layout, causal, seq_len)
    assert sorted((e.rank, e.step) for e in trace) == [(r, t) for r in range(world_size) for t in range(world_size)]
    s_local = seq_len // world_size
    for e in trace:
        assert e.kv_source == (e.rank - e.step) % world_size
        assert e.visible.shape == (s_local, s_local) and e.visible.dtype == torch.bool
        assert e.pairs == int(e.visible.sum())
        assert e.flops == 4 * e.pairs * HEAD_DIM * BATCH * HEADS
        assert e.kind in BLOCK_KINDS
        assert (e.kind == "skipped") == (e.pairs == 0)
        if not causal:
            assert e.kind == "full"


@pytest.mark.parametrize("world_size", range(1, 9))
@pytest.mark.parametrize("chunk", [1, 3])
def test_zigzag_balances_causal_work_exactly(world_size, chunk):
    seq_len = 2 * world_size * chunk
    work = trace_work_per_rank(run_trace(world_size, "zigzag", True, seq_len), world_size)
    assert Fraction(max(work) * world_size, sum(work)) == 1  # max / mean == 1.0 exactly


@pytest.mark.parametrize("world_size", range(1, 9))
@pytest.mark.parametrize("chunk", [1, 4])
def test_contiguous_causal_imbalance(world_size, chunk):
    # rank r: r full blocks of n^2 pairs plus a causal triangle of n(n+1)/2; counted in pairs,
    # max / mean = ((2P - 1) n + 1) / (P n + 1), which tends to (2P - 1) / P as n grows
    n = chunk
    work = trace_work_per_rank(run_trace(world_size, "contiguous", True, world_size * n), world_size)
    ratio = Fraction(max(work) * world_size, sum(work))
    assert ratio == Fraction((2 * world_size - 1) * n + 1, world_size * n + 1)
    assert Fraction(2 * world_size - 1, world_size) - ratio == Fraction(
        world_size - 1, world_size * (world_size * n + 1)
    )


def test_contiguous_imbalance_in_blocks_is_2p_minus_1_over_p():
    # counting a diagonal block as half a block (the view of the layouts note): exactly (2P - 1) / P
    world_size = 4
    trace = run_trace(world_size, "contiguous", True, 4 * world_size)
    weight = {"full": Fraction(1), "diagonal": Fraction(1, 2), "skipped": Fraction(0)}
    blocks = [sum(weight[e.kind] for e in trace if e.rank == r) for r in range(world_size)]
    assert max(blocks) * world_size / sum(blocks) == Fraction(2 * world_size - 1, world_size)


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_block_kinds_per_layout(world_size):
    def kinds(layout):
        trace = run_trace(world_size, layout, True, num_chunks(world_size, layout) * 2)
        return {(e.rank, e.kv_source): e.kind for e in trace}

    for (rank, source), kind in kinds("contiguous").items():
        assert kind == ("diagonal" if source == rank else "full" if source < rank else "skipped")
    for (rank, source), kind in kinds("zigzag").items():
        assert kind == ("diagonal" if source == rank else "half")
    for (rank, source), kind in kinds("striped").items():
        assert kind == ("diagonal" if source == rank else "partial")


def test_work_per_rank_sums_flops_by_rank():
    trace = run_trace(3, "zigzag", True, 12)
    work = trace_work_per_rank(trace, 3)
    assert work == [sum(e.flops for e in trace if e.rank == r) for r in range(3)]
    assert sum(work) == 4 * BATCH * HEADS * HEAD_DIM * (12 * 13 // 2)  # the causal triangle, once
