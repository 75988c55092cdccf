"""What the tests share: inputs, the fp64 oracle, unsharding, THE tolerance rule, and test-only state guards.

No test module imports another test module; what two of them need lives here.

How to write a multi-rank test
------------------------------
1. Write the per-rank work as a module-level function of a test module (the pool's spawned workers
   import it by name), taking plain arguments: tensors, dicts, numbers. Build its group with
   ``mp_pool.group(P, layout=...)`` (cached per worker, short timeout), never with a bare
   ``init_process_group``. Return tensors or plain values; they come back to the test.
2. In the test, draw or fix a configuration, make the GLOBAL inputs once with :func:`make_inputs`
   (fp64, seeded: identical on every rank), and call
   ``mp_pool.run_on_ranks(P, per_rank_fn, P, cfg, inputs)``: one result per rank, in rank order.
   A rank that raises fails the test with that rank's traceback; a hang fails after the timeout.
3. Put the shards back with :func:`unshard`, compute the expectation with :func:`oracle` (fp64, one
   process), and compare with :func:`assert_close_to_oracle`, which holds the per-dtype tolerances.
4. A task must leave its worker as it found it (the next test runs in the same process): change
   module state only inside a context manager such as :func:`default_tile`. The pool checks the
   library's module-level settings after every task and fails a task that changed one.
5. Break the code once on purpose and see the test fail (``tests/mutation_check.py`` does it for
   the core algorithms).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from cp_dtensor.positions.layout import shard_positions
from cp_dtensor.reference import full_attention

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
GROUP_KWARGS = {"hybrid": {"ulysses_size": 2}}  # what a strategy needs of its group: hybrid a Ulysses axis (u = 2)

# ---- inputs and oracle -----------------------------------------------------------------------------


def make_inputs(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Unit-normal global q, k, v and output gradient, fp64, identical for every rank.

    ``cfg`` holds ``batch``, ``heads``, ``kv_heads``, ``seq_len`` and ``head_dim``.
    """
    gen = torch.Generator().manual_seed(seed)
    b, h, hkv, s, d = cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["seq_len"], cfg["head_dim"]
    shapes = {"q": (b, h, s, d), "k": (b, hkv, s, d), "v": (b, hkv, s, d), "dout": (b, h, s, d)}
    return {name: torch.randn(shape, generator=gen, dtype=torch.float64) for name, shape in shapes.items()}


def unshard(shards: list[torch.Tensor], world_size: int, layout, seq_dim: int = 2) -> torch.Tensor:
    """Put every rank's shard (in rank order) back at its global positions under ``layout``."""
    seq_len = shards[0].shape[seq_dim] * world_size
    full = torch.empty(*shards[0].shape[:seq_dim], seq_len, *shards[0].shape[seq_dim + 1 :], dtype=shards[0].dtype)
    for rank, shard in enumerate(shards):
        full.index_copy_(seq_dim, shard_positions(seq_len, world_size, rank, layout), shard)
    return full


def attention_and_grads(inputs: dict, dtype: torch.dtype = torch.float64, **options) -> dict[str, torch.Tensor]:
    """ONE process's attention on the whole sequence in ``dtype``, and its autograd gradients.

    ``options`` go to :func:`cp_dtensor.reference.full_attention` (``causal``, ``scale``, ``mask``). Without a
    mask and below fp64 this is fused SDPA (what a user would run on one device); fp64 and masked
    cases use the reference's plain attention.
    """
    q, k, v = (inputs[n].detach().to(dtype, copy=True).requires_grad_() for n in "qkv")
    if dtype != torch.float64 and options.get("mask") is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=options.get("causal", False), scale=options.get("scale"), enable_gqa=True
        )
    else:
        out = full_attention(q, k, v, **options)
    out.backward(inputs["dout"].to(dtype))
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def oracle(cfg: dict, inputs: dict, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """fp64 full attention (``cfg["causal"]``, ``cfg["scale"]``, an optional dense bool mask) and its gradients."""
    return attention_and_grads(
        inputs, torch.float64, causal=cfg.get("causal", False), scale=cfg.get("scale"), mask=mask
    )


# ---- THE tolerance rule ------------------------------------------------------------------------------

# Error allowed against the fp64 oracle, on unit-normal inputs, beyond twice ONE process's own error in
# the same dtype (see assert_close_to_oracle). Reasons:
# - fp64: every step is fp64; only the order of the sums differs (~1e-16 relative per term, L <= ~1e3
#   terms of O(10)): 1e-10 is far above that and far below any algorithmic error.
# - fp32: the sharded run rounds its P partial results once more when it merges them (fp32 accumulators,
#   2^-24 relative each, a few merges of O(1) values): a few 1e-7; 2e-6 covers the cases where one
#   process happens to be near exact.
# - bf16: inputs and output are rounded to bf16 (2^-9 relative) at each collective and the merged
#   output once more: 2e-2 is ~2.5 bf16 ulps at 1, where one process may be exact by luck.
# Rounding is relative, so the floor scales with the largest value compared when that exceeds 1 (a
# large softmax scale sharpens the attention and makes gradients of O(10)).
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-6, torch.bfloat16: 2e-2}
BASELINE_FACTOR = 2  # a sharded run may round twice where one process rounds once


