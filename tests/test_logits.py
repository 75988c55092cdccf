"""Attention sinks, soft-capping, score and mask functions on real gloo ranks, against fp64 full attention.

Every strategy x layout x mask kind, forward and every gradient (the sinks' included), in fp64 to
1e-10 (helpers.FLOOR: only the order of the sums differs). The sinks are -20, 0, +20 and 1.3 on four
heads (a zero sink alone hides bugs; one value per head also catches a head shard that reads the
wrong sinks), alone (fused kernels), with a soft cap of 0.4 on logits of magnitude ~1-3, so it bites
(the tiled kernel, closed-form derivative), and with the cap and an ALiBi ``score_mod`` on global
positions and global heads (the tiled kernel's autograd path). Tiles are small (the kernel and the
mask planner run several tiles per block).
"""

from __future__ import annotations

import mp_pool
import pytest
import torch
from helpers import default_tile, logit_tile, make_inputs, unshard

from cp_dtensor import DocumentZigzag, context_parallel_attention
from cp_dtensor.attention.ring import RingPlan
from cp_dtensor.positions.layout import shard_runs
from cp_dtensor.positions.masks import MaskSpec, positions
from cp_dtensor.reference import full_attention
from cp_dtensor.reference.masks import make_mask

STRATEGIES = ("ring", "allgather", "ulysses", "hybrid", "dispatch")
SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
SINKS = torch.tensor([-20.0, 0.0, 20.0, 1.3], dtype=torch.float64)
PREFIX = 5


def alibi(score, b, h, q_idx, kv_idx):
    """ALiBi: a linear penalty by distance, one slope per (global) head."""
    return score + SLOPES[h] * (kv_idx - q_idx)


def prefix_lm(b, h, q_idx, kv_idx):
    """Prefix-LM: the first PREFIX tokens see each other both ways; the rest is causal."""
    return (kv_idx <= q_idx) | (kv_idx < PREFIX)


def span(b, h, q_idx, kv_idx):
    """A bidirectional span [6, 14) inside a causal sequence (an image's tokens, say)."""
    inside = (q_idx >= 6) & (q_idx < 14) & (kv_idx >= 6) & (kv_idx < 14)
    return (kv_idx <= q_idx) | inside


def first_half_only(b, h, q_idx, kv_idx):
    """Queries of the second half see nothing of the first half: empties whole K/V blocks."""
    half = 12
    return (q_idx < half) == (kv_idx < half)


FEATURES = {  # sinks alone run the fused kernels; a cap, the tiled kernel; with a score_mod, its autograd path
    "sinks": dict(sinks=True),
    "cap+sinks": dict(sinks=True, softcap=0.4),
    "cap+alibi+sinks": dict(sinks=True, softcap=0.4, score_mod=alibi),
}
MASKS = {  # name -> (causal, mask arguments); "documents" also runs the per-document layout
    "full": (False, {}),
    "causal": (True, {}),
    "documents": (True, {"document_ids": True}),
    "window": (True, {"window": (5, 0)}),
    "padding": (True, {"seq_len": 19}),
    "prefix_lm": (False, {"mask_mod": prefix_lm}),
    "span": (False, {"mask_mod": span}),
    "halves": (False, {"mask_mod": first_half_only}),
}


def _document_ids(batch: int, seq_len: int) -> torch.Tensor:
    ids = torch.empty(batch, seq_len, dtype=torch.long)
    ids[0] = torch.arange(seq_len) // 8  # segments of 8 tokens: the per-document layout cuts each in 2P <= 8 pieces
    ids[-1] = torch.tensor([0] * 3 + [1] * (seq_len - 5) + [-1] * 2)  # padding at the end
    return ids


def _call_args(feature: dict, mask: dict, ids: torch.Tensor) -> dict:
    args = {k: v for k, v in feature.items() if k != "sinks"}
    args.update({k: (ids if k == "document_ids" else v) for k, v in mask.items()})
    return args


def cases(world_size: int) -> list[tuple[str, str, str, str]]:
    """``(strategy, layout, mask, feature)``: every strategy, layout and mask kind, each feature."""
    found = []
    for strategy in STRATEGIES:
        for mask in MASKS:
            layouts = ["zigzag", "contiguous"] + (["documents"] if mask == "documents" else [])
            for layout in layouts:
                for feature in FEATURES:
                    found.append((strategy, layout, mask, feature))
    return found


