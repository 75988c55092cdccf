"""The docs' layer, training-loop and memory examples and the README's first look agree with one process.

The examples (``docs/examples/layer_full_size.py`` and ``training_loop.py``, shown on the
"Running it on ranks" and "A training loop" pages; ``memory_estimate.py`` on "Scaling out") run once
per session with the command of their docstring (``torchrun`` on 4 gloo ranks, under a work limit;
the run ``tests/test_docs.py::test_example`` checks the page's Output block against, see
``tests/docs_examples.py``), and their output is checked here: against the same computation on one
process where there is one (the layer, the CP x DP training loop), else against what the example
claims to show. ``debug_ring.py`` asserts what it shows itself (each rank's shard shape, the P - 1
rotations, the profiler's wait label); ``test_example`` runs it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import mp_pool
import torch
import work_limits
from docs_examples import SAVE, run_example

from cp_dtensor import ContextParallelAttention
from cp_dtensor.reference import full_attention

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "docs" / "examples"
ONE_PROCESS_CPU_S = 120  # work budget of training_loop.py on one process (about 10 CPU s on the CI machine)


def shared_run(example: str) -> tuple[str, Path]:
    """The session's run of ``docs/examples/<example>`` (tests/docs_examples.py): its stdout, and where it saved."""
    run = run_example(example)
    assert run.proc.returncode == 0, f"{example} failed:\n{run.proc.stdout}\n{run.proc.stderr}"
    return run.proc.stdout, run.out


# ---- Basic Setup: the example's layer, full size --------------------------------------------------


def basic_setup_on_one_process(x: torch.Tensor) -> torch.Tensor:
    """Runs in a one-rank world: the example's layer, seeded as in the example, over the whole sequence."""
    cp_group = mp_pool.group(1)
    torch.manual_seed(0)  # as the example: the same weights
    attention = ContextParallelAttention(hidden_size=4096, num_heads=32, cp_group=cp_group, causal=True)
    with torch.no_grad():
        return attention(x)


def test_layer_full_size_matches_one_process() -> None:
    out, saved_in = shared_run("layer_full_size.py")
    assert sorted(re.findall(r"rank (\d): x_local \(1, 16, 4096\) -> output \(1, 16, 4096\)", out)) == list("0123")
    saved = torch.load(saved_in / SAVE["layer_full_size.py"])
    (expected,) = mp_pool.run_on_ranks(1, basic_setup_on_one_process, saved["x"])
    # fp32; the ring merges four key blocks with the log-sum-exp instead of one softmax, so sums
    # of 4096-wide products are taken in another order: ~1e-7 relative per value.
    torch.testing.assert_close(saved["output"], expected, rtol=1e-5, atol=1e-6)


# ---- Complete Training Example: CP x DP vs one process -------------------------------------------


def test_training_loop_cp_x_dp_matches_one_process(tmp_path: Path) -> None:
    out, saved_in = shared_run("training_loop.py")
    assert "on each of 4 ranks = dp 2 x cp 2" in out
    one = [sys.executable, EXAMPLES / "training_loop.py", "--cp-size", "1", "--save", tmp_path / "one.pt"]
    proc = work_limits.run(one, cpu_s=ONE_PROCESS_CPU_S, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    sharded, single = torch.load(saved_in / SAVE["training_loop.py"]), torch.load(tmp_path / "one.pt")
    assert len(sharded["losses"]) == len(single["losses"]) == 5
    # fp32: the global-mean loss is the same sum taken in another order (per shard, then all-reduced).
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)
    assert single["losses"][-1] < single["losses"][0] - 0.5  # it trains: the answers' values are learnt first
    for name, expected in single["params"].items():
        # Adam divides each gradient element by its running magnitude, which magnifies fp32 summation
        # noise in near-zero elements; 5 steps move a weight by at most 5 * lr = 5e-3.
        torch.testing.assert_close(sharded["params"][name], expected, rtol=0, atol=2e-4, msg=name)


# ---- Memory Estimation --------------------------------------------------------------------------


def test_memory_estimate_prints_the_estimators_numbers() -> None:
    out, _ = shared_run("memory_estimate.py")
    number = r"([\d,.]+)"
    without, with_cp, saved, reduction, max_len = (
        float(re.search(label + number, out).group(1).replace(",", ""))
        for label in (r"Without CP: ", r"With CP: +", r"Savings: +", r"Reduction: +", r"Max seq len \(theoretical\): ")
    )
    assert abs(saved - (without - with_cp)) <= 0.1 + 1e-9  # each printed to 0.1 GiB
    assert abs(reduction - without / with_cp) <= 0.05 + 1e-3  # printed to 0.1x, from numbers rounded to 0.1 GiB
    assert with_cp < without and 0 < max_len < 1_000_000  # 8-way CP helps, but 1M tokens do not fit 80 GiB


# ---- README: "A first look" --------------------------------------------------------------------------


def readme_blocks() -> list[str]:
    """The ```python blocks of README.md, in order."""
    return re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)


def exec_readme(blocks: list[str]) -> dict[str, torch.Tensor]:
    """Runs in a one-rank world: the README's blocks in one namespace, as a reader pastes them."""
    namespace: dict = {"__name__": "__readme__"}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), namespace)
    return {name: namespace[name] for name in ("q", "k", "v", "out")}


def test_readme_first_look_runs_and_is_full_causal_attention() -> None:
    blocks = readme_blocks()
    assert blocks, "README.md has no ```python block"
    (got,) = mp_pool.run_on_ranks(1, exec_readme, blocks)
    # The README's comment says out == full causal attention; fp32 flash kernel vs fp64 math attention.
    expected = full_attention(*(got[n].double() for n in "qkv"), causal=True)
    torch.testing.assert_close(got["out"].double(), expected, rtol=1e-5, atol=1e-5)