def tolerance(dtype: torch.dtype, one_process_error: float = 0.0, magnitude: float = 1.0) -> float:
    """Max abs error vs the fp64 oracle allowed in ``dtype``.

    ``2 * one_process_error + FLOOR[dtype] * max(1, magnitude)``, ``magnitude`` being the largest
    absolute value of the oracle's tensor.
    """
    return BASELINE_FACTOR * one_process_error + FLOOR[dtype] * max(1.0, magnitude)


def max_errors(got: dict, expected: dict) -> dict[str, float]:
    """Max abs error of each entry of ``got`` (any dtype) against ``expected`` (fp64)."""
    return {n: (got[n].double() - expected[n]).abs().max().item() for n in got}


def assert_close_to_oracle(
    got: dict, expected: dict, dtype: torch.dtype, one_process: dict | None = None, what: str = "sharded"
) -> None:
    """Each of ``got``'s tensors within :func:`tolerance` of the fp64 ``expected``.

    Args:
        got: Name -> result (out, dq, ...), any dtype, already unsharded.
        expected: Name -> the fp64 oracle's value.
        dtype: The dtype the sharded run computed in.
        one_process: Name -> ONE process's result in ``dtype`` (:func:`attention_and_grads`): its error
            is the baseline. Omit it in fp64 (the floor alone applies).
        what: Names the run in the failure message.
    """
    baseline = max_errors(one_process, expected) if one_process is not None else dict.fromkeys(got, 0.0)
    for name, err in max_errors(got, expected).items():
        assert torch.isfinite(got[name]).all(), f"{name}: {what} result is not finite"
        magnitude = expected[name].abs().max().item()
        allowed = tolerance(dtype, baseline[name], magnitude)
        assert err <= allowed, (
            f"{name}: {what} error {err:.3g} > allowed {allowed:.3g} in {dtype} "
            f"(one process: {baseline[name]:.3g}, floor {FLOOR[dtype]:.3g} x max(1, {magnitude:.3g}))"
        )


# ---- state a test may change only temporarily ----------------------------------------------------


@contextlib.contextmanager
def _setting(module, name: str, value) -> Iterator[None]:
    """``module.name = value`` for the duration; the library's value comes back on exit, even on error."""
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, before)


def default_tile(tile: int):
    """Plan masked attention with ``tile``-sized tiles inside the block (small tiles exercise the skip /
    full / masked split); the library default comes back on exit, even on error."""
    import cp_dtensor.positions.masks

    return _setting(cp_dtensor.positions.masks, "DEFAULT_TILE", tile)


def logit_tile(tile: int):
    """Run the soft-capping / score-function kernel with ``tile x tile`` tiles (several per block); the
    library default comes back on exit, even on error."""
    import cp_dtensor.local.logits

    return _setting(cp_dtensor.local.logits, "DEFAULT_LOGIT_TILE", tile)


# ---- explicit coverage, then random draws --------------------------------------------------------


