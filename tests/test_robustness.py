"""Robustness on real gloo ranks: awkward lengths, ranks that disagree, extreme values, failed ranks.

Every strategy in ``STRATEGIES`` is covered where the property is not ring-specific: a strategy
registered later is picked up automatically (``hybrid`` gets a group with ``ulysses_size=2``; any
other strategy the plain group, and fails here loudly if it needs more).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import mp_pool
import pytest
import torch
import warm_launch
import work_limits
from helpers import GROUP_KWARGS, make_inputs, unshard

from cp_dtensor import STRATEGIES, context_parallel_attention
from cp_dtensor.attention.debug import DEBUG_CHECK_TOLERANCE
from cp_dtensor.positions.layout import num_chunks, padded_length, shard_positions
from cp_dtensor.reference import full_attention

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def strategy_group(strategy: str, world_size: int, layout: str = "zigzag"):
    """Inside a worker: the cached group a strategy runs on."""
    return mp_pool.group(world_size, layout=layout, **GROUP_KWARGS.get(strategy, {}))


def attention_case(strategy: str, world_size: int, cfg: dict, inputs: dict) -> dict:
    """Runs on every rank: shard (padding if asked), attention forward and backward.

    ``inputs["dout"]`` has the padded length: padded rows get a non-zero output gradient too.
    """
    group = strategy_group(strategy, world_size, cfg["layout"])
    dtype = DTYPES[cfg["dtype"]]
    pad = cfg.get("seq_len_real") is not None
    q, k, v = (group.partition_sequence(inputs[n], seq_dim=2, pad=pad).to(dtype).requires_grad_() for n in "qkv")
    out = context_parallel_attention(
        q, k, v, group, strategy=strategy, causal=cfg["causal"], scale=cfg.get("scale"), seq_len=cfg.get("seq_len_real")
    )
    out.backward(group.partition_sequence(inputs["dout"], seq_dim=2).to(dtype))
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def gathered(results: list[dict], world_size: int, layout: str) -> dict[str, torch.Tensor]:
    """Every rank's shards back in global order, as fp64."""
    return {n: unshard([r[n] for r in results], world_size, layout).double() for n in ("out", "dq", "dk", "dv")}


def fp64_oracle(inputs: dict, causal: bool, scale: float | None = None, length: int | None = None) -> dict:
    """fp64 full attention on the first ``length`` tokens (all by default) and its gradients."""
    q, k, v = (inputs[n][:, :, :length].double().clone().requires_grad_() for n in "qkv")
    out = full_attention(q, k, v, causal=causal, scale=scale)
    out.backward(inputs["dout"][:, :, :length].double())
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def sdpa_in(dtype: torch.dtype, inputs: dict, causal: bool, scale: float | None) -> dict:
    """ONE process's fused SDPA in ``dtype``: the best a sharded run can hope for."""
    q, k, v = (inputs[n].to(dtype).requires_grad_() for n in "qkv")
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
    out.backward(inputs["dout"].to(dtype))
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def rounded_inputs(cfg: dict, seed: int, dtype: torch.dtype) -> dict:
    """Inputs already representable in ``dtype`` (kept in fp64): errors then come from the computation only."""
    return {n: t.to(dtype).double() for n, t in make_inputs(cfg, seed).items()}


# ---- sequence lengths that do not split evenly ------------------------------------------------


