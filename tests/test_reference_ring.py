"""reference.ring and reference.layouts: the simulated ring against the full-attention oracle."""

from dataclasses import dataclass

import pytest
import torch
from helpers import assert_close_to_oracle, attention_and_grads
from hypothesis import given, settings
from hypothesis import strategies as st

from cp_dtensor.reference import (
    LAYOUTS,
    full_attention,
    num_chunks,
    shard,
    shard_indices,
    simulate_ring_attention,
    simulate_ring_attention_backward,
    simulate_ring_attention_forward,
    unshard,
)


@dataclass(frozen=True)
class RingCase:
    """One drawn configuration: shapes, ring and attention options, and the seed of the inputs."""

    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    seq_len: int
    world_size: int
    layout: str
    causal: bool
    scale: float | None
    seed: int


@st.composite
def ring_cases(draw):
    world_size = draw(st.integers(1, 8))
    layout = draw(st.sampled_from(LAYOUTS))
    kv_heads = draw(st.integers(1, 2))
    return RingCase(
        batch=draw(st.integers(1, 2)),
        heads=kv_heads * draw(st.integers(1, 3)),
        kv_heads=kv_heads,
        head_dim=draw(st.integers(1, 8)),
        seq_len=num_chunks(world_size, layout) * draw(st.integers(1, 3)),
        world_size=world_size,
        layout=layout,
        causal=draw(st.booleans()),
        scale=draw(st.none() | st.floats(0.1, 2.0)),
        seed=draw(st.integers(0, 2**16)),
    )


def make_inputs(case, dtype):
    """q, k, v and the output gradient, drawn in float32 from the case's seed, then cast."""
    gen = torch.Generator().manual_seed(case.seed)
    q_shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    kv_shape = (case.batch, case.kv_heads, case.seq_len, case.head_dim)
    shapes = (q_shape, kv_shape, kv_shape, q_shape)
    return [torch.randn(shape, generator=gen).to(dtype) for shape in shapes]


ALL_VISIBLE = torch.ones((), dtype=torch.bool)  # forces the reference's attention (the simulation's kernel)


def ring_and_oracle(case, dtype):
    """(out, dq, dk, dv) of the ring on `dtype` inputs and of fp64 full attention on the same values."""
    q, k, v, dout = make_inputs(case, dtype)
    options = {"causal": case.causal, "scale": case.scale}
    qkv = [x.clone().requires_grad_() for x in (q, k, v)]
    out = simulate_ring_attention(*qkv, case.world_size, layout=case.layout, **options)
    ring = (out, *torch.autograd.grad(out, qkv, dout))
    qkv64 = [x.double().requires_grad_() for x in (q, k, v)]
    out64 = full_attention(*qkv64, **options)
    oracle = (out64, *torch.autograd.grad(out64, qkv64, dout.double()))
    return ring, oracle


@settings(derandomize=True, deadline=None, max_examples=200)
@given(case=ring_cases())
def test_ring_matches_full_attention_fp64(case):
    ring, oracle = ring_and_oracle(case, torch.float64)
    names = ("out", "dq", "dk", "dv")
    assert_close_to_oracle(dict(zip(names, ring)), dict(zip(names, oracle)), torch.float64, what="simulated ring")


@settings(derandomize=True, deadline=None, max_examples=100)
@given(case=ring_cases())
def test_ring_matches_full_attention_fp32(case):
    ring, oracle = ring_and_oracle(case, torch.float32)
    assert all(got.dtype == torch.float32 for got in ring)
    # The project's rule (helpers.tolerance): twice one process's fp32 error plus the fp32 floor.
    names = ("out", "dq", "dk", "dv")
    q, k, v, dout = make_inputs(case, torch.float32)
    one = attention_and_grads(
        dict(zip(("q", "k", "v", "dout"), (q, k, v, dout))),
        torch.float32,
        causal=case.causal,
        scale=case.scale,
        mask=ALL_VISIBLE,
    )
    assert_close_to_oracle(dict(zip(names, ring)), dict(zip(names, oracle)), torch.float32, one, what="simulated ring")


@settings(derandomize=True, deadline=None, max_examples=100)
@given(case=ring_cases())
def test_ring_matches_full_attention_bf16(case):
    ring, oracle = ring_and_oracle(case, torch.bfloat16)
    assert all(got.dtype == torch.bfloat16 for got in ring)
    names = ("out", "dq", "dk", "dv")
    q, k, v, dout = make_inputs(case, torch.bfloat16)
    one = attention_and_grads(
        dict(zip(("q", "k", "v", "dout"), (q, k, v, dout))),
        torch.bfloat16,
        causal=case.causal,
        scale=case.scale,
        mask=ALL_VISIBLE,
    )
    assert_close_to_oracle(dict(zip(names, ring)), dict(zip(names, oracle)), torch.bfloat16, one, what="simulated ring")


