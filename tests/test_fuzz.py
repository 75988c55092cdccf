"""The public functions fuzzed with invalid arguments, on 2 real gloo ranks.

Every rank gets the same arguments. A call with an argument that is invalid by construction (a wrong
type, a broken tensor, an out-of-range value) must raise ``ValueError`` with a message on every rank,
the same way: success means a validation is missing, any other exception type is a bug to fix with a
validation in the library, and a hang fails through the pool's timeout. Only where the draw may be
valid (e.g. a length that may or may not split evenly) may the call also succeed, on every rank.
"""

from __future__ import annotations

import datetime
import traceback

import mp_pool
import pytest
import torch
from helpers import GROUP_KWARGS
from hypothesis import given
from hypothesis import strategies as st

from cp_dtensor import STRATEGIES

WORLD_SIZE = 2
TIMEOUT_S = 60  # per example: a call that hangs fails the test instead of blocking CI


def call_on_rank(target: str, args: tuple, kwargs: dict) -> dict:
    """Runs on every rank: call ``target`` with ``"GROUP"`` replaced by this rank's group; report the outcome."""
    from cp_dtensor import get_strategy, init_context_parallel_group

    kind, _, name = target.partition(":")
    group = mp_pool.group(WORLD_SIZE, **GROUP_KWARGS.get(name, {}))
    args = tuple(group if isinstance(a, str) and a == "GROUP" else a for a in args)
    if kind == "init":
        fn = init_context_parallel_group
    elif kind == "attention":
        fn = get_strategy(name)
    else:
        fn = getattr(group, kind)  # a ContextParallelGroup method
    try:
        fn(*args, **kwargs)
        return {"type": None}
    except Exception as err:  # noqa: BLE001 - the test checks the type
        return {"type": type(err).__name__, "message": str(err), "traceback": traceback.format_exc()}


def check_outcome(target: str, args: tuple = (), kwargs: dict | None = None, *, invalid: bool) -> None:
    """Call ``target`` on every rank; ``invalid``: the arguments are wrong by construction, so it must raise."""
    outcomes = mp_pool.run_on_ranks(WORLD_SIZE, call_on_rank, target, args, kwargs or {}, timeout=TIMEOUT_S)
    first = outcomes[0]
    assert all(o["type"] == first["type"] for o in outcomes), f"ranks disagree: {outcomes}"
    assert first["type"] is not None or not invalid, f"{target}{args}{kwargs} succeeded: a validation is missing"
    if first["type"] is not None:
        assert first["type"] == "ValueError", f"{target}{args}{kwargs}:\n{first['traceback']}"
        assert len(first["message"]) > 20, first["message"]


# ---- values ----------------------------------------------------------------------------------

WRONG_TYPES = st.sampled_from([None, "2", 1.5, True, [2], float("nan")])
BAD_SIZES = st.one_of(st.integers(-3, 0), st.sampled_from([2.0, "2", True, None]))
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.bool])


@st.composite
def tensors(draw, max_dims: int = 5) -> torch.Tensor:
    """A small tensor of any rank (0 to ``max_dims``), sizes 0 to 4, any dtype."""
    shape = draw(st.lists(st.integers(0, 4), max_size=max_dims))
    return torch.zeros(shape).to(draw(DTYPES))


# ---- init_context_parallel_group --------------------------------------------------------------

INVALID_INIT = {
    "cp_size": [0, -1, 1.5, "2", True, None, 3, 4],
    "dp_size": [0, -2, 2.0, "1", True, 2, 3],
    "layout": ["zig", "", None, 1, "ZIGZAG"],
    "device_type": ["tpu", "", 1, "cuda" if not torch.cuda.is_available() else "xla"],
    "backend": [1, ["gloo"]],
    "timeout": [0, -1, "5", True, float("nan"), float("inf"), datetime.timedelta(0), datetime.timedelta(seconds=-1)],
    "ulysses_size": [0, -1, 3, 1.5, "2", True],
}