def grid_on_rank(
    world_size: int, grid: list, inputs: dict, ids: torch.Tensor, dtype: torch.dtype = torch.float64
) -> list[dict]:
    """Runs on every rank: each case of ``grid`` in ``dtype``, forward and backward; the local results."""
    results = []
    with default_tile(4), logit_tile(4):
        for strategy, layout, mask_name, feature_name in grid:
            extra = {"ulysses_size": 2} if strategy == "hybrid" else {}
            group = mp_pool.group(world_size, **extra)
            if layout == "documents":
                group = group.with_layout(DocumentZigzag.from_document_ids(ids[:1]))
            else:
                group = group.with_layout(layout)
            causal, mask = MASKS[mask_name]
            feature = FEATURES[feature_name]
            q, k, v = (group.partition_sequence(inputs[n], seq_dim=2).to(dtype).requires_grad_() for n in "qkv")
            sinks = SINKS.to(dtype, copy=True).requires_grad_() if feature.get("sinks") else None  # a fresh leaf
            args = _call_args(feature, mask, ids if layout != "documents" else ids[:1])
            if layout == "documents":
                q, k, v = (x[:1].detach().requires_grad_() for x in (q, k, v))
            out = context_parallel_attention(
                q, k, v, group, strategy=strategy, causal=causal, scale=0.9, sinks=sinks, **args
            )
            dout = group.partition_sequence(inputs["dout"], seq_dim=2)[: out.shape[0]].to(dtype)
            out.backward(dout)
            results.append(
                {
                    "out": out.detach(),
                    "dq": q.grad,
                    "dk": k.grad,
                    "dv": v.grad,
                    "dsinks": None if sinks is None else sinks.grad,
                }
            )
    return results


def expected(case: tuple, inputs: dict, ids: torch.Tensor) -> dict:
    """ONE process, fp64, the whole sequence: the reference with a dense mask."""
    _, layout, mask_name, feature_name = case
    causal, mask = MASKS[mask_name]
    feature = FEATURES[feature_name]
    batch = 1 if layout == "documents" else inputs["q"].shape[0]
    q, k, v = (inputs[n][:batch].clone().requires_grad_() for n in "qkv")
    seq_len = q.shape[2]
    rules = {k: (ids[:batch] if k == "document_ids" else v) for k, v in mask.items() if k != "mask_mod"}
    dense = make_mask(batch, seq_len, causal=causal, **rules).dense(seq_len)  # (B or 1, 1, L, L) or (L, L)
    if "mask_mod" in mask:
        pos = torch.arange(seq_len)
        dense = dense & mask["mask_mod"](None, None, pos.view(-1, 1), pos.view(1, -1))
    sinks = SINKS.clone().requires_grad_() if feature.get("sinks") else None
    out = full_attention(
        q, k, v, scale=0.9, mask=dense, sinks=sinks, softcap=feature.get("softcap"), score_mod=feature.get("score_mod")
    )
    out.backward(inputs["dout"][:batch])
    return {
        "out": out.detach(),
        "dq": q.grad,
        "dk": k.grad,
        "dv": v.grad,
        "dsinks": None if sinks is None else sinks.grad,
    }


@pytest.mark.parametrize("world_size", [4])
def test_sinks_caps_and_score_functions_equal_full_attention(world_size):
    cfg = dict(batch=2, heads=4, kv_heads=2, seq_len=24, head_dim=4)
    inputs = make_inputs(cfg, seed=world_size)
    ids = _document_ids(2, 24)
    grid = cases(world_size)
    per_rank = mp_pool.run_on_ranks(world_size, grid_on_rank, world_size, grid, inputs, ids, timeout=600)
    failures = []
    for i, case in enumerate(grid):
        want = expected(case, inputs, ids)
        layout = case[1]
        if layout == "documents":
            layout = DocumentZigzag.from_document_ids(ids[:1])
        for name in ("out", "dq", "dk", "dv"):
            got = unshard([r[i][name] for r in per_rank], world_size, layout)
            err = (got - want[name]).abs().max().item()
            if not err <= 1e-10:  # fp64: only the order of the sums differs (helpers.FLOOR)
                failures.append(f"{case} {name}: {err:.3g}")
        if want["dsinks"] is not None:  # each rank returns its share; the data-parallel reduction sums them
            got = sum(r[i]["dsinks"] for r in per_rank)
            err = (got - want["dsinks"]).abs().max().item()
            if not err <= 1e-10:
                failures.append(f"{case} dsinks: {err:.3g}")
    assert not failures, f"{len(failures)} of {len(grid)} cases differ from fp64 full attention:\n" + "\n".join(
        failures[:40]
    )


