"""reference.masks: the simulated ring with packed documents, windows and padding.

Checked against fp64 full attention with the equivalent dense mask (built here from the definition,
not with `AttentionMask`), its trace against the pairs that mask allows, and the production ring
(`cp_dtensor.attention.ring`) against the simulation: its plan skips exactly the blocks the trace skips and
computes exactly as many pairs, and on real gloo ranks it returns the same output and gradients.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import mp_pool
import pytest
import torch
import warm_launch
from helpers import default_tile
from hypothesis import given, settings
from hypothesis import strategies as st

from cp_dtensor.reference import (
    LAYOUTS,
    document_ids_from_lengths,
    full_attention,
    make_mask,
    num_chunks,
    ring_steps_needed,
    shard_indices,
    simulate_ring_attention,
    unshard,
)


@dataclass(frozen=True)
class MaskCase:
    """One drawn configuration: shapes, ring, mask, and the seed of the inputs."""

    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    seq_len: int
    world_size: int
    layout: str
    causal: bool
    window: tuple[int | None, int | None] | None
    doc_lengths: tuple[tuple[int, ...], ...] | None  # per batch row; the rest of the row is padding (id -1)
    real_len: int | None  # the ``seq_len=`` argument
    seed: int

    @property
    def document_ids(self) -> torch.Tensor | None:
        if self.doc_lengths is None:
            return None
        return torch.stack([document_ids_from_lengths(list(row), self.seq_len) for row in self.doc_lengths])

    @property
    def mask_options(self) -> dict:
        return {
            "causal": self.causal,
            "window": self.window,
            "document_ids": self.document_ids,
            "seq_len": self.real_len,
        }


@st.composite
def packed_rows(draw, seq_len: int, s_local: int) -> tuple[int, ...]:
    """Document lengths of one row: a mix shorter than a shard and longer than one, maybe padding after."""
    padding = draw(st.sampled_from([0, 0, 1, max(1, seq_len // 4)]))
    room, lengths = seq_len - padding, []
    while room > 0:
        short = st.integers(1, max(1, s_local - 1))
        long = st.integers(min(s_local + 1, seq_len), seq_len)
        n = min(room, draw(st.one_of(short, long)))
        lengths.append(n)
        room -= n
    return tuple(lengths)


@st.composite
def mask_cases(draw, world_sizes: tuple[int, ...] = tuple(range(1, 9)), layouts: tuple[str, ...] = LAYOUTS) -> MaskCase:
    world_size, layout = draw(st.sampled_from(world_sizes)), draw(st.sampled_from(layouts))
    seq_len = num_chunks(world_size, layout) * draw(st.integers(1, 3))
    batch = draw(st.integers(1, 2))
    s_local = seq_len // world_size
    doc_lengths = None
    if draw(st.booleans()):
        doc_lengths = tuple(draw(packed_rows(seq_len, s_local)) for _ in range(batch))
    side = st.none() | st.integers(0, seq_len)
    kv_heads = draw(st.integers(1, 2))
    return MaskCase(
        batch=batch,
        heads=kv_heads * draw(st.integers(1, 2)),
        kv_heads=kv_heads,
        head_dim=draw(st.integers(1, 8)),
        seq_len=seq_len,
        world_size=world_size,
        layout=layout,
        causal=draw(st.booleans()),
        window=draw(st.none() | st.tuples(side, side)),
        doc_lengths=doc_lengths,
        real_len=draw(st.none() | st.integers(1, seq_len)),
        seed=draw(st.integers(0, 2**16)),
    )


def dense_mask(case: MaskCase) -> torch.Tensor:
    """The oracle's mask (B, 1, S, S), written out from the definition, one rule at a time."""
    i = torch.arange(case.seq_len)[:, None]  # query positions (S, 1)
    j = torch.arange(case.seq_len)[None, :]  # key positions (1, S)
    allowed = torch.ones(case.seq_len, case.seq_len, dtype=torch.bool)
    if case.causal:
        allowed &= j <= i
    if case.window is not None:
        left, right = case.window
        if left is not None:
            allowed &= i - j <= left
        if right is not None:
            allowed &= j - i <= right
    if case.real_len is not None:
        allowed &= (i < case.real_len) & (j < case.real_len)
    allowed = allowed.expand(case.batch, -1, -1).clone()  # (B, S, S)
    if case.doc_lengths is not None:
        for b, lengths in enumerate(case.doc_lengths):
            same_doc = torch.zeros(case.seq_len, case.seq_len, dtype=torch.bool)
            start = 0
            for n in lengths:  # one diagonal square per document; padding rows and columns stay False
                same_doc[start : start + n, start : start + n] = True
                start += n
            allowed[b] &= same_doc
    return allowed[:, None]