@pytest.mark.parametrize("name,value", [(n, v) for n, values in INVALID_INIT.items() for v in values])
def test_init_context_parallel_group_rejects_each_invalid_argument(name, value):
    kwargs = {"cp_size": 2, "device_type": "cpu"} | {name: value}
    cp_size = kwargs.pop("cp_size")
    outcomes = mp_pool.run_on_ranks(WORLD_SIZE, call_on_rank, "init", (cp_size,), kwargs, timeout=TIMEOUT_S)
    assert [o["type"] for o in outcomes] == ["ValueError"] * WORLD_SIZE, outcomes[0].get("traceback", outcomes)


@given(data=st.data())
def test_init_context_parallel_group_rejects_invalid_arguments(data):
    kwargs = {"dp_size": None, "layout": "zigzag", "device_type": "cpu", "timeout": None}
    for name in data.draw(st.lists(st.sampled_from(sorted(INVALID_INIT)), min_size=1, max_size=3, unique=True)):
        kwargs[name] = data.draw(st.sampled_from(INVALID_INIT[name]), label=name)
    cp_size = kwargs.pop("cp_size", 2)
    outcomes = mp_pool.run_on_ranks(WORLD_SIZE, call_on_rank, "init", (cp_size,), kwargs, timeout=TIMEOUT_S)
    assert [o["type"] for o in outcomes] == ["ValueError"] * WORLD_SIZE, outcomes[0].get("traceback", outcomes)


# ---- sequences ---------------------------------------------------------------------------------


@given(
    x=st.one_of(tensors(), WRONG_TYPES),
    seq_dim=st.one_of(st.integers(-6, 6), WRONG_TYPES),
    pad=st.one_of(st.booleans(), WRONG_TYPES),
)
def test_partition_and_distribute_sequence(x, seq_dim, pad):
    invalid = not _is_seq_dim_of(x, seq_dim) or not isinstance(pad, bool)
    check_outcome("partition_sequence", (x,), {"seq_dim": seq_dim, "pad": pad}, invalid=invalid)
    check_outcome("distribute_sequence", (x,), {"seq_dim": seq_dim, "pad": pad}, invalid=invalid)


