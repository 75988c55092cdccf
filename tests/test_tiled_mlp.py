"""The sequence-tiled MLP: the untiled result in fp64 (function, demo model over cp ranks), and its memory.

Exactness: the forward and the input gradient are row by row the untiled ones; the weight gradients
are sums over tokens that the tiles split, so they differ by fp64 rounding of a reordered sum.
"""

from __future__ import annotations

from dataclasses import replace

import mp_pool
import pytest
import torch
from torch import nn

from cp_dtensor import shift_labels
from cp_dtensor.nn.tiled_mlp import tiled_mlp
from cp_dtensor.training import ModelConfig, TransformerWithCP
from cp_dtensor.training.model import SwiGLU

TOL = 1e-12  # fp64: weight gradients are sums over tokens split by the tiles (reordered rounding only)


def _norm_mlp(seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    norm, mlp = nn.RMSNorm(16).double(), SwiGLU(16, 40).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm, mlp


@pytest.mark.parametrize("tile_size", [1, 5, 24, 100])  # one token, uneven tiles, one exact tile, one big tile
def test_tiled_mlp_equals_untiled_forward_and_every_gradient_in_fp64(tile_size):
    norm, mlp = _norm_mlp(seed=0)
    params = [*norm.parameters(), *mlp.parameters()]
    x = torch.randn(2, 12, 16, dtype=torch.float64, requires_grad=True)  # (B, S, E): 24 tokens
    grad_out = torch.randn(2, 12, 16, dtype=torch.float64)

    def run(tiled: bool) -> list[torch.Tensor]:
        fn = lambda t: mlp(norm(t))  # noqa: E731
        y = tiled_mlp(fn, x, params, tile_size=tile_size) if tiled else fn(x)
        grads = torch.autograd.grad(y, [x, *params], grad_out)
        return [y.detach(), *grads]

    for got, want in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)


def test_tiled_mlp_without_grad_and_with_frozen_weights():
    norm, mlp = _norm_mlp(seed=1)
    mlp.w2.weight.requires_grad_(False)  # a frozen weight gets no gradient, the others do
    params = [*norm.parameters(), *mlp.parameters()]
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    fn = lambda t: mlp(norm(t))  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(tiled_mlp(fn, x, params, tile_size=4), fn(x), rtol=TOL, atol=TOL)
    tiled_mlp(fn, x, params, tile_size=4).sum().backward()
    assert mlp.w2.weight.grad is None and mlp.w1.weight.grad is not None and x.grad is not None


@pytest.mark.parametrize("tile_size", [0, -3, 2.5, True])
def test_bad_tile_size_is_a_value_error_naming_it(tile_size):
    with pytest.raises(ValueError, match=f"tile_size must be a positive int, got {tile_size!r}"):
        tiled_mlp(torch.nn.Identity(), torch.zeros(2, 4), [], tile_size=tile_size)


# ---- the demo model on cp ranks (fp64, every gradient) ----------------------------------------------

CONFIG = ModelConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96)
SEQ_LEN, BATCH = 16, 2


def model_case(batch: dict) -> dict:
    """On every rank: loss and whole gradients of the model, untiled and tiled under each AC mode."""
    group = mp_pool.group(2)
    ids, labels = (group.partition_sequence(batch[k], seq_dim=1) for k in ("input_ids", "labels"))
    results = {}
    for name, extra in {
        "untiled": {},
        "tiles of 3": {"mlp_tile_size": 3},
        "tiles of 3, selective": {"mlp_tile_size": 3, "activation_checkpointing": "selective"},
        "tiles of 5, full": {"mlp_tile_size": 5, "activation_checkpointing": "full"},
    }.items():
        torch.manual_seed(0)
        model = TransformerWithCP(replace(CONFIG, **extra), cp_group=group).double()
        loss = model(ids, labels)
        loss.backward()
        results[name] = {"loss": loss.item(), **{n: p.grad for n, p in model.named_parameters()}}
    return results


def test_demo_model_with_tiled_mlp_equals_untiled_in_fp64_on_cp_ranks():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 32, (BATCH, SEQ_LEN), generator=gen)
    batch = {"input_ids": ids, "labels": shift_labels(ids, torch.rand(BATCH, SEQ_LEN, generator=gen) < 0.7)}
    for rank in mp_pool.run_on_ranks(2, model_case, batch):
        want = rank.pop("untiled")
        for name, got in rank.items():
            assert got.keys() == want.keys()
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=TOL, atol=TOL, msg=f"{name}: {key}")


def test_model_rejects_a_bad_tile_size():
    with pytest.raises(ValueError, match="mlp_tile_size must be None or a positive integer, got 0"):
        TransformerWithCP(replace(CONFIG, mlp_tile_size=0), cp_group=None)


# ---- memory: the estimate against the measured peak where the MLP decides it ---------------------

# a wide MLP and a chunked loss: untiled, the last block's MLP backward is where a rank peaks
WIDE = {"vocab_size": 256, "hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 1024}
CHUNK = 64
CASES = ((1024, 128), (2048, 256))  # (L, tile): a quarter of a rank's tokens, so the tiled MLP stays the peak


def tiled_memory_case(cases: tuple[tuple[int, int], ...]) -> dict:
    from bench.memory_measure import measure_case

    torch.set_num_threads(1)
    group = mp_pool.group(2)
    return {
        (seq_len, tile): measure_case(
            seq_len, 2, model={**WIDE, "loss_chunk_size": CHUNK, "mlp_tile_size": tile}, cp_group=group, rss=False
        )
        for seq_len, tile in cases
        for tile in (None, tile)
    }


def test_tiled_mlp_peak_is_the_estimate_within_5_percent_past_the_mlp_peak():
    for rank in mp_pool.run_on_ranks(2, tiled_memory_case, CASES):
        for seq_len, tile in CASES:
            untiled, tiled = rank[(seq_len, None)], rank[(seq_len, tile)]
            assert untiled["estimate"]["peak_phase"] == "mlp backward"  # past the point where the MLP peaks
            assert tiled["estimate"]["peak_phase"] == "mlp backward"  # tiled, still the MLP (one tile's worth)
            assert "_TiledMLPBackward" in tiled["peak_at"]  # where the measurement peaks too
            estimate = tiled["estimate"]["total"] - sum(tiled["static"].values())
            # the contract: 5% of the part above weights, gradients and optimizer state (counted exactly)
            assert estimate == pytest.approx(tiled["activation_peak_bytes"], rel=0.05), (seq_len, tile)
            assert tiled["activation_peak_bytes"] < 0.75 * untiled["activation_peak_bytes"]