def make_inputs(case: MaskCase) -> list[torch.Tensor]:
    """q, k, v and the output gradient in fp64, from the case's seed."""
    gen = torch.Generator().manual_seed(case.seed)
    q_shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    kv_shape = (case.batch, case.kv_heads, case.seq_len, case.head_dim)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in (q_shape, kv_shape, kv_shape, q_shape)]


def simulated(case: MaskCase, inputs: list[torch.Tensor]):
    """(out, dq, dk, dv) and the trace of the simulated ring."""
    q, k, v, dout = inputs
    qkv = [x.clone().requires_grad_() for x in (q, k, v)]
    out, trace = simulate_ring_attention(*qkv, case.world_size, layout=case.layout, trace=True, **case.mask_options)
    return (out, *torch.autograd.grad(out, qkv, dout)), trace


def oracle(case: MaskCase, inputs: list[torch.Tensor]):
    """(out, dq, dk, dv) of fp64 full attention with the dense mask."""
    q, k, v, dout = inputs
    qkv = [x.clone().requires_grad_() for x in (q, k, v)]
    out = full_attention(*qkv, mask=dense_mask(case))
    return (out, *torch.autograd.grad(out, qkv, dout))


def check_against_oracle(case: MaskCase) -> list:
    inputs = make_inputs(case)
    got, trace = simulated(case, inputs)
    for name, g, want in zip(("out", "dq", "dk", "dv"), got, oracle(case, inputs), strict=True):
        assert torch.isfinite(g).all(), name
        # fp64 block-wise sums differ from the oracle's only in summation order (the bar)
        torch.testing.assert_close(g, want, rtol=0, atol=1e-9, msg=name)
    return trace


# ---- the simulation against the oracle ----


@settings(derandomize=True, deadline=None, max_examples=80)
@given(case=mask_cases())
def test_masked_ring_matches_full_attention_with_the_dense_mask(case):
    check_against_oracle(case)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [3, 4, 5])
def test_documents_shorter_than_a_shard_and_longer_than_the_whole_shard(world_size, layout):
    # one token, a shard minus one, one and a half shards, the rest, then 2 padding tokens; zigzag
    # and striped scatter a shard over the sequence, so the long document meets several ranks
    chunks = num_chunks(world_size, layout)
    seq_len = next(chunks * m for m in range(1, 100) if chunks * m * (1 - 2.5 / world_size) >= 4)
    s_local = seq_len // world_size
    long = s_local + s_local // 2 + 1
    lengths = (1, s_local - 1, long, seq_len - s_local - long - 2)
    assert min(lengths) >= 1 and long > s_local
    for causal in (False, True):
        case = MaskCase(1, 2, 1, 4, seq_len, world_size, layout, causal, None, (lengths,), None, world_size)
        check_against_oracle(case)


def test_rows_without_visible_keys_get_zero_output_and_zero_gradient():
    # row 0: two documents then 4 padding ids; row 1: padded by seq_len=13; a window (0, 0) lets a
    # token see only itself, which padding never may
    case = MaskCase(2, 2, 2, 4, 16, 4, "zigzag", True, (0, 0), ((6, 6), (16,)), 13, 7)
    got, _ = simulated(case, make_inputs(case))
    out, dq, dk, dv = got
    assert torch.isfinite(torch.stack([out, dq])).all() and torch.isfinite(torch.stack([dk, dv])).all()
    for x in (out, dq, dk, dv):
        assert torch.equal(x[0, :, 12:], torch.zeros_like(x[0, :, 12:]))  # padding ids
        assert torch.equal(x[1, :, 13:], torch.zeros_like(x[1, :, 13:]))  # past seq_len
    check_against_oracle(case)


# ---- the trace under masks ----


def allowed_pairs(case: MaskCase) -> torch.Tensor:
    """(B, S, S) allowed pairs as a count (0 or 1)."""
    return dense_mask(case)[:, 0].long()