def _is_int(value, low: int, high: int) -> bool:
    """``value`` is an int (not a bool) in ``[low, high)``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


def _is_seq_dim_of(x, seq_dim) -> bool:
    """``x`` is a tensor with at least one dim, and ``seq_dim`` an int that indexes a dim of it."""
    return isinstance(x, torch.Tensor) and x.dim() > 0 and _is_int(seq_dim, -x.dim(), x.dim())


@given(x=st.one_of(tensors(), WRONG_TYPES), seq_dim=st.one_of(st.integers(-6, 6), WRONG_TYPES))
def test_gather_sequence(x, seq_dim):
    check_outcome("gather_sequence", (x,), {"seq_dim": seq_dim}, invalid=not _is_seq_dim_of(x, seq_dim))


@given(
    seq_len=st.one_of(st.integers(-4, 20), BAD_SIZES, WRONG_TYPES),
    rank=st.one_of(st.none(), st.integers(-2, 3), WRONG_TYPES),
)
def test_position_ids_and_runs(seq_len, rank):
    bad_len = not _is_int(seq_len, 1, 2**62)
    check_outcome("position_ids", (seq_len,), invalid=bad_len)
    check_outcome("runs", (seq_len, rank), invalid=bad_len or not (rank is None or _is_int(rank, 0, WORLD_SIZE)))


# ---- attention --------------------------------------------------------------------------------


@st.composite
def valid_qkv(draw) -> tuple:
    """SDPA-shaped (B, H, S, D) local shards that every strategy accepts on 2 ranks (u = 2 divides H)."""
    b, h_kv, d = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2])), draw(st.sampled_from([4, 8]))
    h, s = h_kv * draw(st.sampled_from([1, 2])) * (2 // h_kv), 2 * draw(st.integers(1, 3))  # zigzag: even S
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    return tuple(torch.randn(b, n, s, d).to(dtype) for n in (h, h_kv, h_kv))


@st.composite
def broken_qkv(draw) -> tuple:
    """Valid shards with one thing wrong: a rank, a zero size, a dtype, a type, a size, the heads."""
    out = dict(zip("qkv", draw(valid_qkv())))
    victim = draw(st.sampled_from("qkv"))
    fault = draw(st.sampled_from(["rank", "zero", "dtype", "type", "size", "heads"]))
    shape = list(out[victim].shape)
    if fault == "rank":
        out[victim] = draw(tensors(max_dims=6).filter(lambda t: t.dim() != 4))
    elif fault == "zero":
        shape[draw(st.integers(0, 3))] = 0
        out[victim] = torch.zeros(shape)
    elif fault == "dtype":
        out[victim] = out[victim].to(draw(st.sampled_from([torch.int64, torch.bool, torch.float64, torch.complex64])))
    elif fault == "type":
        out[victim] = draw(WRONG_TYPES)
    elif fault == "size":
        shape[draw(st.sampled_from([0, 2, 3]))] += draw(st.integers(1, 3))
        out[victim] = torch.randn(shape).to(out[victim].dtype)
    else:  # K/V heads that differ between k and v (and do not divide the query heads)
        victim = draw(st.sampled_from("kv"))
        shape = list(out[victim].shape)
        shape[1] = draw(st.sampled_from([3, 5]))
        out[victim] = torch.randn(shape).to(out[victim].dtype)
    return out["q"], out["k"], out["v"]


INVALID_ATTENTION_KWARGS = {
    "causal": st.sampled_from([1, 0, None, "yes", 1.0]),
    "scale": st.sampled_from([0.0, -1.0, float("inf"), float("nan"), "0.1", True, [0.5]]),
    "window": st.sampled_from([(1,), (-1, 0), (1.5, 0), "left", (True, 0), (1, 2, 3), 5]),
    "seq_len": st.one_of(st.integers(-3, 0), st.integers(100, 200), st.sampled_from([2.0, "3", True, [3]])),
    "validate": st.sampled_from([1, "yes", None, 0]),
    "debug_check": st.sampled_from([1, "no", None]),
    "document_ids": st.none(),  # drawn by document_ids() from the shapes of q
}


@st.composite
def invalid_document_ids(draw, q: torch.Tensor) -> object:
    """Ids of the wrong batch, length, dtype or rank, or not a tensor."""
    b, s = q.shape[0], q.shape[2]
    return draw(
        st.sampled_from(
            [
                torch.zeros(b + 1, s, dtype=torch.long),
                torch.zeros(b, s + 1, dtype=torch.long),
                torch.zeros(b, s),
                torch.zeros(s, dtype=torch.long),
                torch.zeros(b, s, 1, dtype=torch.long),
                [[0] * s] * b,
                "docs",
                3,
            ]
        )
    )


@given(data=st.data())
def test_every_strategy_rejects_broken_tensors(data):
    strategy = data.draw(st.sampled_from(sorted(STRATEGIES)), label="strategy")
    q, k, v = data.draw(broken_qkv(), label="qkv")
    check_outcome(f"attention:{strategy}", (q, k, v, "GROUP"), {"causal": data.draw(st.booleans())}, invalid=True)


@given(data=st.data())
def test_every_strategy_rejects_invalid_arguments(data):
    strategy = data.draw(st.sampled_from(sorted(STRATEGIES)), label="strategy")
    q, k, v = data.draw(valid_qkv(), label="qkv")
    names = data.draw(st.lists(st.sampled_from(sorted(INVALID_ATTENTION_KWARGS)), min_size=1, max_size=2, unique=True))
    kwargs = {}
    for name in names:
        draw = invalid_document_ids(q) if name == "document_ids" else INVALID_ATTENTION_KWARGS[name]
        kwargs[name] = data.draw(draw, label=name)
    check_outcome(f"attention:{strategy}", (q, k, v, "GROUP"), kwargs, invalid=True)
    if not {"validate", "debug_check"} & set(names):  # the same mistakes, with validation on
        check_outcome(f"attention:{strategy}", (q, k, v, "GROUP"), kwargs | {"validate": True}, invalid=True)


@given(strategy=st.sampled_from(sorted(STRATEGIES)), group=st.one_of(WRONG_TYPES, st.just("a group")))
def test_every_strategy_rejects_a_wrong_group(strategy, group):
    q = torch.randn(1, 2, 4, 8)
    check_outcome(f"attention:{strategy}", (q, q, q, group), invalid=True)
