"""Ulysses, all-gather K/V and hybrid attention on real gloo ranks: against fp64 full attention, forward
and backward, and the bytes they send against the communication model (the ring's bytes too)."""

from __future__ import annotations

import re
from pathlib import Path

import mp_pool
import pytest
import torch
from docs_examples import run_example
from helpers import (
    DTYPES,
    assert_close_to_oracle,
    attention_and_grads,
    case_id,
    covering_cases,
    make_inputs,
    oracle,
    random_draws,
    record_draw,
    unshard,
)
from hypothesis import given
from hypothesis import strategies as st

from cp_dtensor import context_parallel_attention, count_comm, init_context_parallel_group
from cp_dtensor.estimate.comm_model import comm_bytes
from cp_dtensor.positions.layout import num_chunks

REPO = Path(__file__).resolve().parents[1]

# (strategy, P, ulysses_size): Ulysses and all-gather at P = 2 and 4; hybrid 2 x 2 and its edge cases
# (u = 1 is a ring of P ranks, u = P is Ulysses over P ranks).
CASES = [
    ("ulysses", 2, None),
    ("ulysses", 4, None),
    ("allgather", 2, None),
    ("allgather", 4, None),
    ("hybrid", 4, 2),
    ("hybrid", 2, 1),
    ("hybrid", 2, 2),
    ("hybrid", 4, 1),
    ("hybrid", 4, 4),
]
HEADS_KV = [(1, 1), (2, 1), (2, 2), (3, 3), (4, 1), (4, 2), (4, 4), (6, 2), (8, 2), (12, 3)]


def _group(world_size: int, layout: str, ulysses_size: int | None, dp_size: int | None = None):
    extra = {} if ulysses_size is None else {"ulysses_size": ulysses_size}
    return mp_pool.group(
        world_size if dp_size is None else world_size // dp_size, layout=layout, dp_size=dp_size, **extra
    )


def strategy_case(
    world_size: int,
    strategy: str,
    ulysses_size: int | None,
    cfg: dict,
    inputs: dict,
    dtensor: bool = False,
    dp_size: int | None = None,
    **kwargs,
) -> dict:
    """Runs on every rank: shard, attention forward and backward, count the bytes sent."""
    group = _group(world_size, cfg["layout"], ulysses_size, dp_size)
    dtype = DTYPES[cfg["dtype"]]
    args = [group.partition_sequence(inputs[n], seq_dim=2).to(dtype).requires_grad_() for n in "qkv"]
    dout = group.partition_sequence(inputs["dout"], seq_dim=2).to(dtype)
    if dtensor:  # natural-order DTensors, as torch builds them (the relayout is tested in test_dtensor.py)
        from torch.distributed.tensor import Shard, distribute_tensor

        args = [distribute_tensor(inputs[n].to(dtype), group.cp_mesh, [Shard(2)]).requires_grad_() for n in "qkv"]
        dout = distribute_tensor(inputs["dout"].to(dtype), group.cp_mesh, [Shard(2)])
    with count_comm() as fwd:
        out = context_parallel_attention(
            *args, group, strategy=strategy, causal=cfg["causal"], scale=cfg["scale"], **kwargs
        )
    with count_comm() as bwd:
        out.backward(dout)
    grads = [a.grad for a in args]
    if dtensor:  # back to this rank's shard in the layout, as the local path returns them
        assert type(out).__name__ == "DTensor" and tuple(out.placements) == tuple(args[0].placements)
        out = group.partition_sequence(out.full_tensor(), seq_dim=2)
        grads = [group.partition_sequence(g.full_tensor(), seq_dim=2) for g in grads]
        for counter in (fwd, bwd):
            counter.bytes.pop("relayout", None), counter.calls.pop("relayout", None)
    return {
        "out": out.detach(),
        "dq": grads[0],
        "dk": grads[1],
        "dv": grads[2],
        "fwd_calls": dict(fwd.calls),
        "fwd_bytes": dict(fwd.bytes),
        "bwd_calls": dict(bwd.calls),
        "bwd_bytes": dict(bwd.bytes),
    }


def run_case(strategy: str, world_size: int, ulysses_size: int | None, cfg: dict, **kwargs) -> tuple[dict, list]:
    inputs = make_inputs(cfg, cfg.get("seed", 0))
    results = mp_pool.run_on_ranks(world_size, strategy_case, world_size, strategy, ulysses_size, cfg, inputs, **kwargs)
    cp_size = world_size // (kwargs.get("dp_size") or 1)
    got = {}
    for name in ("out", "dq", "dk", "dv"):  # one sequence per dp replica: ranks [d * cp, (d + 1) * cp)
        replicas = [
            unshard([r[name] for r in results[d : d + cp_size]], cp_size, cfg["layout"]).double()
            for d in range(0, world_size, cp_size)
        ]
        for replica in replicas[1:]:
            torch.testing.assert_close(replica, replicas[0], rtol=0, atol=0, msg=f"{name}: dp replicas differ")
        got[name] = replicas[0]
    return got, results