@settings(derandomize=True, deadline=None, max_examples=60)
@given(case=mask_cases())
def test_trace_computes_every_allowed_pair_exactly_once_and_skips_hidden_blocks(case):
    q, k, v, _ = make_inputs(case)
    _, trace = simulate_ring_attention(q, k, v, case.world_size, layout=case.layout, trace=True, **case.mask_options)
    positions = shard_indices(case.seq_len, case.world_size, case.layout)
    counts = torch.zeros(case.batch, case.seq_len, case.seq_len, dtype=torch.long)
    per_row = case.doc_lengths is not None
    for e in trace:
        assert e.visible.shape == ((case.batch,) if per_row else ()) + (len(positions[0]),) * 2
        rows, cols = positions[e.rank][:, None], positions[e.kv_source][None, :]
        counts[:, rows, cols] += e.visible.long()  # broadcasts a (S_local, S_local) mask over the rows
        assert e.pairs == int(e.visible.sum())
        assert e.flops == 4 * e.pairs * case.head_dim * case.heads * (1 if per_row else case.batch)
        assert (e.kind == "skipped") == (e.pairs == 0)
    assert torch.equal(counts, allowed_pairs(case))
    steps_used = {e.step for e in trace if e.pairs > 0}
    assert ring_steps_needed(trace) == max(steps_used, default=0) + 1


def test_packed_short_documents_leave_only_the_own_block():
    # documents of exactly one chunk, contiguous layout: every block but the rank's own is skipped
    world_size, chunk = 4, 3
    case = MaskCase(1, 2, 2, 4, world_size * chunk, world_size, "contiguous", True, None, ((chunk,) * 4,), None, 0)
    trace = check_against_oracle(case)
    assert {(e.rank, e.step) for e in trace if e.kind != "skipped"} == {(r, 0) for r in range(world_size)}
    assert ring_steps_needed(trace) == 1


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_window_needs_the_neighbour_contiguous_and_both_neighbours_zigzag(world_size):
    # a causal window narrower than a chunk: contiguous needs the previous rank's block (step 1);
    # zigzag's late chunk needs the late chunk of rank r + 1, which arrives at step P - 1
    window = (2, 0)
    contiguous = MaskCase(1, 1, 1, 2, 4 * world_size, world_size, "contiguous", True, window, None, None, 1)
    zigzag = MaskCase(1, 1, 1, 2, 8 * world_size, world_size, "zigzag", True, window, None, None, 1)
    assert ring_steps_needed(check_against_oracle(contiguous)) == min(2, world_size)
    trace = check_against_oracle(zigzag)
    assert ring_steps_needed(trace) == world_size
    used_steps = {e.step for e in trace if e.pairs > 0}
    assert used_steps == {0, 1, world_size - 1}