def covering_cases(core: dict[str, list], others: dict[str, list]) -> list[dict]:
    """Rows that hold every combination of the ``core`` factors and every PAIR of values of all factors.

    Greedy and deterministic: one row per combination of ``core`` (in order), each completed with the
    values of ``others`` that cover the most pairs not yet covered; then rows are added the same way
    until every pair of values of any two factors appears in some row. A property test runs these rows
    as fixed cases, and hypothesis draws more at random on top (``HYPOTHESIS_PROFILE=thorough`` many).
    """
    import itertools

    names = [*core, *others]
    values = {**core, **others}
    uncovered = {
        ((a, va), (b, vb)) for a, b in itertools.combinations(names, 2) for va in values[a] for vb in values[b]
    }

    def gain(row: dict) -> int:
        items = [(n, row[n]) for n in names if n in row]
        return sum(((x, y) in uncovered) for x, y in itertools.combinations(items, 2))

    used = {name: dict.fromkeys(values[name], 0) for name in names}  # ties go to the least used value

    def best(row: dict, name: str):
        return max(values[name], key=lambda v: (gain({**row, name: v}), -used[name][v], -values[name].index(v)))

    def complete(row: dict) -> dict:
        for name in others:
            row[name] = best(row, name)
        return row

    def take(row: dict) -> None:
        items = [(n, row[n]) for n in names]
        uncovered.difference_update(itertools.combinations(items, 2))
        for n, v in items:
            used[n][v] += 1

    rows = []
    for combo in itertools.product(*core.values()):
        rows.append(complete(dict(zip(core, combo))))
        take(rows[-1])
    while uncovered:
        (a, va), (b, vb) = min(uncovered, key=lambda p: (names.index(p[0][0]), names.index(p[1][0]), str(p)))
        row = {a: va, b: vb}
        for name in names:  # the remaining factors, greedily
            if name not in row:
                row[name] = best(row, name)
        rows.append({n: row[n] for n in names})
        take(rows[-1])
    return rows


def case_id(row: dict) -> str:
    """A short pytest id for a covering row."""
    return "-".join(str(v) for v in row.values())


def random_draws(ci_examples: int):
    """Hypothesis settings for a property test that ALSO has explicit covering cases: ``ci_examples`` random
    draws in the CI profile (the covering cases carry the coverage there), the profile's count otherwise."""
    import os

    from hypothesis import settings

    if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci":  # the profile conftest.py loads
        return settings(max_examples=ci_examples)
    return settings()


def record_draw(cfg: dict) -> bool:
    """With ``CP_LIST_DRAWS=<file>``: append this test's case (the current pytest test id and ``cfg``) to the
    file and return True, so that the test returns before running it (``tests/list_draws.py`` lists what each
    property test really covers). Otherwise False."""
    import json
    import os

    path = os.environ.get("CP_LIST_DRAWS")
    if not path:
        return False
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
    summary = {k: (repr(v) if not isinstance(v, (int, float, str, bool, type(None))) else v) for k, v in cfg.items()}
    with open(path, "a") as f:
        f.write(json.dumps({"test": test, "cfg": summary}) + "\n")
    return True


# ---- the training job at test size ---------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]

TINY_JOB = [
    *("--seq-len", "32", "--batch-size", "4", "--hidden-size", "32", "--num-heads", "4", "--num-kv-heads", "2"),
    *("--num-layers", "1", "--num-pairs", "4", "--num-keys", "4", "--num-values", "4", "--warmup", "1"),
    *("--eval-samples", "4", "--log-every", "3", "--dtype", "float64", "--steps", "3"),
]
"""Flags of a three-step fp64 run of the job, small enough for a pool of 8 ranks on 2 cores."""


def train_case(argv: list[str]) -> dict:
    """Runs on every rank: the job's ``train`` on this pool's ranks (``main`` would tear the group down).

    Returns:
        ``{"losses": [...], "mesh": (dp, cp, tp, world_size)}``.
    """
    from cp_dtensor.training.train import parse_args, train

    summary = train(parse_args(argv))
    return {
        "losses": [c["loss"] for c in summary["curve"]],
        "mesh": (summary["dp"], summary["cp"], summary["tp"], summary["world_size"]),
    }


def torchrun_job_losses(out: Path, flags: list[str], *, nproc: int = 2, timeout: float = 120) -> list[float]:
    """The job's loss per step, launched by a user's command (``torchrun -m cp_dtensor.training``), in ``out``.

    The ranks are forks of the preloaded server (tests/warm_launch.py); tests/test_train.py launches
    the job with torchrun itself. ``timeout`` is the run's work limit, in CPU seconds of all its
    processes (tests/work_limits.py).
    """
    import warm_launch

    launcher = ["torchrun", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [*launcher, "-m", "cp_dtensor.training", *flags, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = warm_launch.run(cmd, cpu_s=timeout, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [c["loss"] for c in json.loads(out.read_text())["curve"]]
