"""The communication model by itself: hand-counted cases and the identities between strategies.

Here the model is checked against counts written out by hand, and against the bytes counted on
real gloo ranks for 200 random calls (strategies, degrees, masks, GQA, dtypes) in one launch;
tests/test_strategies.py counts them again next to each strategy's oracle comparison.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cp_dtensor.estimate.comm_model import CommVolume, comm_bytes

SHAPE = {"batch": 2, "seq_len": 64, "heads": 8, "kv_heads": 2, "head_dim": 16}


def test_ring_is_p_minus_1_blocks_forward_and_p_fp32_grad_hops_backward():
    # bf16: a K/V shard is K and V of 2 heads x 16 tokens x 16 dims x 2 batch x 2 bytes.
    kv_shard = 2 * (2 * 2 * 16 * 16) * 2
    grad_shard = 2 * (2 * 2 * 16 * 16) * 4  # fp32 accumulators
    vol = comm_bytes("ring", **SHAPE, world_size=4, dtype=torch.bfloat16)
    assert vol.forward == {"ring_send": 3 * kv_shard}
    assert vol.backward == {"ring_send": 3 * kv_shard, "ring_send_grad": 4 * grad_shard}


def test_allgather_gathers_p_minus_1_shards_and_reduce_scatters_p_minus_1_fp32_shards():
    kv_shard = 2 * (2 * 2 * 16 * 16) * 2
    grad_shard = 2 * (2 * 2 * 16 * 16) * 4
    vol = comm_bytes("allgather", **SHAPE, world_size=4, dtype=torch.bfloat16)
    assert vol.forward == {"all_gather": 3 * kv_shard}
    assert vol.backward == {"all_gather": 3 * kv_shard, "reduce_scatter": 3 * grad_shard}


def test_ulysses_sends_three_quarters_of_q_k_v_and_out():
    # P = 4 divides neither H_kv = 2: each K/V head is sent twice (r = 4 / gcd(2, 4) = 2).
    tokens = 2 * 16 * 16 * 2  # one head of one rank's 16 tokens, bf16, batch 2
    q_bytes, kv_bytes = 8 * tokens, 2 * (2 * 2) * tokens
    per_call = 3 * (q_bytes + kv_bytes) // 4 + 3 * q_bytes // 4  # q, k, v in; out back
    vol = comm_bytes("ulysses", **SHAPE, world_size=4, dtype=torch.bfloat16)
    assert vol.forward == {"all_to_all": per_call}
    assert vol.backward == {"all_to_all": per_call}  # dout in; dq, dk, dv back


def test_fp64_accumulates_gradients_in_fp64():
    vol = comm_bytes("ring", **SHAPE, world_size=2, dtype=torch.float64)
    shard = 2 * (2 * 2 * 32 * 16) * 8
    assert vol.backward == {"ring_send": shard, "ring_send_grad": 2 * shard}


def test_one_rank_sends_nothing():
    for strategy, u in (("ring", None), ("ulysses", None), ("allgather", None), ("hybrid", 1)):
        assert comm_bytes(strategy, **SHAPE, world_size=1, dtype=torch.float32, ulysses_size=u) == CommVolume()


shapes = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 3),
        "heads_kv": st.sampled_from([(8, 1), (8, 2), (8, 8), (16, 4), (24, 3)]),
        "head_dim": st.sampled_from([8, 64, 128]),
        "tokens_per_rank": st.integers(1, 64),
        "world_size": st.sampled_from([2, 4, 8]),
        "dtype": st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    }
)


def _args(raw):
    heads, kv_heads = raw["heads_kv"]
    return dict(
        batch=raw["batch"],
        seq_len=raw["tokens_per_rank"] * raw["world_size"],
        heads=heads,
        kv_heads=kv_heads,
        head_dim=raw["head_dim"],
        world_size=raw["world_size"],
        dtype=raw["dtype"],
    )


@given(raw=shapes)
def test_hybrid_edge_cases_are_ring_and_ulysses(raw):
    args = _args(raw)
    assert comm_bytes("hybrid", **args, ulysses_size=1) == comm_bytes("ring", **args)
    assert comm_bytes("hybrid", **args, ulysses_size=args["world_size"]) == comm_bytes("ulysses", **args)


@given(raw=shapes)
def test_ring_and_allgather_move_the_same_kv_and_allgather_one_grad_shard_less(raw):
    args = _args(raw)
    ring, gather = comm_bytes("ring", **args), comm_bytes("allgather", **args)
    assert ring.forward["ring_send"] == gather.forward["all_gather"]
    grad_shard = ring.backward["ring_send_grad"] // args["world_size"]
    assert gather.backward["reduce_scatter"] == ring.backward["ring_send_grad"] - grad_shard


@given(raw=shapes)
def test_ulysses_beats_the_ring_exactly_when_p_exceeds_group_size_plus_copies(raw):
    """The rule of docs/strategies.md: Ulysses sends (H/H_kv + r) / P times the ring's forward bytes
    (q and out at (P-1)/P each, K/V at r copies), so it sends less iff P > H / H_kv + r."""
    args = _args(raw)
    ulysses = comm_bytes("ulysses", **args).forward["all_to_all"]
    ring = comm_bytes("ring", **args).forward["ring_send"]
    p, group = args["world_size"], args["heads"] // args["kv_heads"]
    r = p // math.gcd(args["kv_heads"], p)
    assert ulysses * p == ring * (group + r)
    assert (ulysses < ring) == (p > group + r)


def test_bad_strategy_and_hybrid_without_ulysses_size_are_value_errors():
    with pytest.raises(ValueError, match="Invalid strategy 'tree'"):
        comm_bytes("tree", **SHAPE, world_size=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="ulysses_size"):
        comm_bytes("hybrid", **SHAPE, world_size=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="ulysses_size"):
        comm_bytes("hybrid", **SHAPE, world_size=4, dtype=torch.float32, ulysses_size=3)


# ---- the model against the bytes counted on real ranks, many configurations in one launch -----------

NUM_DRAWS = 200  # configurations per launch: strategies, degrees, masks, GQA, dtypes (all in one 4-rank pool task)
DRAW_HEADS_KV = [(1, 1), (2, 1), (4, 1), (4, 2), (4, 4), (6, 2), (8, 2), (8, 8), (12, 3)]


def draw_configs(seed: int, count: int) -> list[dict]:
    """``count`` random attention calls that the engine runs on 4 ranks (cp 2 x dp 2, or cp 4)."""
    import random

    rng, drawn = random.Random(seed), []
    while len(drawn) < count:
        cp = rng.choice([2, 4])
        strategy = rng.choice(["ring", "allgather", "ulysses", "hybrid"])
        u = rng.choice([d for d in (1, 2, 4) if cp % d == 0]) if strategy == "hybrid" else None
        heads, kv_heads = rng.choice(DRAW_HEADS_KV)
        if heads % {"ulysses": cp, "hybrid": u}.get(strategy, 1):
            continue  # Ulysses splits the query heads over its ranks
        seq_len = 2 * cp * rng.randint(1, 4)
        mask = rng.choice(["causal", "full", "window", "documents"])
        drawn.append(
            dict(
                strategy=strategy,
                cp=cp,
                u=u,
                batch=rng.randint(1, 2),
                heads=heads,
                kv_heads=kv_heads,
                head_dim=rng.choice([4, 8]),
                seq_len=seq_len,
                mask=mask,
                seed=rng.randrange(2**31),
                dtype=rng.choice(["float32", "bfloat16", "float64"]),
            )
        )
    return drawn


def counted_bytes_case(configs: list[dict]) -> list[tuple[dict, dict]]:
    """On every rank of a 4-rank pool: run each call forward and backward, count what this rank sends."""
    from cp_dtensor import context_parallel_attention, count_comm

    torch.set_num_threads(1)
    import mp_pool

    counted = []
    for c in configs:
        extra = {"ulysses_size": c["u"]} if c["u"] else {}
        group = mp_pool.group(c["cp"], dp_size=4 // c["cp"], **extra)
        gen = torch.Generator().manual_seed(c["seed"])
        dtype = getattr(torch, c["dtype"])
        shape = (c["batch"], c["heads"], c["seq_len"], c["head_dim"])
        q = torch.randn(shape, generator=gen, dtype=torch.float64)
        kv = torch.randn((2, c["batch"], c["kv_heads"], c["seq_len"], c["head_dim"]), generator=gen)
        kwargs = {"causal": c["mask"] != "full"}
        if c["mask"] == "window":
            kwargs["window"] = (c["seq_len"] // 4, 0)
        if c["mask"] == "documents":
            kwargs["document_ids"] = torch.randint(0, 3, (c["batch"], c["seq_len"]), generator=gen).sort(-1).values
        q, k, v = (group.partition_sequence(t.to(dtype), seq_dim=2).requires_grad_() for t in (q, *kv))
        with count_comm() as fwd:
            out = context_parallel_attention(q, k, v, group, strategy=c["strategy"], **kwargs)
        with count_comm() as bwd:
            out.sum().backward()
        counted.append((dict(fwd.bytes), dict(bwd.bytes)))
    return counted


def test_model_equals_bytes_counted_on_gloo_for_200_random_configurations():
    import mp_pool

    configs = draw_configs(seed=2024, count=NUM_DRAWS)
    assert {c["strategy"] for c in configs} == {"ring", "allgather", "ulysses", "hybrid"}
    assert {c["mask"] for c in configs} == {"causal", "full", "window", "documents"}
    assert any(c["kv_heads"] < c["heads"] for c in configs)  # GQA and MQA
    for rank, counted in enumerate(mp_pool.run_on_ranks(4, counted_bytes_case, configs)):
        for c, (fwd, bwd) in zip(configs, counted, strict=True):
            model = comm_bytes(
                c["strategy"],
                batch=c["batch"],
                seq_len=c["seq_len"],
                heads=c["heads"],
                kv_heads=c["kv_heads"],
                head_dim=c["head_dim"],
                world_size=c["cp"],
                dtype=getattr(torch, c["dtype"]),
                ulysses_size=c["u"],
            )
            assert (fwd, bwd) == (model.forward, model.backward), f"rank {rank}: {c}"  # exact: bytes are counted
