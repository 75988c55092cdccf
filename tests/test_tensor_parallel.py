"""CP x TP and DP x CP x TP (parallelize_for_tp on the ("dp", "cp", "tp") mesh) vs one process on the global batch."""

from __future__ import annotations

import mp_pool
import pytest
import torch
from torch.distributed.tensor import DTensor

from cp_dtensor import ModelConfig, TransformerWithCP, apply_ddp, shift_labels
from cp_dtensor.tensor_parallel import check_tp_heads, parallelize_for_tp, tp_plan

SEQ_LEN, GLOBAL_BATCH, LR = 16, 4, 1e-2


def config(num_kv_heads: int) -> ModelConfig:
    # 4 query heads: tp=2 splits them; num_kv_heads=2 splits K/V too, num_kv_heads=1 (MQA) replicates it.
    return ModelConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=num_kv_heads,
                       intermediate_size=48)


def make_batch(seed: int) -> dict[str, torch.Tensor]:
    """Global batch; labels on a random half of the positions, so ranks hold unequal token counts."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (GLOBAL_BATCH, SEQ_LEN), generator=gen)
    mask = torch.rand(GLOBAL_BATCH, SEQ_LEN, generator=gen) < 0.5
    return {"input_ids": ids, "labels": shift_labels(ids, mask)}


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def step_case(cp_size: int, dp_size: int, tp_size: int, num_kv_heads: int, batch: dict) -> dict:
    """On every rank: logits, loss, gradient and one AdamW step on this rank's share of the batch.

    The one-process oracle (all sizes 1) runs the bare model; the others parallelize over tp and
    sum gradients over dp x cp with apply_ddp.
    """
    extra = {"tp_size": tp_size} if tp_size > 1 else {}
    group = mp_pool.group(cp_size, dp_size=dp_size, **extra)
    torch.manual_seed(1)  # the same initial weights in every process
    model = TransformerWithCP(config(num_kv_heads), cp_group=group).double()
    model = parallelize_for_tp(model, group)
    synced = apply_ddp(model, group) if cp_size * dp_size * tp_size > 1 else model
    optimizer = torch.optim.AdamW(synced.parameters(), lr=LR, weight_decay=0.1)
    dp, dp_rank = group.dp_mesh.size(), group.dp_mesh.get_local_rank()
    rows = slice(dp_rank * GLOBAL_BATCH // dp, (dp_rank + 1) * GLOBAL_BATCH // dp)
    ids, labels = (group.partition_sequence(batch[k][rows], seq_dim=1) for k in ("input_ids", "labels"))
    logits = group.gather_sequence(synced(ids, return_logits=True), seq_dim=1)
    loss = synced(ids, labels)
    loss.backward()
    grads = {n: _whole(p.grad) for n, p in model.named_parameters()}
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)  # the global norm must work on DTensors
    optimizer.step()
    return {"loss": loss.item(), "logits": logits.detach(), "grads": grads,
            "params": {n: _whole(p.detach()) for n, p in model.named_parameters()},
            "placements": {n: str(getattr(p, "placements", "plain")) for n, p in model.named_parameters()}}


def _check_against_one_process(ranks: list[dict], single: dict, dp_size: int) -> None:
    rows_per_dp = GLOBAL_BATCH // dp_size
    for rank, r in enumerate(ranks):
        dp_rank = rank // (len(ranks) // dp_size)
        # fp64; tp splits each matmul into partial sums (all-reduced) and cp splits attention and the
        # loss into blocks: only the order of additions differs, ~1e-16 relative per sum.
        expected = single["logits"][dp_rank * rows_per_dp:(dp_rank + 1) * rows_per_dp]
        torch.testing.assert_close(r["logits"], expected, rtol=0, atol=1e-12)
        assert r["loss"] == pytest.approx(single["loss"], rel=1e-12, abs=0)
    for name, expected in single["params"].items():
        for r in ranks[1:]:  # every tp shard and every replica ends on the same whole weights, bit for bit
            assert torch.equal(r["params"][name], ranks[0]["params"][name]), name
        # The synced gradient is the one-process gradient (Adam alone would hide a wrong scale, e.g. a
        # sum over tp too); fp64, only the summation order differs.
        torch.testing.assert_close(ranks[0]["grads"][name], single["grads"][name], rtol=0, atol=1e-12, msg=name)
        # Adam's first step divides by |g|: an element is off by about lr * 1e-16 / |g|, far below 1e-11.
        torch.testing.assert_close(ranks[0]["params"][name], expected, rtol=0, atol=1e-11, msg=name)


@pytest.mark.parametrize("num_kv_heads", [2, 1], ids=["kv-sharded", "kv-replicated"])
def test_cp2_tp2_step_equals_one_process_step(num_kv_heads):
    batch = make_batch(seed=num_kv_heads)
    ranks = mp_pool.run_on_ranks(4, step_case, 2, 1, 2, num_kv_heads, batch)
    (single,) = mp_pool.run_on_ranks(1, step_case, 1, 1, 1, num_kv_heads, batch)
    _check_against_one_process(ranks, single, dp_size=1)
    placements = ranks[0]["placements"]
    assert placements["layers.0.attn.q_proj.weight"] == "(Shard(dim=0),)"
    assert placements["layers.0.attn.o_proj.weight"] == "(Shard(dim=1),)"
    kv = "(Shard(dim=0),)" if num_kv_heads == 2 else "(Replicate(),)"
    assert placements["layers.0.attn.k_proj.weight"] == kv
    assert placements["layers.0.attn_norm.weight"] == "(Replicate(),)"


def test_dp2_cp2_tp2_step_equals_one_process_step():
    batch = make_batch(seed=11)
    ranks = mp_pool.run_on_ranks(8, step_case, 2, 2, 2, 2, batch)
    (single,) = mp_pool.run_on_ranks(1, step_case, 1, 1, 1, 2, batch)
    _check_against_one_process(ranks, single, dp_size=2)


# ---- errors ---------------------------------------------------------------------------------------


def test_heads_must_split_over_tp():
    with pytest.raises(ValueError, match="num_heads=6 must be divisible by tp_size=4"):
        check_tp_heads(6, 6, 4)
    with pytest.raises(ValueError, match="num_kv_heads=2 and tp_size=3: one must divide the other"):
        check_tp_heads(6, 2, 3)
    check_tp_heads(8, 2, 4)  # K/V heads replicated on 2 ranks each
    check_tp_heads(8, 8, 4)
    with pytest.raises(ValueError, match="got Linear"):
        tp_plan(torch.nn.Linear(2, 2), 2)