def test_mask_arguments_are_validated():
    q = torch.zeros(2, 1, 8, 4)
    bad = [
        ({"window": (1,)}, "window"),
        ({"window": (-1, 0)}, "window"),
        ({"window": (True, 0)}, "window"),
        ({"document_ids": torch.zeros(1, 8, dtype=torch.long)}, "document_ids has shape"),
        ({"document_ids": torch.zeros(2, 8)}, "integer tensor"),
        ({"seq_len": 0}, "seq_len"),
        ({"seq_len": 9}, "seq_len"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            simulate_ring_attention(q, q, q, 2, **kwargs)
    with pytest.raises(ValueError, match="lengths"):
        document_ids_from_lengths([3, 0])
    with pytest.raises(ValueError, match="do not fit"):
        document_ids_from_lengths([3, 4], 6)
    assert document_ids_from_lengths([2, 3], 7).tolist() == [0, 0, 1, 1, 1, -1, -1]
    mask = make_mask(1, 4, causal=True, window=[1, None])
    assert mask.window == (1, None) and mask.dense(4).tolist() == [
        [True, False, False, False], [True, True, False, False], [False, True, True, False], [False, False, True, True],
    ]  # fmt: skip


# ---- the production ring against the simulation ----

PRODUCTION_LAYOUTS = ("zigzag", "contiguous")  # the layouts cp_dtensor implements


def production_plan(case: MaskCase, rank: int, tile: int):
    """cp_dtensor's RingPlan of one rank for the case, built without a process group."""
    from cp_dtensor.attention.ring import RingPlan
    from cp_dtensor.positions.layout import shard_runs
    from cp_dtensor.positions.masks import MaskSpec

    spec = MaskSpec(
        causal=case.causal, window=case.window, document_ids=case.document_ids, seq_len=case.real_len, tile=tile
    )
    runs = lambda src: shard_runs(case.seq_len, case.world_size, src, case.layout)  # noqa: E731
    return RingPlan(
        group=None,
        rank=rank,
        size=case.world_size,
        q_runs=runs(rank),
        kv_runs=runs,
        causal=case.causal,
        scale=1.0,
        mask=spec,
    )


def planned_pairs(plan, step: int, batch: int, per_row: bool) -> int:
    """Pairs the production plan computes at ``step``, counted like the trace (per batch row if per_row)."""
    from cp_dtensor.positions.blocks import block_pairs

    rows = batch if per_row else 1
    return sum(rows * block_pairs(call) if mask is None else int(mask.sum()) for call, mask in plan.calls(step))


@settings(derandomize=True, deadline=None, max_examples=60)
@given(case=mask_cases(layouts=PRODUCTION_LAYOUTS), tile=st.sampled_from([1, 2, 3, 256]))
def test_production_plan_skips_exactly_what_the_trace_skips(case, tile):
    q, k, v, _ = make_inputs(case)
    _, trace = simulate_ring_attention(q, k, v, case.world_size, layout=case.layout, trace=True, **case.mask_options)
    per_row = case.doc_lengths is not None
    plans = [production_plan(case, rank, tile) for rank in range(case.world_size)]
    num_steps = plans[0].num_steps
    assert num_steps >= ring_steps_needed(trace)  # the ring never stops before the last needed block
    if case.doc_lengths is None and case.window is not None:
        assert num_steps == ring_steps_needed(trace)  # a window (and padding): it stops exactly there
    for e in trace:
        if e.step >= num_steps:
            assert e.pairs == 0
            continue
        assert planned_pairs(plans[e.rank], e.step, case.batch, per_row) == e.pairs
        assert (plans[e.rank].calls(e.step) == []) == (e.kind == "skipped")


def production_case(world_size: int, case: MaskCase, inputs: list[torch.Tensor]) -> dict:
    """Runs on every rank: the production masked ring, forward and backward, in fp64."""
    from cp_dtensor import ring_attention

    group = mp_pool.group(world_size, layout=case.layout)
    q, k, v = (group.partition_sequence(x, seq_dim=2).requires_grad_() for x in inputs[:3])
    with default_tile(2):  # small tiles: skipped, plain and masked tiles in every block
        out = ring_attention(q, k, v, group, **case.mask_options)
        out.backward(group.partition_sequence(inputs[3], seq_dim=2))
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


@pytest.mark.parametrize("world_size", [2, 4])
@settings(max_examples=6)
@given(data=st.data())
def test_production_masked_ring_matches_the_simulation(world_size, data):
    case = data.draw(mask_cases(world_sizes=(world_size,), layouts=PRODUCTION_LAYOUTS))
    inputs = make_inputs(case)
    results = mp_pool.run_on_ranks(world_size, production_case, world_size, case, inputs)
    expected, _ = simulated(case, inputs)
    for name, want in zip(("out", "dq", "dk", "dv"), expected, strict=True):
        got = unshard([r[name] for r in results], world_size, case.layout, dim=2)
        # both fp64; the production ring tiles the blocks, so only the summation order differs
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=name)


# ---- bench/masks.py at a tiny size (no time is asserted) ----


def test_masks_benchmark_runs_and_plans_the_skipped_work(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "masks.json"
    args = ["--seq", "1024", "--doc-len", "64", "--window", "64", "--window-seq", "1024", "2048"]
    args += ["--heads", "2", "--head-dim", "16", "--repeats", "1", "--out", str(out)]
    proc = warm_launch.run(  # torchrun's ranks as forks of a preloaded process (tests/warm_launch.py)
        ["torchrun", "--standalone", "--nproc-per-node=4", "-m", "bench.masks", *args],
        cpu_s=400,  # work budget, the 4 ranks together (tests/work_limits.py)
        cwd=repo,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    packed = result["packed"]
    assert packed["packed_over_plain_cpu_s"]["n"] == 1
    assert packed["cases"]["plain causal"]["kernel_pairs"] == 1024 * 1025 // 2  # the causal plan, nothing more
    # documents of 64 tokens: each rank's two runs of 128 tokens are two masked diagonal tiles (tiles
    # never span two runs), each computed as a causal triangle (the kernel skips the hidden half);
    # every other tile is hidden
    assert packed["cases"]["packed"]["kernel_pairs"] == 4 * 2 * 128 * 129 // 2
    short, long = result["window"]["rows"]
    for row in (short, long):
        assert (row["window"]["ring_steps"], row["plain causal"]["ring_steps"]) == (2, 4)  # stops after 1 hop
        assert row["window"]["cpu_s"]["n"] == 1
    # doubling L: the window's planned work about doubles, the causal plan's quadruples
    assert long["window"]["kernel_pairs"] / short["window"]["kernel_pairs"] < 2.2
    assert long["plain causal"]["kernel_pairs"] / short["plain causal"]["kernel_pairs"] > 3.9
