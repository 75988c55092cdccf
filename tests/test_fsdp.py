"""FSDP2 over dp x cp (and tp): one AdamW step on gloo ranks equals the same step in one process."""

from __future__ import annotations

import shutil

import mp_pool
import pytest
import torch
from helpers import TINY_JOB as TINY
from helpers import train_case
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from cp_dtensor import apply_fsdp, parallelize_for_tp, shift_labels
from cp_dtensor.training import ModelConfig, TransformerWithCP

SEQ_LEN, GLOBAL_BATCH, LR = 16, 4, 1e-2
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def config(num_kv_heads: int, ac: str = "none", mlp_tile_size: int | None = None) -> ModelConfig:
    # 4 query heads: tp=2 splits them; 2 K/V heads are split too, 1 (MQA) is replicated over tp.
    return ModelConfig(
        vocab_size=32,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=num_kv_heads,
        intermediate_size=48,
        activation_checkpointing=ac,
        mlp_tile_size=mlp_tile_size,
    )


def make_batch(seed: int) -> dict[str, torch.Tensor]:
    """Global batch; labels on a random half of the positions, so ranks hold unequal token counts."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (GLOBAL_BATCH, SEQ_LEN), generator=gen)
    mask = torch.rand(GLOBAL_BATCH, SEQ_LEN, generator=gen) < 0.5
    return {"input_ids": ids, "labels": shift_labels(ids, mask)}


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def step_case(
    sizes: tuple[int, int, int],
    dtype: str,
    batch: dict,
    divide_factor: float | None = 1.0,
    num_kv_heads: int = 2,
    bf16_compute: bool = False,
    ac: str = "none",
    point_to_point: bool = False,
    mlp_tile_size: int | None = None,
) -> dict:
    """On every rank: one forward, backward and AdamW step on this rank's share of the batch.

    ``sizes`` is ``(dp, cp, tp)``; ``(1, 1, 1)`` is the one-process oracle, run on the bare model.
    ``divide_factor`` overrides what apply_fsdp sets (``None``: FSDP's default average), to show the
    test catches a wrong one. ``point_to_point``: FSDP's collectives as the memory measurement makes
    them (bench.memory_measure, sends and receives).
    """
    dp_size, cp_size, tp_size = sizes
    extra = {"tp_size": tp_size} if tp_size > 1 else {}
    group = mp_pool.group(cp_size, dp_size=dp_size, **extra)
    torch.manual_seed(1)  # the same initial weights in every process
    # ac: activation checkpointing of each block, applied (by the model) before fully_shard wraps it.
    model = TransformerWithCP(config(num_kv_heads, ac, mlp_tile_size), cp_group=group).to(DTYPES[dtype])
    if dp_size * cp_size * tp_size > 1:
        mp_policy = None
        if bf16_compute:  # bf16 weights in forward and backward, fp32 gradient reduction and master weights
            mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model = apply_fsdp(parallelize_for_tp(model, group), group, mp_policy=mp_policy)
        if point_to_point:
            from bench.memory_measure import PointToPointAllGather, PointToPointReduceScatter

            for module in model.modules():
                if hasattr(module, "set_custom_all_gather"):
                    module.set_custom_all_gather(PointToPointAllGather())
                    module.set_custom_reduce_scatter(PointToPointReduceScatter())
        if divide_factor != 1.0:
            for module in model.modules():
                if hasattr(module, "set_gradient_divide_factor"):
                    module.set_gradient_divide_factor(divide_factor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    dp_rank = group.dp_mesh.get_local_rank()
    rows = slice(dp_rank * GLOBAL_BATCH // dp_size, (dp_rank + 1) * GLOBAL_BATCH // dp_size)
    ids, labels = (group.partition_sequence(batch[k][rows], seq_dim=1) for k in ("input_ids", "labels"))
    loss = model(ids, labels)
    loss.backward()
    grads = {n: _whole(p.grad) for n, p in model.named_parameters()}
    optimizer.step()
    return {
        "loss": loss.item(),
        "grads": grads,
        "params": {n: _whole(p.detach()) for n, p in model.named_parameters()},
        "placements": {n: str(getattr(p, "placements", "plain")) for n, p in model.named_parameters()},
    }


def _check(ranks: list[dict], single: dict, atol: float, min_grad: float = 0.0) -> None:
    """Loss, every gathered gradient and every weight after the step, on every rank, against one process.

    ``min_grad``: compare the weights only where the one-process gradient is at least this large.
    AdamW's first step moves a weight by about ``lr * g / (|g| + eps)``: where ``|g|`` is near the
    rounding error of the dtype, the reordered sum may flip its sign and the step by ``2 lr``.
    """
    for r in ranks:
        assert r["loss"] == pytest.approx(single["loss"], rel=atol, abs=0)
        for name, expected in single["params"].items():
            # Every rank gathers the same whole tensors (full_tensor() of one sharded DTensor).
            torch.testing.assert_close(r["grads"][name], single["grads"][name], rtol=0, atol=atol, msg=name)
            kept = single["grads"][name].abs() >= min_grad
            torch.testing.assert_close(r["params"][name][kept], expected[kept], rtol=0, atol=atol, msg=name)


def test_fsdp_bf16_compute_fp32_reduce_step_is_close_to_the_fp32_step():
    """MixedPrecisionPolicy(bf16 params, fp32 reduce) on gloo: the loss and gradients of bf16 compute."""
    batch = make_batch(seed=6)
    ranks = mp_pool.run_on_ranks(4, step_case, (2, 2, 1), "float32", batch, bf16_compute=True)
    (single,) = mp_pool.run_on_ranks(1, step_case, (1, 1, 1), "float32", batch)
    for r in ranks:
        # bf16 has 8 bits of mantissa: ~4e-3 relative per rounding, a few roundings deep.
        assert r["loss"] == pytest.approx(single["loss"], rel=2e-2)
        assert r["loss"] != pytest.approx(single["loss"], rel=1e-5)  # the policy did compute in bf16
        for name, expected in single["grads"].items():
            assert r["grads"][name].dtype == torch.float32, name  # reduced and kept in fp32
            err = (r["grads"][name] - expected).norm() / expected.norm().clamp_min(1e-12)
            assert err < 5e-2, f"{name}: relative error {err:.3g}"


# fp64: the ranks add the same terms in another order (cp blocks of attention and of the loss, the
# reduce-scatter over dp x cp, tp's partial sums), ~1e-16 relative per sum; AdamW's first step divides
# by |g|, so a weight is off by about lr * 1e-16 / |g|: all far below 1e-10.
@pytest.mark.parametrize(
    ("sizes", "num_kv_heads"),
    [((2, 2, 1), 2), ((1, 4, 1), 2), ((1, 2, 2), 2), ((1, 2, 2), 1), ((2, 2, 2), 2)],
    ids=["dp2-cp2", "cp4", "dp1-cp2-tp2", "dp1-cp2-tp2-mqa", "dp2-cp2-tp2"],
)
def test_fsdp_step_equals_one_process_step(sizes, num_kv_heads):
    batch = make_batch(seed=sum(sizes))
    ranks = mp_pool.run_on_ranks(
        sizes[0] * sizes[1] * sizes[2], step_case, sizes, "float64", batch, num_kv_heads=num_kv_heads
    )
    (single,) = mp_pool.run_on_ranks(1, step_case, (1, 1, 1), "float64", batch, num_kv_heads=num_kv_heads)
    _check(ranks, single, atol=1e-10)
    placements = ranks[0]["placements"]
    if sizes[2] == 1:  # one axis: every parameter is a dim-0 shard over the 4 dp x cp ranks
        assert set(placements.values()) == {"(Shard(dim=0),)"}
    else:  # FSDP's shard over dp x cp in front of TP's own placement
        assert placements["layers.0.attn.q_proj.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
        kv = "(_StridedShard(dim=0, sf=2), Shard(dim=0))" if num_kv_heads == 2 else "(Shard(dim=0), Replicate())"
        assert placements["layers.0.attn.k_proj.weight"] == kv
        assert placements["layers.0.attn.o_proj.weight"] == "(Shard(dim=0), Shard(dim=1))"
        assert placements["layers.0.attn_norm.weight"] == "(Shard(dim=0), Replicate())"


@pytest.mark.parametrize("ac", ["full", "selective"])
def test_fsdp_with_activation_checkpointing_equals_one_process_step(ac):
    """Checkpointed blocks inside FSDP units (the ring re-run in the recompute under full): still exact."""
    batch = make_batch(seed=9)
    ranks = mp_pool.run_on_ranks(4, step_case, (2, 2, 1), "float64", batch, ac=ac)
    (single,) = mp_pool.run_on_ranks(1, step_case, (1, 1, 1), "float64", batch)
    _check(ranks, single, atol=1e-10)


def test_fsdp_with_tiled_mlp_equals_one_process_untiled_step():
    """The sequence-tiled MLP inside FSDP units (weights gathered around its per-tile recompute, its
    summed weight gradients reduce-scattered): the untiled one-process step. 3-token tiles of 8 local
    tokens per row (uneven tiles)."""
    batch = make_batch(seed=10)
    ranks = mp_pool.run_on_ranks(4, step_case, (2, 2, 1), "float64", batch, mlp_tile_size=3)
    (single,) = mp_pool.run_on_ranks(1, step_case, (1, 1, 1), "float64", batch)
    _check(ranks, single, atol=1e-10)  # fp64, sums in another order: as test_fsdp_step_equals_one_process_step


def test_fsdp_step_with_the_memory_measurements_point_to_point_comms_equals_one_process_step():
    """The all-gather and reduce-scatter the memory measurement swaps in (sends and receives on 4 ranks,
    so the reduce-scatter reuses sent chunks) give the same step as one process."""
    batch = make_batch(seed=7)
    ranks = mp_pool.run_on_ranks(4, step_case, (2, 2, 1), "float64", batch, point_to_point=True)
    (single,) = mp_pool.run_on_ranks(1, step_case, (1, 1, 1), "float64", batch)
    _check(ranks, single, atol=1e-10)  # fp64, sums in another order: as test_fsdp_step_equals_one_process_step


def test_fsdp_default_divide_factor_is_caught():
    """FSDP's default AVERAGES over the 4 dp x cp ranks: every gradient 4x too small, which the check sees."""
    batch = make_batch(seed=4)
    ranks = mp_pool.run_on_ranks(4, step_case, (2, 2, 1), "float64", batch, divide_factor=None)
    (single,) = mp_pool.run_on_ranks(1, step_case, (1, 1, 1), "float64", batch)
    with pytest.raises(AssertionError, match="embed.weight"):  # the first gradient compared
        _check(ranks, single, atol=1e-10)
    name = "layers.0.attn.q_proj.weight"
    torch.testing.assert_close(ranks[0]["grads"][name] * 4, single["grads"][name], rtol=0, atol=1e-12)


def test_fsdp_fp32_step_equals_one_process_step():
    """fp32 (the dtype mixed precision reduces in): FSDP's SUM reduce-scatter on gloo, within fp32 rounding."""
    batch = make_batch(seed=5)
    ranks = mp_pool.run_on_ranks(4, step_case, (2, 2, 1), "float32", batch)
    (single,) = mp_pool.run_on_ranks(1, step_case, (1, 1, 1), "float32", batch)
    # fp32: reordered sums differ by ~1e-7 relative; gradients are O(1e-2), so 1e-6 absolute; the
    # weights where |g| >= 1e-4, a thousand times the gradients' rounding error.
    _check(ranks, single, atol=1e-6, min_grad=1e-4)


# ---- checkpoints ----------------------------------------------------------------------------------


def _states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Every weight and AdamW moment, whole, by parameter name."""
    model = getattr(model, "module", model)  # DDP
    out = {}
    for name, p in model.named_parameters():
        out[name] = _whole(p.detach())
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}.{key}"] = _whole(optimizer.state[p][key])
    return out


def checkpoint_case(ckpt_dir: str, sizes: tuple[int, int, int], grad_sync: str, batch: dict, save: bool) -> dict:
    """With ``save``: one FSDP step, then a checkpoint. Else: a model of OTHER initial weights, wrapped
    per ``grad_sync`` (``"none"``: the bare model of one process), takes one step (so that the
    optimizer has state to overwrite) and loads the checkpoint. Returns the states after that."""
    from cp_dtensor import apply_ddp, latest_checkpoint, load_checkpoint, save_checkpoint

    dp_size, cp_size, tp_size = sizes
    extra = {"tp_size": tp_size} if tp_size > 1 else {}
    group = mp_pool.group(cp_size, dp_size=dp_size, **extra)
    torch.manual_seed(1 if save else 7)
    model = parallelize_for_tp(TransformerWithCP(config(2), cp_group=group).double(), group)
    wrapped = {"fsdp": apply_fsdp, "ddp": apply_ddp, "none": lambda m, g: m}[grad_sync](model, group)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=LR, weight_decay=0.1)
    dp_rank = group.dp_mesh.get_local_rank()
    rows = slice(dp_rank * GLOBAL_BATCH // dp_size, (dp_rank + 1) * GLOBAL_BATCH // dp_size)
    ids, labels = (group.partition_sequence(batch[k][rows], seq_dim=1) for k in ("input_ids", "labels"))
    wrapped(ids, labels).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if save:
        save_checkpoint(ckpt_dir, 1, wrapped, optimizer, {"step": 1})
    else:
        assert load_checkpoint(latest_checkpoint(ckpt_dir), wrapped, optimizer) == {"step": 1}
    return _states(wrapped, optimizer)


def test_fsdp_checkpoint_loads_into_one_process_ddp_and_other_splits_bit_equal(tmp_path):
    batch = make_batch(seed=9)
    saved = mp_pool.run_on_ranks(4, checkpoint_case, str(tmp_path), (2, 2, 1), "fsdp", batch, True)[0]
    loads = {
        "one process": mp_pool.run_on_ranks(1, checkpoint_case, str(tmp_path), (1, 1, 1), "none", batch, False),
        "ddp dp2 x cp2": mp_pool.run_on_ranks(4, checkpoint_case, str(tmp_path), (2, 2, 1), "ddp", batch, False),
        "fsdp cp2 x tp2": mp_pool.run_on_ranks(4, checkpoint_case, str(tmp_path), (1, 2, 2), "fsdp", batch, False),
    }
    for where, ranks in loads.items():
        for r in ranks:
            assert r.keys() == saved.keys(), where
            for key, expected in saved.items():  # DCP copies values: bit for bit
                assert torch.equal(r[key], expected), f"{where}: {key}"


# ---- the training job -----------------------------------------------------------------------------

# TINY (helpers.TINY_JOB): 32-token sequences (16 per cp rank), 4 query and 2 K/V heads, fp64, 3 steps.


def test_train_job_with_fsdp_matches_one_process_resumes_and_loads_into_one_process(tmp_path):
    """``--grad-sync fsdp`` at CPU size: the one-process loss curve; its step-2 checkpoint resumes the
    FSDP run, and continues in one process, with step 3's loss. The FSDP run also takes the flags of a
    planner's plan that change nothing in the math: ``--strategy auto`` and a tiled MLP (5-token tiles
    of 16 local tokens, uneven); the one-process run has neither."""
    (single,) = (r["losses"] for r in mp_pool.run_on_ranks(1, train_case, [*TINY, "--cp", "1"]))
    ckpt = ["--ckpt-dir", str(tmp_path), "--save-every", "2"]
    fsdp = [*TINY, "--dp", "2", "--cp", "2", "--grad-sync", "fsdp", "--strategy", "auto", "--mlp-tile-size", "5"]
    straight = [r["losses"] for r in mp_pool.run_on_ranks(4, train_case, [*fsdp, *ckpt])]
    # fp64, three AdamW steps with clipping: the sums run in another order (~1e-16 relative), and
    # Adam's division by sqrt(v) passes that on about as is; 1e-10 leaves room for three steps of it.
    assert straight[0] == pytest.approx(single, rel=1e-10, abs=0)
    shutil.rmtree(tmp_path / "step_00000003")  # resume from step 2, as after a crash in step 3
    resumed = [r["losses"] for r in mp_pool.run_on_ranks(4, train_case, [*fsdp, *ckpt, "--resume"])]
    assert resumed[0] == pytest.approx(straight[0][2:], rel=1e-12, abs=0)  # the same sums in the same order
    shutil.rmtree(tmp_path / "step_00000003")
    (one,) = (r["losses"] for r in mp_pool.run_on_ranks(1, train_case, [*TINY, "--cp", "1", *ckpt, "--resume"]))
    assert one == pytest.approx(single[2:], rel=1e-10, abs=0)


# ---- memory ---------------------------------------------------------------------------------------


def memory_case(grad_sync: str) -> dict:
    """One measured training step (bench.memory_measure) of a small model on cp 2, wrapped per ``grad_sync``."""
    from bench.memory_measure import measure_case

    torch.set_num_threads(1)
    model = {"vocab_size": 1024, "hidden_size": 128, "num_layers": 2, "num_heads": 4}  # weights ~ activations
    return measure_case(256, 2, model=model, cp_group=mp_pool.group(2), rss=False, grad_sync=grad_sync)


@pytest.mark.parametrize("grad_sync", ["ddp", "fsdp"])
def test_memory_estimate_of_ddp_and_fsdp_is_within_10_percent_of_the_measured_peak(grad_sync):
    ranks = mp_pool.run_on_ranks(2, memory_case, grad_sync)
    for r in ranks:
        # The measured peak is the same on every run, busy machine or not: FSDP's collectives go point
        # to point in the measurement, so no free falls to a gloo thread (Note [Measuring peak memory
        # on CPU] in bench/memory_measure.py).
        # The contract: the whole peak within 10%. The static parts are counted on both sides
        # (FSDP: this rank's shard, padding aside; DDP: whole, plus the gradient buckets), so they agree
        # to 1%; what is left is the activations and, under FSDP, the weights it has gathered.
        assert r["estimate"]["total"] == pytest.approx(r["peak_bytes"], rel=0.10)
        for part in ("grads", "optimizer_state"):
            assert r["estimate"]["components"][part] == pytest.approx(r["static"][part], rel=0.01), part


def test_docs_memory_table_is_the_committed_fsdp_measurement_against_the_current_estimator():
    import json
    from pathlib import Path

    from bench.memory_measure import grad_sync_table

    repo = Path(__file__).resolve().parents[1]
    page = (repo / "docs" / "memory.md").read_text()
    for name in ("memory_fsdp_110m_cpu.json", "memory_fsdp_cpu.json"):
        report = json.loads((repo / "bench" / "results" / name).read_text())
        table = grad_sync_table(report)  # estimates recomputed now: the page must follow the estimator
        assert table in page, f"regenerate it: python -m bench.memory_measure --report bench/results/{name}"
        for case in report["cases"]:
            assert abs(case["summary"]["relative_error"]) < 0.10, (name, case["summary"])
