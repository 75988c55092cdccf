"""Activation checkpointing of the decoder blocks: same gradients as without, less kept for the backward.

Every strategy over cp (DDP over dp x cp), and tensor parallelism (cp 2 x tp 2), in float64. The
gradients must be EQUAL (tolerance 0): checkpointing re-runs the same ops on the same values, so the
recompute is bitwise the forward. Bytes kept for the backward are counted with saved-tensor hooks
(checkpointed regions keep their tensors behind their own hooks), so a no-op checkpoint fails too.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mp_pool
import pytest
import torch
from helpers import train_case
from torch.distributed.tensor import DTensor

from cp_dtensor import apply_ddp, shift_labels
from cp_dtensor.parallel.tensor_parallel import parallelize_for_tp
from cp_dtensor.training import ModelConfig, TransformerWithCP, apply_activation_checkpointing
from cp_dtensor.training.model import AC_MODES

REPO = Path(__file__).resolve().parents[1]
CONFIG = ModelConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96)
SEQ_LEN, GLOBAL_BATCH = 16, 4


def _batch(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CONFIG.vocab_size, (GLOBAL_BATCH, SEQ_LEN), generator=gen)
    return {"input_ids": ids, "labels": shift_labels(ids, torch.rand(GLOBAL_BATCH, SEQ_LEN, generator=gen) < 0.5)}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def ac_case(cp_size: int, dp_size: int, tp_size: int, strategy: str, ulysses_size: int | None, batch: dict) -> dict:
    """On every rank: loss, whole gradients and bytes saved for the backward under each checkpointing mode."""
    extra = {k: v for k, v in (("tp_size", tp_size), ("ulysses_size", ulysses_size)) if v and v > 1}
    group = mp_pool.group(cp_size, dp_size=dp_size, **extra)
    dp, dp_rank = group.dp_mesh.size(), group.dp_mesh.get_local_rank()
    rows = slice(dp_rank * GLOBAL_BATCH // dp, (dp_rank + 1) * GLOBAL_BATCH // dp)
    ids, labels = (group.partition_sequence(batch[k][rows], seq_dim=1) for k in ("input_ids", "labels"))
    results = {}
    for mode in AC_MODES:
        torch.manual_seed(0)
        model = TransformerWithCP(replace(CONFIG, strategy=strategy, activation_checkpointing=mode), cp_group=group)
        model = parallelize_for_tp(model.double(), group)
        synced = apply_ddp(model, group)
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor, saved: dict = saved) -> torch.Tensor:
            try:
                storage = _local(t).untyped_storage()
                saved[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:  # a wrapper subclass without storage (async collective result): its own bytes
                saved[id(t)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = synced(ids, labels)
        loss.backward()
        grads = {
            n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for n, p in model.named_parameters()
        }
        results[mode] = {"loss": loss.item(), "grads": grads, "saved_bytes": sum(saved.values())}
    return results


CASES = [  # (cp, dp, tp, strategy, ulysses_size): 4 ranks each
    (2, 2, 1, "ring", None),
    (2, 2, 1, "ulysses", None),
    (2, 2, 1, "allgather", None),
    (4, 1, 1, "hybrid", 2),
    (2, 1, 2, "ring", None),
]


@pytest.mark.parametrize(("cp_size", "dp_size", "tp_size", "strategy", "ulysses_size"), CASES)
def test_checkpointing_keeps_gradients_and_saves_memory(cp_size, dp_size, tp_size, strategy, ulysses_size):
    batch = _batch(seed=cp_size + tp_size)
    ranks = mp_pool.run_on_ranks(
        cp_size * dp_size * tp_size, ac_case, cp_size, dp_size, tp_size, strategy, ulysses_size, batch
    )
    for rank in ranks:
        none = rank["none"]
        for mode in ("full", "selective"):
            assert rank[mode]["loss"] == none["loss"], mode
            for name, grad in none["grads"].items():
                torch.testing.assert_close(rank[mode]["grads"][name], grad, rtol=0, atol=0, msg=f"{mode} {name}")
        saved = [rank[mode]["saved_bytes"] for mode in ("full", "selective", "none")]
        assert saved == sorted(saved) and len(set(saved)) == 3, dict(zip(("full", "selective", "none"), saved))


def test_unknown_mode_is_a_value_error():
    with pytest.raises(ValueError, match="'sometimes'. Must be one of: 'none', 'full', 'selective'"):
        apply_activation_checkpointing(torch.nn.Linear(2, 2), "sometimes")


# ---- the job: --ac and --loss-chunk-size for a few steps (2 ranks) ------------------------------------------

TINY = [
    "--seq-len",
    "32",
    "--batch-size",
    "2",
    "--hidden-size",
    "16",
    "--num-heads",
    "2",
    "--num-layers",
    "2",
    "--num-pairs",
    "4",
    "--num-keys",
    "4",
    "--num-values",
    "4",
    "--steps",
    "3",
    "--warmup",
    "1",
    "--eval-samples",
    "4",
    "--log-every",
    "1",
    "--dtype",
    "float64",
    "--seed",
    "3",
    "--cp",
    "2",
    "--packed",
    "2",
]


def test_job_with_checkpointing_and_chunked_loss_follows_the_same_curve():
    # The job's train() on the rank pool (the launch itself is tested by tests/test_train.py).
    # fp64: checkpointing is bitwise; the chunked loss differs only in summation order.
    plain = mp_pool.run_on_ranks(2, train_case, TINY)[0]["losses"]
    ac = mp_pool.run_on_ranks(2, train_case, [*TINY, "--ac", "full", "--loss-chunk-size", "5"])[0]["losses"]
    assert ac == pytest.approx(plain, rel=1e-10, abs=0)
