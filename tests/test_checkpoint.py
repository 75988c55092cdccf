"""Checkpoints load into any dp x cp x tp split, larger or smaller than the one that saved them.

Weights and optimizer states must come back bit for bit (DCP only copies them), the ``train`` state
exactly, and training must go on; RNG states follow Note [RNG states across worlds] in
cp_dtensor/checkpoint.py. Real gloo ranks; the one-process world is a pool of one.
"""

from __future__ import annotations

import mp_pool
import pytest
import torch
from torch.distributed.tensor import DTensor

from cp_dtensor import apply_ddp, shift_labels
from cp_dtensor.parallel.tensor_parallel import parallelize_for_tp
from cp_dtensor.training import ModelConfig, TransformerWithCP

SEQ_LEN, BATCH = 16, 4
CONFIG = ModelConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48)


def _whole(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _batch(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (BATCH, SEQ_LEN), generator=gen)
    return {"input_ids": ids, "labels": shift_labels(ids)}


def _setup(sizes: tuple[int, int, int], seed: int):
    """The model on a (dp, cp, tp) split, wrapped and with AdamW, as the training job builds it."""
    dp, cp, tp = sizes
    extra = {"tp_size": tp} if tp > 1 else {}
    group = mp_pool.group(cp, dp_size=dp, **extra)
    torch.manual_seed(seed)
    model = TransformerWithCP(CONFIG, cp_group=group).double()
    if tp > 1:
        model = parallelize_for_tp(model, group)
    synced = apply_ddp(model, group) if dp * cp * tp > 1 else model
    return group, synced, torch.optim.AdamW(synced.parameters(), lr=1e-2, weight_decay=0.1)


def _step(group, model, optimizer, batch: dict) -> float:
    dp, dp_rank = group.dp_mesh.size(), group.dp_mesh.get_local_rank()
    rows = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    ids, labels = (group.partition_sequence(batch[k][rows], seq_dim=1) for k in ("input_ids", "labels"))
    loss = model(ids, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _states(model, optimizer) -> dict:
    """Every weight and optimizer state as a whole tensor, by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    out = {f"model.{k}": _whole(v).clone() for k, v in model_sd.items()}
    for name, state in optim_sd["state"].items():
        out.update({f"optim.{name}.{k}": _whole(v).clone() for k, v in state.items()})
    return out


def save_case(ckpt_dir: str, sizes: tuple[int, int, int]) -> dict:
    """Runs on every rank: two steps, then a checkpoint; returns the states saved."""
    from cp_dtensor import save_checkpoint

    group, model, optimizer = _setup(sizes, seed=1)
    for seed in (21, 22):
        _step(group, model, optimizer, _batch(seed))
    save_checkpoint(ckpt_dir, 2, model, optimizer, {"step": 2, "data_position": 8})
    return {"states": _states(model, optimizer), "rng": torch.get_rng_state()}


def load_case(ckpt_dir: str, sizes: tuple[int, int, int]) -> dict:
    """Runs on every rank: a model with other weights loads the checkpoint; states, RNG, one more step."""
    from cp_dtensor import latest_checkpoint, load_checkpoint

    group, model, optimizer = _setup(sizes, seed=7)
    train_state = load_checkpoint(latest_checkpoint(ckpt_dir), model, optimizer)
    states, rng = _states(model, optimizer), torch.get_rng_state()
    loss = _step(group, model, optimizer, _batch(23))
    after = _states(model, optimizer)
    moved = any(not torch.equal(after[k], v) for k, v in states.items() if k.startswith("model."))
    return {"train_state": train_state, "states": states, "rng": rng, "loss": loss, "moved": moved}


def _check(saved: dict, loaded: list[dict]) -> None:
    for rank, r in enumerate(loaded):
        assert r["train_state"] == {"step": 2, "data_position": 8}
        assert r["states"].keys() == saved["states"].keys()
        for key, expected in saved["states"].items():
            assert torch.equal(r["states"][key], expected), f"rank {rank}: {key} is not bit-equal"
        assert torch.isfinite(torch.tensor(r["loss"])) and r["moved"], f"rank {rank}: the next step did not run"


# (saving split, loading splits): one process onto larger worlds, and a larger world onto one process.
@pytest.mark.parametrize(
    ("save_sizes", "load_sizes"),
    [((1, 1, 1), [(1, 2, 1), (2, 2, 1), (1, 2, 2)]), ((2, 2, 1), [(1, 1, 1)])],
    ids=["1-to-dp1cp2,dp2cp2,cp2tp2", "dp2cp2-to-1"],
)
def test_checkpoint_loads_into_any_split(tmp_path, save_sizes, load_sizes):
    world = save_sizes[0] * save_sizes[1] * save_sizes[2]
    saved = mp_pool.run_on_ranks(world, save_case, str(tmp_path), save_sizes)
    for sizes in load_sizes:
        loaded = mp_pool.run_on_ranks(sizes[0] * sizes[1] * sizes[2], load_case, str(tmp_path), sizes)
        _check(saved[0], loaded)
        if len(loaded) > 1:  # another world size: deterministic reseeds, one stream per rank
            again = mp_pool.run_on_ranks(len(loaded), load_case, str(tmp_path), sizes)
            assert all(torch.equal(a["rng"], b["rng"]) for a, b in zip(loaded, again)), "reseed is not deterministic"
            assert len({tuple(r["rng"].tolist()) for r in loaded}) == len(loaded), "ranks share an RNG stream"


def test_same_world_restores_rng(tmp_path):
    """Saved and loaded by the same dp2 x cp2 split: each rank's RNG stream continues where it was saved."""
    saved = mp_pool.run_on_ranks(4, save_case, str(tmp_path), (2, 2, 1))
    loaded = mp_pool.run_on_ranks(4, load_case, str(tmp_path), (2, 2, 1))
    _check(saved[0], loaded)
    for s, r in zip(saved, loaded):
        assert torch.equal(s["rng"], r["rng"])