def assert_bytes_match_model(strategy, cp_size, ulysses_size, cfg, results):
    model = comm_bytes(
        strategy,
        batch=cfg["batch"],
        seq_len=cfg["seq_len"],
        heads=cfg["heads"],
        kv_heads=cfg["kv_heads"],
        head_dim=cfg["head_dim"],
        world_size=cp_size,
        dtype=DTYPES[cfg["dtype"]],
        ulysses_size=ulysses_size,
    )
    for rank, r in enumerate(results):
        assert r["fwd_bytes"] == model.forward, f"rank {rank} forward: sent {r['fwd_bytes']}, model {model.forward}"
        assert r["bwd_bytes"] == model.backward, f"rank {rank} backward: sent {r['bwd_bytes']}, model {model.backward}"


def assert_matches_oracle(cfg, inputs, got):
    """Within helpers.tolerance of the fp64 oracle (below fp64: of one process's SDPA in the same dtype)."""
    dtype = DTYPES[cfg["dtype"]]
    one_process = (
        None if dtype == torch.float64 else attention_and_grads(inputs, dtype, causal=cfg["causal"], scale=cfg["scale"])
    )
    assert_close_to_oracle(got, oracle(cfg, inputs), dtype, one_process, what=cfg.get("strategy", "sharded"))


def configs(heads_multiple: int):
    return st.fixed_dictionaries(
        {
            "batch": st.integers(1, 2),
            "heads_kv": st.sampled_from([hk for hk in HEADS_KV if hk[0] % heads_multiple == 0]),
            "head_dim": st.sampled_from([8, 16]),
            "chunk": st.integers(1, 4),
            "causal": st.booleans(),
            "scale": st.one_of(st.none(), st.floats(0.05, 2.0)),
            "dtype": st.sampled_from(list(DTYPES)),
            "layout": st.sampled_from(["zigzag", "contiguous"]),
            "seed": st.integers(0, 2**31 - 1),
        }
    )


def _expand(raw: dict, world_size: int) -> dict:
    cfg = dict(raw)
    cfg["heads"], cfg["kv_heads"] = cfg.pop("heads_kv")
    cfg["seq_len"] = cfg.pop("chunk") * num_chunks(world_size, cfg["layout"])
    return cfg


def _exchange_size(strategy: str, world_size: int, ulysses_size: int | None) -> int:
    """Ranks that split the heads: P for Ulysses, u for hybrid, none for all-gather."""
    return {"ulysses": world_size, "hybrid": ulysses_size, "allgather": 1}[strategy]


def _case_name(case: tuple) -> str:
    strategy, world_size, ulysses_size = case
    return f"{strategy}-P{world_size}" + (f"-u{ulysses_size}" if ulysses_size else "")


COVERING_HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}  # 4 heads: every exchange size here divides it
COVERING = covering_cases(
    {"layout": ["zigzag", "contiguous"], "causal": [True, False], "dtype": list(DTYPES)},
    {"case": [_case_name(c) for c in CASES], "heads": list(COVERING_HEADS), "scale": [None, 0.3]},
)


@pytest.mark.parametrize("row", COVERING, ids=case_id)
def test_strategy_covering_cases(row):
    """Every layout x causal x dtype, and every pair of those with each (strategy, P, u), MHA/GQA/MQA and the
    scale, as fixed cases; hypothesis draws more below."""
    strategy, world_size, ulysses_size = next(c for c in CASES if _case_name(c) == row["case"])
    raw = {
        "batch": 2,
        "heads_kv": COVERING_HEADS[row["heads"]],
        "head_dim": 8,
        "chunk": 2,
        "causal": row["causal"],
        "scale": row["scale"],
        "dtype": row["dtype"],
        "layout": row["layout"],
        "seed": len(case_id(row)),
    }
    check_strategy(strategy, world_size, ulysses_size, raw)


@pytest.mark.parametrize(("strategy", "world_size", "ulysses_size"), CASES, ids=[_case_name(c) for c in CASES])
@random_draws(ci_examples=3)
@given(data=st.data())
def test_strategy_matches_full_attention_and_sends_the_model_bytes(strategy, world_size, ulysses_size, data):
    check_strategy(
        strategy,
        world_size,
        ulysses_size,
        data.draw(configs(_exchange_size(strategy, world_size, ulysses_size)), label="cfg"),
    )