@pytest.mark.parametrize("seq_len_real", [13, 3])  # 3: with P = 4 some ranks hold nothing but padding
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_padded_sequence_matches_unpadded_attention(world_size, layout, causal, seq_len_real):
    """pad=True + seq_len: the real tokens get full attention on the unpadded sequence; padding gets 0."""
    padded = padded_length(seq_len_real, world_size, layout)
    cfg = {
        "batch": 2,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 8,
        "seq_len": padded,
        "causal": causal,
        "layout": layout,
        "dtype": "float64",
        "seq_len_real": seq_len_real,
    }
    full = make_inputs(cfg, 11)
    inputs = {n: full[n][:, :, :seq_len_real] for n in "qkv"} | {"dout": full["dout"]}  # dout covers the padding
    results = mp_pool.run_on_ranks(world_size, attention_case, "ring", world_size, cfg, inputs)
    got = gathered(results, world_size, layout)
    expected = fp64_oracle(full, causal, length=seq_len_real)
    for name in expected:
        # fp64 throughout: only the summation order differs from the oracle.
        torch.testing.assert_close(got[name][:, :, :seq_len_real], expected[name], rtol=0, atol=1e-10, msg=name)
        # Padded rows see no key: output 0, and no gradient flows to or from padded positions.
        assert torch.equal(got[name][:, :, seq_len_real:], torch.zeros_like(got[name][:, :, seq_len_real:])), name


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_padded_sequence_every_strategy(strategy):
    """Every strategy masks padding: P = 4, zigzag, causal, with two ranks holding only padding."""
    seq_len_real, world_size = 3, 4
    cfg = {
        "batch": 1,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 8,
        "seq_len": 8,
        "causal": True,
        "layout": "zigzag",
        "dtype": "float64",
        "seq_len_real": seq_len_real,
    }
    full = make_inputs(cfg, 12)
    inputs = {n: full[n][:, :, :seq_len_real] for n in "qkv"} | {"dout": full["dout"]}
    got = gathered(mp_pool.run_on_ranks(world_size, attention_case, strategy, world_size, cfg, inputs), 4, "zigzag")
    expected = fp64_oracle(full, True, length=seq_len_real)
    for name in expected:
        # fp64 throughout: only the summation order differs from the oracle.
        torch.testing.assert_close(got[name][:, :, :seq_len_real], expected[name], rtol=0, atol=1e-10, msg=name)
        assert torch.equal(got[name][:, :, seq_len_real:], torch.zeros_like(got[name][:, :, seq_len_real:])), name


def partition_errors(world_size: int, layout: str) -> dict:
    """Runs on every rank: what partition_sequence and distribute_sequence do with 13 tokens."""
    group = mp_pool.group(world_size, layout=layout)
    x = torch.arange(2 * 13.0).reshape(2, 13)
    try:
        group.partition_sequence(x, seq_dim=1)
        message = None
    except ValueError as err:
        message = str(err)
    padded = group.partition_sequence(x, seq_dim=1, pad=True)
    dtensor = group.distribute_sequence(x, seq_dim=1, pad=True)
    return {"message": message, "padded": padded, "dtensor_local": dtensor.to_local()}


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_unsplittable_length_names_length_multiple_and_fix(layout):
    results = mp_pool.run_on_ranks(4, partition_errors, 4, layout)
    multiple = num_chunks(4, layout)
    padded = padded_length(13, 4, layout)
    x = torch.arange(2 * 13.0).reshape(2, 13)
    x_padded = torch.cat([x, torch.zeros(2, padded - 13)], dim=1)
    for rank, r in enumerate(results):
        assert r["message"] is not None, "13 tokens must not split silently"
        for part in ("13", f"multiple of {multiple}", f"Pad it to {padded}", "pad=True"):
            assert part in r["message"], (part, r["message"])
        assert torch.equal(r["padded"], x_padded[:, shard_positions(padded, 4, rank, layout)])
        # A DTensor means natural order: rank r holds the r-th contiguous chunk of the padded x.
        assert torch.equal(r["dtensor_local"], x_padded.chunk(4, dim=1)[rank])


# ---- ranks that disagree ---------------------------------------------------------------------

MISMATCHES = {"seq_len": "q:", "dtype": "q:", "causal": "causal:"}  # what rank 1 changes -> the field named


def mismatch_case(strategy: str, mismatch: str, via_env: bool) -> dict:
    """Runs on every rank: rank 1 passes a different local length, dtype or causal flag."""
    import torch.distributed as dist

    group = strategy_group(strategy, 2)
    cfg = {"batch": 1, "heads": 4, "kv_heads": 2, "head_dim": 8, "seq_len": 16}
    inputs = make_inputs(cfg, 0)
    causal = True
    if dist.get_rank() == 1 and mismatch == "seq_len":
        inputs = {n: t[:, :, :8] for n, t in inputs.items()}  # another batch's length
    q, k, v = (group.partition_sequence(inputs[n], seq_dim=2).float() for n in "qkv")
    if dist.get_rank() == 1 and mismatch == "dtype":
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    if dist.get_rank() == 1 and mismatch == "causal":
        causal = False
    kwargs = {} if via_env else {"validate": True}
    if via_env:
        os.environ["CP_DTENSOR_VALIDATE"] = "1"
    try:
        context_parallel_attention(q, k, v, group, strategy=strategy, causal=causal, **kwargs)
        return {"raised": None}
    except Exception as err:  # noqa: BLE001 - the test checks the type
        return {"raised": type(err).__name__, "message": str(err)}
    finally:
        os.environ.pop("CP_DTENSOR_VALIDATE", None)