def test_fp32_with_a_score_function_that_promotes():
    """fp32 inputs; ALiBi's slopes are fp64, so the score function returns fp64: the kernel keeps fp32.

    Tolerance 1e-5: fp32 rounds each logit and merge at ~1e-7 relative (values of O(1)); a wrong tile,
    sink or merge errs by O(0.1).
    """
    cfg = dict(batch=2, heads=4, kv_heads=2, seq_len=24, head_dim=4)
    inputs, ids = make_inputs(cfg, seed=7), _document_ids(2, 24)
    grid = [("ring", "zigzag", "causal", "cap+alibi+sinks"), ("hybrid", "contiguous", "documents", "cap+alibi+sinks")]
    per_rank = mp_pool.run_on_ranks(4, grid_on_rank, 4, grid, inputs, ids, torch.float32)
    for i, case in enumerate(grid):
        want = expected(case, inputs, ids)
        for name in ("out", "dq", "dk", "dv"):
            got = unshard([r[i][name] for r in per_rank], 4, case[1]).double()
            assert (got - want[name]).abs().max().item() <= 1e-5, (case, name)
        got = sum(r[i]["dsinks"] for r in per_rank).double()
        assert (got - want["dsinks"]).abs().max().item() <= 1e-5, (case, "dsinks")


def test_a_mask_mod_skips_the_blocks_and_tiles_it_empties():
    """The ring's plan under ``first_half_only``: a K/V block of the other half gets no kernel call at all,
    and every call it makes covers some visible pair: the kernels compute half the pairs of the plain plan."""
    seq_len, size, tile = 24, 4, 3
    spec = MaskSpec(causal=False, mask_mod=first_half_only, batch=1, tile=tile)
    runs = [shard_runs(seq_len, size, r, "contiguous") for r in range(size)]
    masked_pairs = plain_pairs = 0
    for rank in range(size):
        plans = [
            RingPlan(None, rank, size, runs[rank], runs.__getitem__, causal=False, scale=1.0, mask=mask)
            for mask in (spec, None)
        ]
        for step in range(size):
            calls, plain = plans[0].calls(step), plans[1].calls(step)
            q_pos, kv_pos = positions(runs[rank]), positions(runs[(rank - step) % size])
            visible = first_half_only(None, None, q_pos[:, None], kv_pos[None, :])  # (S, S) of this block
            assert (len(calls) == 0) == (not bool(visible.any())), (rank, step, len(calls))
            for block, _ in calls:
                assert bool(visible[block.q, block.kv].any()), f"rank {rank} step {step}: a call sees nothing"
            masked_pairs += sum((b.q_stop - b.q_start) * (b.kv_stop - b.kv_start) for b, _ in calls)
            plain_pairs += sum((b.q_stop - b.q_start) * (b.kv_stop - b.kv_start) for b, _ in plain)
    # the halves are aligned with the tiles: the kernels compute exactly the 2 x 12 x 12 visible pairs
    assert (masked_pairs, plain_pairs) == (2 * 12 * 12, 24 * 24)


def test_a_mask_mod_that_depends_on_the_head_is_refused():
    with pytest.raises(ValueError, match="depends on the head index h"):
        from cp_dtensor.positions.masks import check_mask_mod

        check_mask_mod(lambda b, h, q, k: (k <= q) & (h == 0), batch=1, num_heads=4, seq_len=16)


def validate_case(world_size: int) -> list[str]:
    """Runs on every rank: validate=True with the same score function everywhere, then with sinks that differ."""
    group = mp_pool.group(world_size)
    q = torch.randn(1, 4, 8, 4, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    context_parallel_attention(q, q, q, group, causal=True, score_mod=alibi, sinks=SINKS.float(), validate=True)
    sinks = SINKS.to(torch.bfloat16) + group.rank  # a rank that loaded another checkpoint
    try:
        context_parallel_attention(q, q, q, group, causal=True, sinks=sinks, validate=True)
    except ValueError as err:
        return [str(err)]
    return ["no error"]


def test_validate_names_sinks_that_differ_across_ranks():
    for (message,) in mp_pool.run_on_ranks(2, validate_case, 2):
        assert "sinks" in message and "content sha1" in message, message
