"""CP x TP and DP x CP x TP (parallelize_for_tp on the ("dp", "cp", "tp") mesh) vs one process on the global batch."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import mp_pool
import pytest
import torch
from helpers import TINY_JOB as TINY
from helpers import train_case
from torch.distributed.tensor import DTensor

from cp_dtensor import apply_ddp, shift_labels
from cp_dtensor.parallel.tensor_parallel import check_tp_heads, parallelize_for_tp, tp_plan
from cp_dtensor.training import ModelConfig, TransformerWithCP

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN, GLOBAL_BATCH, LR = 16, 4, 1e-2


def config(num_kv_heads: int) -> ModelConfig:
    # 4 query heads: tp=2 splits them; num_kv_heads=2 splits K/V too, num_kv_heads=1 (MQA) replicates it.
    return ModelConfig(
        vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=num_kv_heads, intermediate_size=48
    )


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
    grad_norm = _whole(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9))  # no clipping
    optimizer.step()
    return {
        "loss": loss.item(),
        "logits": logits.detach(),
        "grads": grads,
        "grad_norm": grad_norm.item(),
        "params": {n: _whole(p.detach()) for n, p in model.named_parameters()},
        "placements": {n: str(getattr(p, "placements", "plain")) for n, p in model.named_parameters()},
    }


def _check_against_one_process(ranks: list[dict], single: dict, dp_size: int) -> None:
    rows_per_dp = GLOBAL_BATCH // dp_size
    for rank, r in enumerate(ranks):
        dp_rank = rank // (len(ranks) // dp_size)
        # fp64; tp splits each matmul into partial sums (all-reduced) and cp splits attention and the
        # loss into blocks: only the order of additions differs, ~1e-16 relative per sum.
        expected = single["logits"][dp_rank * rows_per_dp : (dp_rank + 1) * rows_per_dp]
        torch.testing.assert_close(r["logits"], expected, rtol=0, atol=1e-12)
        assert r["loss"] == pytest.approx(single["loss"], rel=1e-12, abs=0)
        # clip_grad_norm_ over DTensors: shards' squares summed over tp, replicated weights counted once.
        assert r["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-12, abs=0)
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


# ---- communication --------------------------------------------------------------------------------


def comm_case(num_kv_heads: int, batch: dict) -> dict:
    """On every rank of cp 2 x tp 2: DTensor's collectives in one forward and one backward, and the ring's bytes."""
    from torch.distributed.tensor.debug import CommDebugMode

    from cp_dtensor import count_comm

    group = mp_pool.group(2, dp_size=1, tp_size=2)
    torch.manual_seed(1)
    model = parallelize_for_tp(TransformerWithCP(config(num_kv_heads), cp_group=group).double(), group)
    ids, labels = (group.partition_sequence(batch[k][:1], seq_dim=1) for k in ("input_ids", "labels"))
    with CommDebugMode() as forward, count_comm() as ring:
        loss = model(ids, labels)
    with CommDebugMode() as backward:
        loss.backward()
    return {
        "forward": {str(k): v for k, v in forward.get_comm_counts().items()},
        "backward": {str(k): v for k, v in backward.get_comm_counts().items()},
        "ring_bytes": ring.bytes["ring_send"],
    }


@pytest.mark.parametrize("num_kv_heads", [2, 1], ids=["kv-sharded", "kv-replicated"])
def test_tp_collectives_and_ring_bytes_per_step(num_kv_heads):
    layers, cp, tp = config(num_kv_heads).num_layers, 2, 2
    ranks = mp_pool.run_on_ranks(4, comm_case, num_kv_heads, make_batch(seed=3))
    for r in ranks:
        # Forward: the vocab-parallel embedding's all-reduce, then o_proj's and w2's per layer; the LM
        # head all-gathers the logits; the loss sums its counts over dp x cp (one more functional
        # all-reduce, traceable by torch.compile).
        assert r["forward"] == {
            "c10d_functional.all_reduce": 1 + 2 * layers + 1,
            "c10d_functional.all_gather_into_tensor": 1,
        }
        # Backward: the input gradients of q, k, v and of the MLP per layer, and of the LM head; with
        # replicated K/V heads also the k and v weight gradients (partial over tp).
        extra = 0 if num_kv_heads % tp == 0 else 2 * layers
        assert r["backward"] == {"c10d_functional.all_reduce": 4 * layers + 1 + extra}
        # The ring carries only this tp rank's K/V heads: layers x (P - 1) hops x (K, V) x (1, H_kv / tp
        # or 1, S, D) fp64 values.
        local_kv_heads, seq_local, head_dim = max(num_kv_heads // tp, 1), SEQ_LEN // cp, 32 // 4
        assert r["ring_bytes"] == layers * (cp - 1) * 2 * local_kv_heads * seq_local * head_dim * 8


# ---- checkpoints ----------------------------------------------------------------------------------


def _tp_model(cp_size: int, dp_size: int, tp_size: int, seed: int):
    extra = {"tp_size": tp_size} if tp_size > 1 else {}
    group = mp_pool.group(cp_size, dp_size=dp_size, **extra)
    torch.manual_seed(seed)
    model = parallelize_for_tp(TransformerWithCP(config(2), cp_group=group).double(), group)
    synced = apply_ddp(model, group) if cp_size * dp_size * tp_size > 1 else model
    return group, synced, torch.optim.AdamW(synced.parameters(), lr=LR, weight_decay=0.1)


def _train_step(group, model, optimizer, batch: dict) -> float:
    dp, dp_rank = group.dp_mesh.size(), group.dp_mesh.get_local_rank()
    rows = slice(dp_rank * GLOBAL_BATCH // dp, (dp_rank + 1) * GLOBAL_BATCH // dp)
    ids, labels = (group.partition_sequence(batch[k][rows], seq_dim=1) for k in ("input_ids", "labels"))
    loss = model(ids, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def resume_case(ckpt_dir: str, sizes: tuple[int, int, int], batches: list[dict], save: bool) -> dict:
    """With ``save``: step 1, checkpoint, step 2 straight on. Always: a model with OTHER initial
    weights loads the checkpoint and takes step 2. Returns both step-2 losses and weights."""
    from cp_dtensor import latest_checkpoint, load_checkpoint, save_checkpoint

    out = {}
    if save:
        group, model, optimizer = _tp_model(*sizes, seed=1)
        _train_step(group, model, optimizer, batches[0])
        save_checkpoint(ckpt_dir, 1, model, optimizer, {"step": 1})
        out["straight_loss"] = _train_step(group, model, optimizer, batches[1])
        out["straight_params"] = {n: _whole(p.detach()) for n, p in model.named_parameters()}
    group, model, optimizer = _tp_model(*sizes, seed=7)
    out["train_state"] = load_checkpoint(latest_checkpoint(ckpt_dir), model, optimizer)
    out["resumed_loss"] = _train_step(group, model, optimizer, batches[1])
    out["resumed_params"] = {n: _whole(p.detach()) for n, p in model.named_parameters()}
    return out


def test_checkpoint_resumes_across_dp_cp_tp_and_into_other_splits(tmp_path):
    batches = [make_batch(seed=21), make_batch(seed=22)]
    ranks = mp_pool.run_on_ranks(8, resume_case, str(tmp_path), (2, 2, 2), batches, True)
    # Resharded: tp 4 splits the 4 query heads 1 per rank and replicates the 2 K/V heads (saved as shards).
    tp4 = mp_pool.run_on_ranks(8, resume_case, str(tmp_path), (2, 1, 4), batches, False)
    (single,) = mp_pool.run_on_ranks(1, resume_case, str(tmp_path), (1, 1, 1), batches, False)
    for r in [*ranks, *tp4, single]:
        assert r["train_state"] == {"step": 1}
        # fp64; the resumed dp x cp x tp run repeats the straight run's sums, the other splits sum in
        # another order (~1e-16 relative).
        assert r["resumed_loss"] == pytest.approx(ranks[0]["straight_loss"], rel=1e-12, abs=0)
        for name, expected in ranks[0]["straight_params"].items():
            # Adam's state came back too (a fresh Adam would move every weight by ~lr): ~lr * 1e-16 / |g|.
            torch.testing.assert_close(r["resumed_params"][name], expected, rtol=0, atol=1e-11, msg=name)


# ---- the mesh -------------------------------------------------------------------------------------


def mesh_case() -> dict:
    import torch.distributed as dist

    from cp_dtensor import init_context_parallel_group

    three_d, hybrid = mp_pool.group(2, dp_size=2, tp_size=2), mp_pool.group(4, ulysses_size=2, tp_size=2)
    errors = []
    for cp_size, dp_size in ((3, None), (2, 3)):
        try:
            init_context_parallel_group(cp_size, dp_size=dp_size, tp_size=2, timeout=mp_pool.GROUP_TIMEOUT_S)
        except ValueError as e:
            errors.append(str(e))
    return {
        "dims": three_d.mesh.mesh_dim_names,
        "grid": three_d.mesh.mesh.tolist(),
        "dp": three_d.dp_mesh.get_local_rank(),
        "cp": three_d.rank,
        "tp": three_d.tp_mesh.get_local_rank(),
        "tp_ranks": dist.get_process_group_ranks(three_d.tp_mesh.get_group()),
        "dp_cp_ranks": dist.get_process_group_ranks(three_d.flat_dp_cp_mesh.get_group()),
        "hybrid_dims": hybrid.mesh.mesh_dim_names,
        "hybrid": (
            hybrid.rank,
            hybrid.ring_mesh.get_local_rank(),
            hybrid.ulysses_mesh.get_local_rank(),
            hybrid.tp_size,
        ),
        "errors": errors,
    }


def test_tp_axis_is_innermost_so_tp_groups_are_consecutive_ranks():
    sys.path.insert(0, str(REPO / "docs" / "scripts"))
    try:
        from fig_mesh_3d import rank_grid  # the rule the docs' 64-GPU figure is drawn with
    finally:
        sys.path.remove(str(REPO / "docs" / "scripts"))
    for rank, r in enumerate(mp_pool.run_on_ranks(8, mesh_case)):
        assert r["dims"] == ("dp", "cp", "tp")
        assert r["grid"] == rank_grid(2, 2, 2).tolist()
        assert (r["dp"], r["cp"], r["tp"]) == (rank // 4, rank // 2 % 2, rank % 2)
        assert r["tp_ranks"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert r["dp_cp_ranks"] == [rank % 2 + 2 * i for i in range(4)]  # gradients are summed here
        assert r["hybrid_dims"] == ("dp", "ring", "ulysses", "tp")
        assert r["hybrid"] == (rank // 2, rank // 4, rank // 2 % 2, 2)
        assert r["errors"] == [
            "cp_size * tp_size = 3 * 2 does not divide the world size 8.",
            "dp_size * cp_size * tp_size = 3 * 2 * 2 = 12 must equal the world size 8.",
        ]


def no_tp_case() -> dict:
    group = mp_pool.group(1)
    model = TransformerWithCP(config(2), cp_group=group)
    try:
        error = f"no error, got {group.tp_mesh}"
    except ValueError as e:
        error = str(e)
    return {
        "tp_size": group.tp_size,
        "error": error,
        "unchanged": parallelize_for_tp(model, group) is model,
        "plain": not any(isinstance(p, DTensor) for p in model.parameters()),
    }


def test_group_without_tp_axis():
    (r,) = mp_pool.run_on_ranks(1, no_tp_case)
    assert (r["tp_size"], r["unchanged"], r["plain"]) == (1, True, True)
    assert "init_context_parallel_group(cp_size, tp_size=t)" in r["error"]


# ---- the training job -----------------------------------------------------------------------------

# Tiny sizes: 32-token sequences (16 per cp rank), 4 query and 2 K/V heads over tp 2, fp64.


@pytest.fixture(scope="module")
def one_process_losses() -> list[float]:
    (single,) = mp_pool.run_on_ranks(1, train_case, [*TINY, "--cp", "1"])
    return single["losses"]


def test_train_job_3d_matches_one_process(one_process_losses):
    """The Production page's 3-D configuration (dp x cp x tp) at CPU size.

    Run in the session's 8-rank pool (``train(parse_args(argv))``, the job minus its launcher): a
    torchrun launch of 8 fresh processes would double this file's time on 2 cores, and
    tests/test_train.py and docs/examples/train_3d.py already go through torchrun.
    """
    for r in mp_pool.run_on_ranks(8, train_case, [*TINY, "--dp", "2", "--cp", "2", "--tp", "2"]):
        assert r["mesh"] == (2, 2, 2, 8)
        # fp64, three AdamW steps with clipping: the sums run in another order (~1e-16 relative), and
        # Adam's division by sqrt(v) passes that on about as is; 1e-10 leaves room for three steps of it.
        assert r["losses"] == pytest.approx(one_process_losses, rel=1e-10, abs=0)


def test_train_job_cp2_tp2_matches_one_process_and_resumes(tmp_path, one_process_losses):
    """The Production page's CP + TP setup at CPU size; a run resumed from its step-2 checkpoint gives step 3's loss."""
    ckpt = ["--cp", "2", "--tp", "2", "--ckpt-dir", str(tmp_path), "--save-every", "2"]
    straight = mp_pool.run_on_ranks(4, train_case, [*TINY, *ckpt])
    assert straight[0]["mesh"] == (1, 2, 2, 4)
    assert straight[0]["losses"] == pytest.approx(one_process_losses, rel=1e-10, abs=0)  # as in the 3-D test
    shutil.rmtree(tmp_path / "step_00000003")  # resume from step 2, as after a crash in step 3
    resumed = mp_pool.run_on_ranks(4, train_case, [*TINY, *ckpt, "--resume"])
    for r in resumed:
        # fp64, the same split and the same restored state: the same sums in the same order.
        assert r["losses"] == pytest.approx(straight[0]["losses"][2:], rel=1e-12, abs=0)
