"""Packed documents, sliding windows and padding across the ring, vs fp64 attention with the dense mask."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import mp_pool
import pytest
import torch
from helpers import (
    DTYPES,
    assert_close_to_oracle,
    attention_and_grads,
    case_id,
    covering_cases,
    default_tile,
    make_inputs,
    oracle,
    random_draws,
    record_draw,
    unshard,
)
from hypothesis import given
from hypothesis import strategies as st

from cp_dtensor import context_parallel_attention, count_comm
from cp_dtensor.positions.layout import DocumentZigzag, num_chunks
from cp_dtensor.positions.masks import MaskSpec, document_ids_from_cu_seqlens, window_hides_block
from cp_dtensor.reference import full_attention


def dense_mask(cfg: dict) -> torch.Tensor:
    """The oracle's bool mask (B, 1, L, L), built directly from the definition, not from the tiles."""
    L = cfg["seq_len"]
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    vis = torch.ones(L, L, dtype=torch.bool)
    if cfg["causal"]:
        vis &= j <= i
    if cfg["window"] is not None:
        left, right = cfg["window"]
        if left is not None:
            vis &= i - j <= left
        if right is not None:
            vis &= j - i <= right
    if cfg["seq_len_real"] is not None:
        vis &= (i < cfg["seq_len_real"]) & (j < cfg["seq_len_real"])
    vis = vis[None].expand(cfg["batch"], L, L).clone()
    if cfg["docs"] is not None:
        d = cfg["docs"]
        vis &= (d[:, :, None] == d[:, None, :]) & (d[:, :, None] >= 0)
    return vis[:, None]


def masked_ring_case(world_size: int, cfg: dict, inputs: dict) -> dict:
    with default_tile(cfg["tile"]):  # small tiles exercise the skip / full / masked split
        return _masked_ring_case(world_size, cfg, inputs)


def _masked_ring_case(world_size: int, cfg: dict, inputs: dict) -> dict:
    extra = {"ulysses_size": cfg["ulysses_size"]} if cfg.get("ulysses_size") else {}
    group = mp_pool.group(world_size, layout=cfg["layout"], **extra)
    dtype = DTYPES[cfg["dtype"]]
    q, k, v = (group.partition_sequence(inputs[n], seq_dim=2).to(dtype).requires_grad_() for n in "qkv")
    docs = None if cfg["docs"] is None else group.partition_sequence(cfg["docs"], seq_dim=1)
    with count_comm() as comm:
        out = context_parallel_attention(
            q,
            k,
            v,
            group,
            strategy=cfg.get("strategy", "ring"),
            causal=cfg["causal"],
            document_ids=docs,
            window=cfg["window"],
            seq_len=cfg["seq_len_real"],
        )
        out.backward(group.partition_sequence(inputs["dout"], seq_dim=2).to(dtype))
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, "calls": dict(comm.calls)}