@pytest.mark.parametrize("mismatch", sorted(MISMATCHES))
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_validate_raises_the_same_error_on_every_rank(strategy, mismatch):
    results = mp_pool.run_on_ranks(2, mismatch_case, strategy, mismatch, False, timeout=60)
    assert [r["raised"] for r in results] == ["ValueError", "ValueError"], results
    assert results[0]["message"] == results[1]["message"], "every rank must raise the same error"
    message = results[0]["message"]
    assert MISMATCHES[mismatch] in message and "cp rank 1" in message, message


def test_validate_env_var_and_agreeing_ranks():
    """CP_DTENSOR_VALIDATE=1 turns validation on; ranks that agree compute exactly as without it."""
    results = mp_pool.run_on_ranks(2, mismatch_case, "ring", "causal", True, timeout=60)
    assert [r["raised"] for r in results] == ["ValueError", "ValueError"], results
    assert results[0]["message"] == results[1]["message"] and "causal:" in results[0]["message"]
    cfg = {
        "batch": 1,
        "heads": 2,
        "kv_heads": 1,
        "head_dim": 8,
        "seq_len": 8,
        "layout": "zigzag",
        "dtype": "float32",
        "causal": True,
    }
    inputs = make_inputs(cfg, 1)
    plain = mp_pool.run_on_ranks(2, attention_case, "ring", 2, cfg, inputs)
    validated = mp_pool.run_on_ranks(2, validated_case, 2, cfg, inputs)
    for a, b in zip(plain, validated):
        for name in a:
            assert torch.equal(a[name], b[name]), name
        assert b["validate_calls"] == 1


def validated_case(world_size: int, cfg: dict, inputs: dict) -> dict:
    from cp_dtensor import count_comm

    os.environ["CP_DTENSOR_VALIDATE"] = "1"
    try:
        with count_comm() as comm:
            result = attention_case("ring", world_size, cfg, inputs)
    finally:
        os.environ.pop("CP_DTENSOR_VALIDATE")
    return result | {"validate_calls": comm.calls["validate"]}


# ---- the debug re-check ----------------------------------------------------------------------


def debug_case(strategy: str, corrupt_rank: int | None, via_env: bool, inputs: dict) -> dict:
    """Runs on every rank: attention with the debug check; ``corrupt_rank`` scales its block outputs by 1.5."""
    import torch.distributed as dist

    import cp_dtensor.local.block_loop

    group = strategy_group(strategy, 2)
    q, k, v = (group.partition_sequence(inputs[n], seq_dim=2).float() for n in "qkv")
    original = cp_dtensor.local.block_loop.block_forward
    if dist.get_rank() == corrupt_rank:  # a wrong kernel on one rank (every strategy computes through it)
        cp_dtensor.local.block_loop.block_forward = lambda *a, **kw: (lambda o, lse: (o * 1.5, lse))(
            *original(*a, **kw)
        )
    if via_env:
        os.environ["CP_DTENSOR_DEBUG_CHECK"] = "1"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = context_parallel_attention(
                q, k, v, group, strategy=strategy, causal=True, **({} if via_env else {"debug_check": True})
            )
    finally:
        cp_dtensor.local.block_loop.block_forward = original
        os.environ.pop("CP_DTENSOR_DEBUG_CHECK", None)
    messages = [str(w.message) for w in caught if "debug check" in str(w.message)]
    return {"out": out.detach(), "warnings": messages, "max_v": v.abs().max().item()}


