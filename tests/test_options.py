"""Keyword arguments of the strategies: one list for all, each strategy's own options, clear errors.

The ring's ``batched_p2p`` is the worked example of a strategy-specific option (a field of
:class:`~cp_dtensor.attention.ring.RingOptions`): both ways of posting a rotation give the result of
fp64 full attention, forward and backward, eager and compiled, with the same bytes.
"""

from __future__ import annotations

import mp_pool
import pytest
import torch

from cp_dtensor import context_parallel_attention, count_comm, ring_attention
from cp_dtensor.reference import full_attention

# fp64, the same kernels and merges as full attention up to summation order: ~1e-15; 1e-12 leaves room.
TOL = 1e-12


def batched_case(batched: bool | None, compiled: bool) -> dict:
    """Runs on every rank: ring attention with ``batched_p2p`` against fp64 full attention."""
    import torch._dynamo

    group = mp_pool.group(2)
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, 2, 16, 8, generator=g, dtype=torch.float64) for _ in range(4))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = full_attention(*leaves, causal=True)
    expected.backward(dout)

    def step(q_l, k_l, v_l):
        return ring_attention(q_l, k_l, v_l, group, causal=True, batched_p2p=batched)

    if compiled:
        torch._dynamo.reset()
        step = torch.compile(step, fullgraph=True, backend="aot_eager")
    local = [group.partition_sequence(x, seq_dim=2).requires_grad_() for x in (q, k, v)]
    grouped = []  # rotations posted as one batch_isend_irecv: the option must reach the communicator
    original = torch.distributed.batch_isend_irecv
    torch.distributed.batch_isend_irecv = lambda ops: grouped.append(len(ops)) or original(ops)
    try:
        with count_comm() as counter:
            out = step(*local)
            (out * group.partition_sequence(dout, seq_dim=2)).sum().backward()
    finally:
        torch.distributed.batch_isend_irecv = original
    errors = [(out - group.partition_sequence(expected, seq_dim=2)).abs().max().item()]
    errors += [(x.grad - group.partition_sequence(y.grad, seq_dim=2)).abs().max().item() for x, y in zip(local, leaves)]
    return {"error": max(errors), "bytes": dict(counter.bytes), "grouped": len(grouped)}


@pytest.mark.parametrize("compiled", [False, True])
def test_the_ring_posts_rotations_either_way_with_the_same_result_and_bytes(compiled):
    results = {b: mp_pool.run_on_ranks(2, batched_case, b, compiled) for b in (None, True, False)}
    default_bytes = results[None][0]["bytes"]  # both ranks of a 2-ring send equal shards
    for batched, per_rank in results.items():
        for r in per_rank:
            assert r["error"] <= TOL, (batched, r)
            assert r["bytes"] == default_bytes, (batched, r)
            # gloo's default is lone isend/irecv; True groups every rotation (K/V forward, K/V and dK/dV backward)
            assert (r["grouped"] > 0) == (batched is True), (batched, r)


def bad_option_case(strategy: str, kwargs: dict) -> str:
    """Runs on every rank: a call that must be refused; returns the error's text."""
    group = mp_pool.group(2)
    q = torch.randn(1, 2, 8, 8)
    try:
        context_parallel_attention(q, q, q, group, strategy=strategy, **kwargs)
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize(
    ("strategy", "kwargs", "expected"),
    [
        ("ring", {"casual": True}, "Invalid keyword argument(s) 'casual' for strategy 'ring'"),
        ("ulysses", {"batched_p2p": True}, "Invalid keyword argument(s) 'batched_p2p' for strategy 'ulysses'"),
        ("ring", {"kv_heads_per_gather": 1}, "Must be among: batched_p2p, causal"),
        ("ring", {"batched_p2p": 1}, "batched_p2p must be None, True or False, got 1"),
        ("allgather", {"kv_heads_per_gather": 0}, "kv_heads_per_gather must be a positive int"),
    ],
)
def test_an_option_a_strategy_does_not_take_is_refused_by_name(strategy, kwargs, expected):
    for message in mp_pool.run_on_ranks(2, bad_option_case, strategy, kwargs):
        assert expected in message, message