def check_strategy(strategy: str, world_size: int, ulysses_size: int | None, raw: dict) -> None:
    cfg = _expand(raw, world_size)
    if record_draw({"strategy": strategy, "P": world_size, "u": ulysses_size, **cfg}):
        return
    got, results = run_case(strategy, world_size, ulysses_size, cfg)
    assert_matches_oracle(cfg, make_inputs(cfg, cfg["seed"]), got)
    assert_bytes_match_model(strategy, world_size, ulysses_size, cfg, results)


BYTE_CASES = [("ring", 4, None), *CASES]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("strategy", "world_size", "ulysses_size"), BYTE_CASES, ids=[_case_name(c) for c in BYTE_CASES]
)
def test_bytes_sent_equal_the_model(strategy, world_size, ulysses_size, dtype):
    """GQA with K/V heads that P does not divide (so Ulysses replicates them), both dtypes, the ring too."""
    cfg = {
        "batch": 2,
        "heads": 4,
        "kv_heads": 1,
        "head_dim": 8,
        "seq_len": 4 * world_size,
        "causal": True,
        "scale": None,
        "dtype": dtype,
        "layout": "zigzag",
    }
    _, results = run_case(strategy, world_size, ulysses_size, cfg)
    assert_bytes_match_model(strategy, world_size, ulysses_size, cfg, results)


def test_collective_calls_per_strategy():
    """One all-to-all per direction for q/k/v (packed) and one for out; one gather per K/V head group."""
    cfg = {
        "batch": 1,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 8,
        "seq_len": 16,
        "causal": False,
        "scale": None,
        "dtype": "float32",
        "layout": "zigzag",
    }
    _, ulysses = run_case("ulysses", 4, None, cfg)
    assert all(r["fwd_calls"] == {"all_to_all": 2} and r["bwd_calls"] == {"all_to_all": 2} for r in ulysses)
    _, hybrid = run_case("hybrid", 4, 2, cfg)
    assert all(r["fwd_calls"] == {"all_to_all": 2, "ring_send": 1} for r in hybrid)
    assert all(r["bwd_calls"] == {"all_to_all": 2, "ring_send": 1, "ring_send_grad": 2} for r in hybrid)


def test_allgather_in_head_groups_moves_the_same_bytes_in_more_calls():
    cfg = {
        "batch": 1,
        "heads": 6,
        "kv_heads": 3,
        "head_dim": 8,
        "seq_len": 32,
        "causal": True,
        "scale": None,
        "dtype": "float64",
        "layout": "zigzag",
        "seed": 3,
    }
    whole, whole_res = run_case("allgather", 4, None, cfg)
    split, split_res = run_case("allgather", 4, None, cfg, kv_heads_per_gather=2)  # groups of 2 + 1 heads
    assert_matches_oracle(cfg, make_inputs(cfg, 3), split)
    assert_bytes_match_model("allgather", 4, None, cfg, split_res)
    for a, b in zip(whole_res, split_res):
        assert a["fwd_calls"] == {"all_gather": 1} and b["fwd_calls"] == {"all_gather": 2}
        assert b["bwd_calls"] == {"all_gather": 2, "reduce_scatter": 2}
        assert a["fwd_bytes"] == b["fwd_bytes"] and a["bwd_bytes"] == b["bwd_bytes"]


@pytest.mark.parametrize("strategy", ["ring", "ulysses", "allgather", "hybrid"])
def test_dtensor_inputs_on_a_hybrid_group(strategy):
    """DTensor in, DTensor out; every strategy runs on the group that hybrid needs (flattened cp mesh)."""
    cfg = {
        "batch": 1,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 8,
        "seq_len": 24,
        "causal": True,
        "scale": None,
        "dtype": "float64",
        "layout": "zigzag",
        "seed": 11,
    }
    got, results = run_case(strategy, 4, 2, cfg, dtensor=True)
    assert_matches_oracle(cfg, make_inputs(cfg, 11), got)
    assert_bytes_match_model(strategy, 4, 2, cfg, results)


@pytest.mark.parametrize("strategy", ["ulysses", "allgather", "hybrid"])
def test_with_a_dp_axis(strategy):
    """dp=2 x cp=2 (hybrid: u=2) on 4 ranks: each replica computes its own sequence."""
    cfg = {
        "batch": 1,
        "heads": 2,
        "kv_heads": 1,
        "head_dim": 8,
        "seq_len": 16,
        "causal": True,
        "scale": None,
        "dtype": "float64",
        "layout": "contiguous",
        "seed": 5,
    }
    got, results = run_case(strategy, 4, 2 if strategy == "hybrid" else None, cfg, dp_size=2)
    assert_matches_oracle(cfg, make_inputs(cfg, 5), got)
    assert_bytes_match_model(strategy, 2, 2, cfg, results)


# ---- user errors ---------------------------------------------------------------------------------