@settings(derandomize=True, deadline=None, max_examples=20)
@given(case=ring_cases())
def test_public_backward_matches_autograd_through_the_ring(case):
    q, k, v, dout = make_inputs(case, torch.float64)
    options = {"causal": case.causal, "scale": case.scale, "layout": case.layout}
    out, lse, _ = simulate_ring_attention_forward(q, k, v, case.world_size, **options)
    grads = simulate_ring_attention_backward(dout, q, k, v, out, lse, case.world_size, **options)
    qkv = [x.clone().requires_grad_() for x in (q, k, v)]
    ring_out = simulate_ring_attention(*qkv, case.world_size, **options)
    for got, want in zip(grads, torch.autograd.grad(ring_out, qkv, dout), strict=True):
        assert torch.equal(got, want)  # the same function on the same inputs


def test_trace_flag_returns_the_same_output_and_one_entry_per_rank_and_step():
    q, k, v, _ = make_inputs(RingCase(1, 2, 1, 4, 16, 4, "zigzag", True, None, 0), torch.float64)
    out, trace = simulate_ring_attention(q, k, v, 4, causal=True, trace=True)
    assert torch.equal(out, simulate_ring_attention(q, k, v, 4, causal=True))
    assert sorted((e.rank, e.step) for e in trace) == [(r, t) for r in range(4) for t in range(4)]


# ---- layouts ----


def test_shard_indices_examples():
    as_lists = lambda layout: [idx.tolist() for idx in shard_indices(8, 2, layout)]  # noqa: E731
    assert as_lists("contiguous") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert as_lists("zigzag") == [[0, 1, 6, 7], [2, 3, 4, 5]]
    assert as_lists("striped") == [[0, 2, 4, 6], [1, 3, 5, 7]]


@settings(derandomize=True, deadline=None, max_examples=50)
@given(world_size=st.integers(1, 8), layout=st.sampled_from(LAYOUTS), multiple=st.integers(0, 4))
def test_shards_partition_the_sequence_and_unshard_inverts_shard(world_size, layout, multiple):
    seq_len = num_chunks(world_size, layout) * multiple
    indices = shard_indices(seq_len, world_size, layout)
    assert len(indices) == world_size and all(len(idx) == seq_len // world_size for idx in indices)
    assert sorted(torch.cat(indices).tolist()) == list(range(seq_len))
    x = torch.randn(2, seq_len, 3)
    shards = shard(x, world_size, layout, dim=1)
    assert all(torch.equal(s, x[:, idx]) for s, idx in zip(shards, indices, strict=True))
    assert torch.equal(unshard(shards, world_size, layout, dim=1), x)


# ---- errors ----


def qkv(heads=2, kv_heads=1, seq_len=8):
    return (
        torch.randn(1, heads, seq_len, 4),
        torch.randn(1, kv_heads, seq_len, 4),
        torch.randn(1, kv_heads, seq_len, 4),
    )


def test_bad_layout_name():
    expected = "Invalid layout 'ring'. Must be one of: 'contiguous', 'zigzag', 'striped'"
    with pytest.raises(ValueError, match=expected):
        simulate_ring_attention(*qkv(), 2, layout="ring")


@pytest.mark.parametrize(("layout", "multiple"), [("zigzag", 8), ("contiguous", 4), ("striped", 4)])
def test_bad_sequence_length_names_length_multiple_and_fix(layout, multiple):
    expected = rf"length 10 is not a multiple of {multiple}.*pad the sequence to 1[26] tokens"
    with pytest.raises(ValueError, match=expected):
        simulate_ring_attention(*qkv(seq_len=10), 4, layout=layout)


@pytest.mark.parametrize("world_size", [0, -1])
def test_world_size_below_one(world_size):
    with pytest.raises(ValueError, match=f"world_size must be >= 1, got {world_size}"):
        simulate_ring_attention(*qkv(), world_size)


def test_kv_heads_not_dividing_heads():
    with pytest.raises(ValueError, match="must divide the number of query heads"):
        simulate_ring_attention(*qkv(heads=3, kv_heads=2), 2)


def test_query_and_key_lengths_must_match():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q has 8 tokens but k/v have 4"):
        simulate_ring_attention(q, k[:, :, :4], v[:, :, :4], 2)


def test_unshard_needs_one_shard_per_rank():
    with pytest.raises(ValueError, match="got 3 shards for world_size 2"):
        unshard([torch.zeros(2)] * 3, 2, "contiguous", dim=0)