@pytest.mark.parametrize("corrupt_rank", [None, 1])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_debug_check_warns_exactly_where_the_output_is_wrong(strategy, corrupt_rank):
    cfg = {"batch": 1, "heads": 4, "kv_heads": 2, "head_dim": 8, "seq_len": 16}
    inputs = make_inputs(cfg, 2)
    results = mp_pool.run_on_ranks(2, debug_case, strategy, corrupt_rank, False, inputs)
    expected = fp64_oracle({n: t.float() for n, t in inputs.items()}, causal=True)["out"]
    warned_somewhere = False
    for rank, r in enumerate(results):
        error = (r["out"].double() - expected[:, :, shard_positions(16, 2, rank, "zigzag")]).abs().max().item()
        tolerance = DEBUG_CHECK_TOLERANCE[torch.float32] * max(1.0, max(x["max_v"] for x in results))
        wrong = error > tolerance
        assert bool(r["warnings"]) == wrong, (rank, error, r["warnings"])
        if wrong:
            warned_somewhere = True
            assert f"cp rank {rank}" in r["warnings"][0] and "max abs error" in r["warnings"][0], r["warnings"]
    assert warned_somewhere == (corrupt_rank is not None)


def test_debug_check_env_var():
    inputs = make_inputs({"batch": 1, "heads": 2, "kv_heads": 2, "head_dim": 8, "seq_len": 16}, 3)
    results = mp_pool.run_on_ranks(2, debug_case, "ring", 1, True, inputs)
    assert not results[0]["warnings"]  # rank 0's ring output does not pass through rank 1's kernel
    assert len(results[1]["warnings"]) == 1 and "cp rank 1" in results[1]["warnings"][0]


# ---- numerics --------------------------------------------------------------------------------


def _ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