def error_case(
    world_size: int, strategy: str, ulysses_size: int | None, heads: int, kv_heads: int, seq_local: int, **kwargs
) -> str:
    """Runs on every rank: call the strategy with bad input and return the ValueError's message."""
    group = _group(world_size, "zigzag", ulysses_size)
    q = torch.zeros(1, heads, seq_local, 8)
    k = torch.zeros(1, kv_heads, seq_local, 8)
    try:
        context_parallel_attention(q, k, k.clone(), group, strategy=strategy, **kwargs)
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize(
    ("strategy", "world_size", "ulysses_size", "heads", "kwargs", "expected"),
    [
        ("ulysses", 4, None, 6, {}, r"4 does not divide 6.*strategy='ring'"),
        ("ulysses", 2, None, 3, {}, r"2 does not divide 3.*strategy='ring'"),
        ("hybrid", 4, 4, 6, {}, r"ulysses_size = 4 ranks, but 4 does not divide 6.*'ring'"),
        ("hybrid", 4, None, 4, {}, r"ulysses_size=u"),
        ("allgather", 2, None, 4, {"kv_heads_per_gather": 0}, r"kv_heads_per_gather must be a positive int"),
        ("ulysses", 2, None, 4, {"causal": 1}, r"causal must be a bool"),
    ],
)
def test_bad_input_is_a_value_error_on_every_rank(strategy, world_size, ulysses_size, heads, kwargs, expected):
    messages = mp_pool.run_on_ranks(world_size, error_case, world_size, strategy, ulysses_size, heads, 1, 4, **kwargs)
    for message in messages:
        assert re.search(expected, message), message


def test_zigzag_needs_an_even_local_length():
    messages = mp_pool.run_on_ranks(2, error_case, 2, "ulysses", None, 2, 2, 3)
    assert all("not a positive multiple of 4" in m for m in messages), messages


def test_ulysses_size_must_divide_cp_size():
    # Checked before any process group is touched, so it runs in this process.
    with pytest.raises(ValueError, match="ulysses_size=3 must divide cp_size=4"):
        init_context_parallel_group(4, ulysses_size=3)
    with pytest.raises(ValueError, match="ulysses_size must be a positive int, got 0"):
        init_context_parallel_group(4, ulysses_size=0)


def mesh_case() -> dict:
    group = mp_pool.group(4, ulysses_size=2)
    plain = mp_pool.group(4)
    try:
        plain_error = f"no error, got {plain.ulysses_mesh}"
    except ValueError as e:
        plain_error = str(e)
    return {
        "cp": group.rank,
        "size": group.size,
        "ring": group.ring_mesh.get_local_rank(),
        "ulysses": group.ulysses_mesh.get_local_rank(),
        "u": group.ulysses_size,
        "plain_u": plain.ulysses_size,
        "plain_error": plain_error,
        "dims": group.mesh.mesh_dim_names,
    }


def test_hybrid_mesh_puts_ulysses_groups_on_consecutive_cp_ranks():
    results = mp_pool.run_on_ranks(4, mesh_case)
    for rank, r in enumerate(results):
        assert (r["cp"], r["size"], r["u"], r["plain_u"]) == (rank, 4, 2, None)
        assert (r["ring"], r["ulysses"]) == divmod(rank, 2)
        assert r["dims"] == ("dp", "ring", "ulysses")
        assert "ulysses_size=u" in r["plain_error"]


# ---- the docs' multi-rank example -------------------------------------------------------------------


def _table(text: str) -> list[tuple[str, ...]]:
    """The rows of the example's output table without the error column (it varies with the platform)."""
    rows = []
    for line in text.splitlines():
        cells = line.split()
        if cells and cells[0] in ("ring", "ulysses", "allgather", "hybrid"):
            rows.append((cells[0], *cells[2:]))
    return rows


def test_docs_example_prints_what_the_page_shows():
    """docs/examples/strategies.py on 4 ranks (it asserts correctness and model bytes itself); its
    bytes table must be the one docs/strategies.md shows in the Output block after the file. The run
    is the session's one (tests/docs_examples.py), which test_docs.py::test_example checks too."""
    proc = run_example("strategies.py").proc
    assert proc.returncode == 0, proc.stdout + proc.stderr
    printed = _table(proc.stdout)
    assert [row[0] for row in printed] == ["ring", "ulysses", "allgather", "hybrid"], proc.stdout
    assert all(row[-1] == "yes" for row in printed), proc.stdout
    page = (REPO / "docs" / "strategies.md").read_text()
    after = page.split('title="docs/examples/strategies.py"', 1)[1]
    shown = after.split('```text title="Output"', 1)[1].split("```", 1)[0]
    assert _table(shown) == printed, f"update docs/strategies.md with:\n{proc.stdout}"
