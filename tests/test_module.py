"""ContextParallelAttention on real gloo ranks vs the same weights in a cp_size=1 layer on the full sequence."""

from __future__ import annotations

import mp_pool
import pytest
import torch
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from cp_dtensor import STRATEGIES, ContextParallelAttention
from cp_dtensor.nn.rope import apply_rope, rope_cos_sin
from cp_dtensor.positions.layout import shard_positions

HIDDEN, HEADS, KV_HEADS = 32, 4, 2  # GQA: two query heads per K/V head; head dim 8


def make_inputs(batch: int, seq_len: int, seed: int) -> dict:
    """Weights of one layer, a full input and an output gradient, fp64, identical for every rank."""
    torch.manual_seed(seed)
    layer = torch.nn.ModuleDict(
        {
            n: torch.nn.Linear(HIDDEN, d, bias=True)
            for n, d in (("q_proj", HIDDEN), ("k_proj", HIDDEN // 2), ("v_proj", HIDDEN // 2), ("o_proj", HIDDEN))
        }
    ).double()
    gen = torch.Generator().manual_seed(seed)
    return {
        "state_dict": {f"{k}": v for k, v in layer.state_dict().items()},
        "x": torch.randn(batch, seq_len, HIDDEN, generator=gen, dtype=torch.float64),
        "dout": torch.randn(batch, seq_len, HIDDEN, generator=gen, dtype=torch.float64),
    }


def module_case(cp_size: int, layout: str, as_dtensor: bool, causal: bool, inputs: dict) -> dict:
    """Runs on every rank: load the weights, shard x, forward and backward through the layer."""
    group = mp_pool.group(cp_size, layout=layout)
    layer = ContextParallelAttention(HIDDEN, HEADS, group, causal=causal, num_kv_heads=KV_HEADS, bias=True).double()
    layer.load_state_dict(inputs["state_dict"])
    if as_dtensor:  # natural order, as torch builds it; compared below in the layout's shards
        x_in = distribute_tensor(inputs["x"], group.cp_mesh, [Shard(1)]).requires_grad_()
        dout = distribute_tensor(inputs["dout"], group.cp_mesh, [Shard(1)])
    else:
        x_in = group.partition_sequence(inputs["x"], seq_dim=1).requires_grad_()
        dout = group.partition_sequence(inputs["dout"], seq_dim=1)
    out = layer(x_in)
    assert isinstance(out, DTensor) == as_dtensor, "the output must be the input's kind"
    out.backward(dout)
    out_local, dx = out.detach(), x_in.grad
    if as_dtensor:
        assert tuple(out.placements) == (Shard(1),) and out.device_mesh == group.cp_mesh
        out_local, dx = (group.partition_sequence(t.full_tensor(), seq_dim=1) for t in (out_local, dx))
    return {"out": out_local, "dx": dx, "grads": {n: p.grad for n, p in layer.named_parameters()}}


def unshard(shards: list[torch.Tensor], layout: str) -> torch.Tensor:
    """Put every rank's (B, S_local, ...) shard back at its global positions."""
    world, seq_len = len(shards), shards[0].shape[1] * len(shards)
    full = torch.empty(shards[0].shape[0], seq_len, *shards[0].shape[2:], dtype=shards[0].dtype)
    for rank, shard in enumerate(shards):
        full.index_copy_(1, shard_positions(seq_len, world, rank, layout), shard)
    return full


CASES = [  # (cp_size, layout, DTensor input, causal): both layouts, both input kinds, P = 2 and 4
    (2, "zigzag", False, True),
    (2, "contiguous", True, True),
    (4, "zigzag", True, True),
    (4, "contiguous", False, False),
]


@pytest.mark.parametrize("cp_size,layout,as_dtensor,causal", CASES)
def test_layer_matches_cp1_layer_on_full_sequence(cp_size, layout, as_dtensor, causal):
    inputs = make_inputs(batch=2, seq_len=8 * cp_size, seed=cp_size + len(layout))
    sharded = mp_pool.run_on_ranks(cp_size, module_case, cp_size, layout, as_dtensor, causal, inputs)
    (full,) = mp_pool.run_on_ranks(1, module_case, 1, "zigzag", False, causal, inputs)
    # fp64 throughout; only the summation order of the ring's blocks and of the shards' weight
    # gradients differs from one process, so errors stay near 1e-15 relative.
    tol = dict(rtol=0, atol=1e-11)
    torch.testing.assert_close(unshard([r["out"] for r in sharded], layout), full["out"], **tol, msg="out")
    torch.testing.assert_close(unshard([r["dx"] for r in sharded], layout), full["dx"], **tol, msg="dx")
    for name, expected in full["grads"].items():
        # Each rank holds the gradient of its own tokens; their sum is the full gradient.
        got = sum(r["grads"][name] for r in sharded)
        torch.testing.assert_close(got, expected, **tol, msg=name)


def test_rope_on_shards_uses_global_positions():
    """Rotating a zigzag shard with its global positions equals sharding the rotated sequence."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 8, generator=gen, dtype=torch.float64)  # (B, H, L, D)
    cos, sin = rope_cos_sin(torch.arange(16), 8, dtype=torch.float64)
    full = apply_rope(x, cos, sin)
    for rank in range(4):
        pos = shard_positions(16, 4, rank, "zigzag")
        c, s = rope_cos_sin(pos, 8, dtype=torch.float64)
        torch.testing.assert_close(apply_rope(x[:, :, pos], c, s), full[:, :, pos], rtol=0, atol=1e-15)
    # And the property that makes it work: scores depend on the offset only, not on the positions.
    q, k = torch.randn(8, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen, dtype=torch.float64)

    def score(m: int, n: int) -> float:
        cm, sm = rope_cos_sin(torch.tensor([m]), 8, dtype=torch.float64)
        cn, sn = rope_cos_sin(torch.tensor([n]), 8, dtype=torch.float64)
        return float(apply_rope(q[None], cm, sm) @ apply_rope(k[None], cn, sn).T)

    assert abs(score(5, 2) - score(105, 102)) < 1e-12
    assert abs(score(5, 2) - score(5, 3)) > 1e-6  # and it does depend on the offset


def test_layer_rejects_bad_configuration():
    group = object()  # never touched: the checks come first
    with pytest.raises(ValueError, match="must divide hidden_size"):
        ContextParallelAttention(30, 4, group)
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
        ContextParallelAttention(32, 4, group, num_kv_heads=3)
    with pytest.raises(ValueError, match="even head dim"):
        ContextParallelAttention(12, 4, group)
    with pytest.raises(ValueError, match="Invalid strategy 'rng'.*'ring'"):
        ContextParallelAttention(32, 4, group, strategy="rng")
    assert "ring" in STRATEGIES