@pytest.mark.parametrize("how", ["scale", "inputs"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_extreme_logits_stay_finite(strategy, dtype, how):
    """Logits of magnitude ~1e4: scale=1e4, or q and k scaled by 100 (default scale)."""
    cfg = {
        "batch": 1,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 16,
        "seq_len": 64,
        "causal": True,
        "layout": "zigzag",
        "dtype": dtype,
        "scale": 1e4 if how == "scale" else None,
    }
    inputs = rounded_inputs(cfg, 4, DTYPES[dtype])
    if how == "inputs":
        inputs["q"], inputs["k"] = inputs["q"] * 100, inputs["k"] * 100  # powers of ten are exact enough
        inputs = {n: t.to(DTYPES[dtype]).double() for n, t in inputs.items()}
    got = gathered(mp_pool.run_on_ranks(4, attention_case, strategy, 4, cfg, inputs), 4, "zigzag")
    expected = fp64_oracle(inputs, True, cfg["scale"])
    logits = torch.einsum("bhqd,bhkd->bhqk", inputs["q"], inputs["k"].repeat_interleave(2, 1))
    assert (logits.abs().max() * (cfg["scale"] or 16**-0.5)) >= 1e4, "the case must reach the logits it claims"
    for name, tensor in got.items():
        assert torch.isfinite(tensor).all(), f"{name} has NaN/Inf"
    baseline = sdpa_in(DTYPES[dtype], inputs, True, cfg["scale"])
    sdpa_err = (baseline["out"].double() - expected["out"]).abs().max().item()
    err = (got["out"] - expected["out"]).abs().max().item()
    # The softmax is one-hot up to near-ties: the output is a value row rounded to the dtype (a few
    # ulps of max |v|), and near-ties are as ill-conditioned for one process's SDPA (x2 its error).
    assert err <= 2 * sdpa_err + 4 * _ulp(DTYPES[dtype]) * inputs["v"].abs().max().item(), (err, sdpa_err)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_low_precision_inputs_accumulate_in_fp32(strategy, dtype):
    """bf16/fp16 in, fp32 accumulation: the error stays at one process's fused SDPA in that dtype."""
    cfg = {
        "batch": 1,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 32,
        "seq_len": 256,
        "causal": True,
        "layout": "zigzag",
        "dtype": dtype,
    }
    inputs = rounded_inputs(cfg, 5, DTYPES[dtype])
    got = gathered(mp_pool.run_on_ranks(4, attention_case, strategy, 4, cfg, inputs), 4, "zigzag")
    expected = fp64_oracle(inputs, True)
    baseline = sdpa_in(DTYPES[dtype], inputs, True, None)
    for name in expected:
        rel = ((got[name] - expected[name]).norm() / expected[name].norm()).item()
        rel_sdpa = ((baseline[name].double() - expected[name]).norm() / expected[name].norm()).item()
        # Relative Frobenius error. Per-block kernels round each block's output and dK/dV once more
        # than SDPA (measured <= 1.2x SDPA); accumulating the P merges and hops in bf16/fp16 instead
        # of fp32 measured 2.2-3.8x. Floor: 0.1 ulp of the dtype, for an SDPA that is nearly exact.
        assert rel <= 1.5 * rel_sdpa + 0.1 * _ulp(DTYPES[dtype]), f"{name}: {rel:.3g} vs SDPA {rel_sdpa:.3g}"


# ---- determinism -----------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_two_runs_are_bitwise_identical(strategy, world_size):
    cfg = {
        "batch": 2,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 16,
        "seq_len": 16 * world_size,
        "causal": True,
        "layout": "zigzag",
        "dtype": "float32",
    }
    inputs = make_inputs(cfg, 6)
    first = mp_pool.run_on_ranks(world_size, attention_case, strategy, world_size, cfg, inputs)
    second = mp_pool.run_on_ranks(world_size, attention_case, strategy, world_size, cfg, inputs)
    for rank, (a, b) in enumerate(zip(first, second)):
        for name in a:
            assert torch.equal(a[name], b[name]), f"rank {rank}: {name} differs between two identical runs"


# ---- a rank that fails -----------------------------------------------------------------------

# name: (world size, arguments of tests/failing_rank.py); rank 1 fails, rank 0 shares its ring
FAILURES = {
    "raise before the first send": (2, ["--fail", "raise"]),
    "exit in the middle of the step": (2, ["--fail", "exit"]),
    "hang, default group made without a timeout": (2, ["--fail", "hang", "--user-init"]),
    "hang, the ring on a sub-group (dp=2)": (4, ["--fail", "hang", "--dp-size", "2"]),
}
# What a survivor may say: gloo's timeout or closed connection mid-collective, or the store's wait
# timeout. Each names a timeout or a lost peer; none is a hang or a silent result. (The ranks line up
# before they connect, tests/failing_rank.py, so a connect timeout would be a fault of the test.)
CLEAR_ERRORS = ("Timed out", "Connection closed", "Connection reset", "wait timeout")
# The work limit of one rank that must exit (tests/work_limits.py): a hang guard only, each spends
# a few CPU seconds; a hang shows as a stall.
MUST_EXIT_CPU_S = 60


def test_a_failed_rank_makes_the_others_fail_loudly():
    """rank 1 raises, dies or hangs; rank 0 (same ring) exits non-zero naming the failure; others finish.

    All scenarios run at once (separate worlds) so the test costs one startup and one timeout. Each
    rank is ``python tests/failing_rank.py`` with the environment torchrun would give it, run as a
    fork of the preloaded server (tests/warm_launch.py).
    """
    jobs, stores = {}, []
    for name, (world_size, args) in FAILURES.items():
        stores.append(mp_pool.serve_store())  # one rendezvous per world, held here as torchrun's agent does
        for rank in range(world_size):
            env = os.environ | {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(stores[-1].port),
                "TORCHELASTIC_USE_AGENT_STORE": "True",
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "OMP_NUM_THREADS": "1",
            }
            argv = [sys.executable, REPO / "tests" / "failing_rank.py", *args, "--timeout", "5"]
            jobs[name, rank] = warm_launch.WarmJob(argv, cpu_s=MUST_EXIT_CPU_S, cwd=REPO, env=env)
    must_exit = [key for key in jobs if key[1] != 1]  # every rank but the failing one ends by itself
    ended, limits = set(), {}
    while len(ended) + len(limits) < len(must_exit):
        for key in must_exit:
            if key in ended or key in limits:
                continue
            try:
                if jobs[key].poll():
                    ended.add(key)
            except work_limits.LimitExceeded as error:
                limits[key] = error
        time.sleep(0.5)
    for key, job in jobs.items():  # the hanging ranks (and, on failure, anything left)
        if key not in ended:
            job.kill()
    results = {key: job.result() for key, job in jobs.items()}
    assert not limits, limits
    for name, (world_size, args) in FAILURES.items():
        survivor = results[name, 0]
        output = survivor.stdout + survivor.stderr
        assert survivor.returncode != 0 and "completed" not in output, (name, output[-2000:])
        assert any(e in output for e in CLEAR_ERRORS), (name, output[-2000:])
        if args[1] != "hang":
            assert results[name, 1].returncode != 0, name
        for rank in range(2, world_size):  # the other dp replica's ring is unaffected
            proc = results[name, rank]
            assert proc.returncode == 0 and "completed" in proc.stdout, (
                name,
                rank,
                (proc.stdout + proc.stderr)[-2000:],
            )