@st.composite
def masked_configs(draw, world_size: int, strategy: str = "ring", ulysses_size: int | None = None):
    layout = draw(st.sampled_from(["zigzag", "contiguous", "documents"]))
    if layout == "documents":  # per-document zigzag over segments of random multiples of 2P tokens
        layout = DocumentZigzag(
            tuple(2 * world_size * m for m in draw(st.lists(st.integers(1, 3), min_size=1, max_size=4)))
        )
        seq_len = layout.seq_len
    else:
        seq_len = draw(st.integers(1, 6)) * num_chunks(world_size, layout)
    batch = draw(st.integers(1, 2))
    docs = None
    if isinstance(layout, DocumentZigzag) and draw(st.booleans()):
        # The documents the layout was made for, each padded (id -1) at its end by a random amount.
        ids = []
        for i, length in enumerate(layout.lengths):
            pad = draw(st.integers(0, length - 1))
            ids += [i] * (length - pad) + [-1] * pad
        docs = torch.tensor([ids] * batch)
        assert DocumentZigzag.from_document_ids(docs) == layout
    elif draw(st.booleans()):
        # Random boundaries: documents shorter than a shard, and longer than a whole shard.
        rows = []
        for _ in range(batch):
            cuts = sorted(draw(st.lists(st.integers(1, seq_len - 1), max_size=6, unique=True))) if seq_len > 1 else []
            cu = torch.tensor([0, *cuts, seq_len])
            rows.append(document_ids_from_cu_seqlens(cu))
        docs = torch.stack(rows)
        if draw(st.booleans()):  # some padding tokens (id -1) inside the packed row
            docs[:, -draw(st.integers(1, max(1, seq_len // 3))) :] = -1
        if draw(st.booleans()):  # ids that recur after other ids: non-contiguous "documents" (pair-by-pair path)
            docs = torch.where(docs >= 0, docs % 2, docs)
    window = draw(
        st.one_of(
            st.none(),
            st.tuples(st.one_of(st.none(), st.integers(0, seq_len)), st.one_of(st.none(), st.integers(0, seq_len))),
        )
    )
    padded = draw(st.one_of(st.none(), st.integers(1, seq_len)))
    head_choices = [(2, 1), (2, 2), (4, 2)] if strategy in ("ring", "allgather") else [(4, 1), (4, 2), (4, 4)]
    heads, kv_heads = draw(st.sampled_from(head_choices))
    return {
        "strategy": strategy,
        "ulysses_size": ulysses_size,
        "layout": layout,
        "seq_len": seq_len,
        "batch": batch,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": draw(st.sampled_from([8, 16])),
        "causal": draw(st.booleans()),
        "docs": docs,
        "window": window,
        "seq_len_real": padded,
        "dtype": draw(st.sampled_from(list(DTYPES))),
        "tile": draw(st.sampled_from([1, 2, 3, 256])),
        "scale": None,
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


STRATEGY_CASES = [  # (strategy, world size, ulysses size)
    ("ring", 1, None),
    ("ring", 2, None),
    ("ring", 3, None),
    ("ring", 4, None),
    ("ulysses", 2, None),
    ("ulysses", 4, None),
    ("allgather", 2, None),
    ("allgather", 3, None),
    ("allgather", 4, None),
    ("hybrid", 4, 2),
]
MASK_KINDS = ["none", "documents", "documents_padded", "recurring_ids", "window_left", "window_both", "padding"]
COVERING_HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
COVERING = covering_cases(
    {"mask": MASK_KINDS, "causal": [True, False], "layout": ["zigzag", "contiguous", "documents"]},
    {
        "case": [f"{s}-P{p}" + (f"-u{u}" if u else "") for s, p, u in STRATEGY_CASES],
        "dtype": list(DTYPES),
        "heads": list(COVERING_HEADS),
        "tile": [1, 2, 3, 256],
    },
)


def covering_config(row: dict) -> dict:
    """The masked configuration of one covering row, built deterministically (documents: a DocumentZigzag
    of three segments, ``documents`` its own ids, padded at their ends for ``documents_padded``)."""
    strategy, world_size, ulysses_size = STRATEGY_CASES[COVERING_CASES.index(row["case"])]
    unit = 2 * world_size
    layout = DocumentZigzag((3 * unit, unit, 2 * unit)) if row["layout"] == "documents" else row["layout"]
    seq_len = layout.seq_len if isinstance(layout, DocumentZigzag) else max(8, 4 * num_chunks(world_size, layout))
    batch, kind, docs, window, padded = 2, row["mask"], None, None, None
    if kind in ("documents", "documents_padded", "recurring_ids"):
        if isinstance(layout, DocumentZigzag):
            ids = []
            for i, length in enumerate(layout.lengths):
                pad = (length // 3 + 1) if kind == "documents_padded" else 0
                ids += [i] * (length - pad) + [-1] * pad
            docs = torch.tensor([ids] * batch)
        else:  # one document shorter than a shard, one longer than a shard, in two different rows
            cuts = [[0, 2, seq_len // 2 + 3, seq_len], [0, seq_len - 3, seq_len]]
            docs = torch.stack([document_ids_from_cu_seqlens(torch.tensor(c)) for c in cuts])
            if kind == "documents_padded":
                docs[:, -max(1, seq_len // 4) :] = -1
        if kind == "recurring_ids":  # ids that come back after others: not contiguous (pair-by-pair path)
            docs = torch.where(docs >= 0, docs % 2, docs)
    elif kind == "window_left":
        window = (max(1, seq_len // 4), None)
    elif kind == "window_both":
        window = (2, max(1, seq_len // 3))
    elif kind == "padding":
        padded = seq_len - max(1, seq_len // 4) + 1
    heads, kv_heads = COVERING_HEADS[row["heads"]]
    return {
        "strategy": strategy,
        "ulysses_size": ulysses_size,
        "layout": layout,
        "seq_len": seq_len,
        "batch": batch,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": 8,
        "causal": row["causal"],
        "docs": docs,
        "window": window,
        "seq_len_real": padded,
        "dtype": row["dtype"],
        "tile": row["tile"],
        "scale": None,
        "seed": len(case_id(row)),
        "world_size": world_size,
    }


COVERING_CASES = [f"{s}-P{p}" + (f"-u{u}" if u else "") for s, p, u in STRATEGY_CASES]


@pytest.mark.parametrize("row", COVERING, ids=case_id)
def test_masked_attention_covering_cases(row):
    """Every mask kind x causal x layout, and every pair of those with each (strategy, P, u), dtype,
    MHA/GQA/MQA and tile size, as fixed cases; hypothesis draws more below."""
    cfg = covering_config(row)
    check_against_dense_mask(cfg, cfg.pop("world_size"))


@pytest.mark.parametrize(("strategy", "world_size", "ulysses_size"), STRATEGY_CASES)
@random_draws(ci_examples=3)
@given(data=st.data())
def test_masked_attention_matches_dense_mask(strategy, world_size, ulysses_size, data):
    check_against_dense_mask(data.draw(masked_configs(world_size, strategy, ulysses_size)), world_size)


@pytest.mark.parametrize(("strategy", "world_size", "ulysses_size"), [c for c in STRATEGY_CASES if c[1] > 1])
def test_document_zigzag_in_every_strategy(strategy, world_size, ulysses_size):
    """A fixed DocumentZigzag case per strategy (the property test draws this layout among others):
    one long document, two short ones padded at their ends, causal, small tiles."""
    unit = 2 * world_size
    lengths, real = (6 * unit, unit, 2 * unit), (6 * unit, unit - 1, 2 * unit - 3)
    ids = torch.tensor(sum(([i] * n + [-1] * (length - n) for i, (n, length) in enumerate(zip(real, lengths))), []))
    cfg = {
        "strategy": strategy,
        "ulysses_size": ulysses_size,
        "layout": DocumentZigzag(lengths),
        "seq_len": sum(lengths),
        "batch": 2,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 8,
        "causal": True,
        "docs": ids[None].repeat(2, 1),
        "window": None,
        "seq_len_real": None,
        "dtype": "float64",
        "tile": 3,
        "scale": None,
        "seed": world_size,
    }
    assert DocumentZigzag.from_document_ids(cfg["docs"]) == cfg["layout"]
    check_against_dense_mask(cfg, world_size)


def mask_kinds(cfg: dict) -> str:
    """What a configuration masks, in the words of MASK_KINDS (several joined by '+'), for the draw listing."""
    kinds = []
    docs = cfg["docs"]
    if docs is not None:
        kinds.append(
            "recurring_ids"
            if not documents_are_contiguous(docs)
            else "documents_padded"
            if bool((docs < 0).any())
            else "documents"
        )
    if cfg["window"] is not None:
        kinds.append("window_left" if cfg["window"][1] is None or cfg["window"][1] == 0 else "window_both")
    if cfg["seq_len_real"] is not None:
        kinds.append("padding")
    return "+".join(kinds) or "none"


def check_against_dense_mask(cfg: dict, world_size: int) -> None:
    """Run ``cfg`` on ``world_size`` ranks; compare output and gradients with fp64 attention and the dense mask."""
    if record_draw({"P": world_size, "mask": mask_kinds(cfg), **cfg}):
        return
    inputs = make_inputs(cfg, cfg["seed"])
    results = mp_pool.run_on_ranks(world_size, masked_ring_case, world_size, cfg, inputs)
    mask = dense_mask(cfg)
    expected = oracle({"causal": False, "scale": None}, inputs, mask=mask)  # causality is in the mask
    got = {n: unshard([r[n] for r in results], world_size, cfg["layout"]).double() for n in expected}
    dtype = DTYPES[cfg["dtype"]]
    one_process = None if dtype == torch.float64 else attention_and_grads(inputs, dtype, mask=mask)
    assert_close_to_oracle(got, expected, dtype, one_process, what=cfg.get("strategy", "ring"))


def test_rows_without_visible_keys_get_zero_output_and_gradient():
    """Padding rows (id -1) see nothing: output 0 and all gradients flowing through them 0, not NaN."""
    cfg = {
        "layout": "zigzag",
        "seq_len": 16,
        "batch": 1,
        "heads": 2,
        "kv_heads": 2,
        "head_dim": 8,
        "causal": True,
        "docs": torch.tensor([[0] * 6 + [1] * 6 + [-1] * 4]),
        "window": None,
        "seq_len_real": None,
        "dtype": "float32",
        "tile": 2,
        "scale": None,
    }
    inputs = make_inputs(cfg, 3)
    results = mp_pool.run_on_ranks(2, masked_ring_case, 2, cfg, inputs)
    out = unshard([r["out"] for r in results], 2, "zigzag")
    dk = unshard([r["dk"] for r in results], 2, "zigzag")
    assert torch.equal(out[:, :, 12:], torch.zeros_like(out[:, :, 12:]))
    assert torch.equal(dk[:, :, 12:], torch.zeros_like(dk[:, :, 12:]))
    assert torch.isfinite(out).all() and torch.isfinite(dk).all()


def test_window_stops_the_ring_early():
    """A window shorter than a shard with the contiguous layout needs only the previous rank's block."""
    cfg = {
        "layout": "contiguous",
        "seq_len": 64,
        "batch": 1,
        "heads": 2,
        "kv_heads": 1,
        "head_dim": 8,
        "causal": True,
        "docs": None,
        "window": (8, 0),
        "seq_len_real": None,
        "dtype": "float64",
        "tile": 256,
        "scale": None,
    }
    inputs = make_inputs(cfg, 5)
    results = mp_pool.run_on_ranks(4, masked_ring_case, 4, cfg, inputs)
    for r in results:
        # forward: 1 K/V hop; backward: 1 K/V hop + 2 gradient hops (pass on, then home).
        assert r["calls"] == {"ring_send": 2, "ring_send_grad": 2}


def test_window_hides_block_interval_arithmetic_matches_dense():
    """The interval shortcut agrees with evaluating the mask pair by pair."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        L = 24
        q0, q1, k0, k1 = (int(x) for x in torch.randint(0, L - 4, (4,), generator=gen))
        qn, kn = (int(x) for x in torch.randint(1, 5, (2,), generator=gen))
        left, right = (
            None if torch.rand(1, generator=gen) < 0.3 else int(torch.randint(0, 10, (1,), generator=gen))
            for _ in range(2)
        )
        causal = bool(torch.rand(1, generator=gen) < 0.5)
        real = None if torch.rand(1, generator=gen) < 0.5 else int(torch.randint(1, L, (1,), generator=gen))
        spec = MaskSpec(causal=causal, window=(left, right), seq_len=real)
        q_runs, kv_runs = [(q0, qn), (q1, qn)], [(k0, kn), (k1, kn)]
        qp = torch.cat([torch.arange(s, s + n) for s, n in q_runs])
        kp = torch.cat([torch.arange(s, s + n) for s, n in kv_runs])
        assert window_hides_block(q_runs, kv_runs, spec) == (not spec.visible(qp, kp).any())


@given(data=st.data())
def test_tile_plan_from_row_intervals_equals_pair_by_pair(data):
    """refine_block's fast path (one interval of visible keys per row, binary search) plans exactly the
    calls and masks that evaluating every (query, key) pair plans."""
    from cp_dtensor.positions.blocks import plan_blocks
    from cp_dtensor.positions.layout import shard_runs
    from cp_dtensor.positions.masks import positions
    from cp_dtensor.positions.tiles import refine_block

    world_size = data.draw(st.sampled_from([1, 2, 4]))
    cfg = data.draw(masked_configs(world_size))
    docs = cfg["docs"]
    spec = MaskSpec(
        causal=cfg["causal"], window=cfg["window"], document_ids=docs, seq_len=cfg["seq_len_real"], tile=cfg["tile"]
    )
    runs = [shard_runs(cfg["seq_len"], world_size, r, cfg["layout"]) for r in range(world_size)]
    rank = data.draw(st.integers(0, world_size - 1))
    for source in range(world_size):
        q_pos, kv_pos = positions(runs[rank]), positions(runs[source])
        for blk in plan_blocks(runs[rank], runs[source], cfg["causal"]):
            fast = refine_block(blk, q_pos, kv_pos, spec)
            original = MaskSpec.row_intervals
            MaskSpec.row_intervals = lambda self, q: None  # force the pair-by-pair path
            try:
                slow = refine_block(blk, q_pos, kv_pos, spec)
            finally:
                MaskSpec.row_intervals = original
            assert [c for c, _ in fast] == [c for c, _ in slow]
            for (_, m_fast), (_, m_slow) in zip(fast, slow):
                assert (m_fast is None) == (m_slow is None)
                if m_fast is not None:
                    assert torch.equal(m_fast, m_slow.expand_as(m_fast)) and m_fast.shape[1:] == m_slow.shape[1:]
    # The interval path is taken exactly when every document's tokens are contiguous (decided here from
    # the ids themselves, not from the code under test); otherwise pair by pair.
    takes_intervals = spec.row_intervals(torch.arange(cfg["seq_len"])) is not None
    assert takes_intervals == (docs is None or documents_are_contiguous(docs)), docs


def documents_are_contiguous(docs: torch.Tensor) -> bool:
    """Every id >= 0 of every row occupies one unbroken run of positions."""
    for row in docs.tolist():
        for doc in set(row) - {-1}:
            where = [i for i, d in enumerate(row) if d == doc]
            if where[-1] - where[0] + 1 != len(where):
                return False
    return True


def _masked_call_error(group, ids: torch.Tensor, gen: torch.Generator) -> float:
    """Max error of one causal document-masked call (fresh q, k, v) against the dense oracle of ``ids`` now."""
    B, L = ids.shape
    q, k, v = (torch.randn(B, 2, L, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    out = context_parallel_attention(
        *(group.partition_sequence(x, seq_dim=2) for x in (q, k, v)), group, causal=True, document_ids=ids
    )
    dense = (ids[:, :, None] == ids[:, None, :]) & torch.ones(L, L, dtype=torch.bool).tril()
    want = full_attention(q, k, v, mask=dense[:, None])
    return (group.gather_sequence(out, seq_dim=2) - want).abs().max().item()


def reuse_case(world_size: int) -> dict:
    """Layers in a row with the same ids, then ids edited in three ways, then shard ids; see the test."""
    from cp_dtensor.attention.call import mask_spec
    from cp_dtensor.positions.tiles import tile_planner

    group = mp_pool.group(world_size)
    gen = torch.Generator().manual_seed(7)
    ids = torch.tensor([[0] * 5 + [1] * 17 + [2] * 10, [0] * 20 + [1] * 12])  # (B, L), global order
    q_local = group.partition_sequence(torch.zeros(2, 2, 32, 8), seq_dim=2)

    def planner(document_ids):
        return tile_planner(mask_spec(group, q_local, causal=True, document_ids=document_ids))

    errors = [_masked_call_error(group, ids, gen) for _ in range(2)]  # two layers: the plan is reused, exact
    first = planner(ids)
    reused = planner(ids) is first and planner(ids.clone()) is first and len(first._calls) > 0
    seen = {}
    for how in ("in place", ".data", "numpy view"):
        before = planner(ids)
        if how == "in place":
            ids[1, 25:] = 2  # a third document in row 1 (bumps the version counter)
        elif how == ".data":
            ids.data[0, 3:5] = 7  # bypasses the version counter
        else:
            ids.numpy()[0, 30:] = 8  # a numpy view shares the storage and bumps nothing either
        errors.append(_masked_call_error(group, ids, gen))
        seen[how] = planner(ids) is not before
    shard = group.partition_sequence(ids, seq_dim=1)
    with count_comm() as comm:
        a = planner(shard)
        b = planner(shard)
    # The cache must not keep a group (and so gloo's threads) alive: a group dropped by its owner is freed.
    throwaway = dataclasses.replace(group)
    context_parallel_attention(
        *(torch.zeros(2, 2, 32 // world_size, 8) for _ in range(3)), throwaway, causal=True, document_ids=ids
    )
    throwaway_ref = weakref.ref(throwaway)
    del throwaway
    gc.collect()
    return {
        "errors": errors,
        "reused": reused,
        "seen": seen,
        "group_released": throwaway_ref() is None,
        "shard_reused": a is b,
        "shard_gathers": comm.calls.get("mask_gather", 0),
    }


@pytest.mark.parametrize("world_size", [1, 2])
def test_tile_plans_are_reused_across_layers_only_when_the_mask_is_the_same(world_size):
    """Note [Reusing tile plans across layers]: equal ids (the same object or a copy) -> the same planner and
    plans; an edit in place, through .data or through a numpy view -> a new one; shard ids are gathered at
    every call; the cache holds no group alive. Every output is checked against the dense oracle."""
    for r in mp_pool.run_on_ranks(world_size, reuse_case, world_size):
        assert max(r["errors"]) < 1e-12, r["errors"]  # fp64: summation order only
        assert r["reused"] and r["group_released"] and r["shard_reused"]
        assert all(r["seen"].values()), r["seen"]
        if world_size > 1:  # (at P = 1 a shard is the whole row: global ids)
            assert r["shard_gathers"] == 2  # a collective at every call, never skipped


def test_mask_arguments_are_validated():
    from cp_dtensor.positions.masks import check_window

    for bad in [(1,), (-1, 0), (1.5, 0), "left", (True, 0)]:
        with pytest.raises(ValueError, match="window"):
            check_window(bad)
    with pytest.raises(ValueError, match="cu_seqlens"):
        document_ids_from_cu_seqlens(torch.tensor([1, 3]))
    assert document_ids_from_cu_seqlens(torch.tensor([0, 2, 5]), 7).tolist() == [0, 0, 1, 1, 1, -1, -1]


def test_plan_blocks_rejects_runs_that_overlap_without_being_equal():
    """Runs from one layout are equal or disjoint; a direct caller passing others gets a ValueError, not
    a plan that silently drops pairs (or an assert that -O strips)."""
    from cp_dtensor.positions.blocks import Block, plan_blocks

    with pytest.raises(ValueError, match=r"Query run \(0, 8\) and key run \(4, 8\)"):
        plan_blocks([(0, 8)], [(4, 8)], causal=True)
    # Sharing one position is no such overlap: every key is at or before every query, so all are visible.
    assert plan_blocks([(7, 4)], [(4, 4)], causal=True) == [Block(0, 4, 0, 4, False)]
