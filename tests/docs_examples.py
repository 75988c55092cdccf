"""Each ``docs/examples`` file run once per test session, as a reader runs it, for every test that checks it.

``tests/test_docs.py::test_example`` checks that each example runs and prints what its page shows;
``tests/test_seed_examples.py`` and ``tests/test_strategies.py`` check the numbers of some of them
against one process. They all read the same run: the command of the example's docstring (the line
starting ``torchrun`` or ``python``), from an empty directory, with only installed packages importable
(no ``PYTHONPATH``), plus the arguments of ``SAVE`` that make it write its results to a file.

A ``torchrun --standalone`` command runs its ranks as forks of a process that has imported torch
(``tests/warm_launch.py``: torchrun's parser and worker environment, without paying each rank's
start-up again, most of what the examples cost); a ``python`` command runs as it is.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import warm_launch
import work_limits

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "docs" / "examples"

# Examples whose results a test compares with one process: rank 0 writes them to this file (in ``out``).
SAVE = {"layer_full_size.py": "layer_full_size.pt", "training_loop.py": "training_loop.pt"}
# Work budget of one example run (all its ranks together). The largest, train_3d.py on 8 ranks, spends
# about 60 CPU seconds on the 2-core CI machine (CP_TEST_WORK_LOG, see tests/work_limits.py).
CPU_S = 400


@dataclass
class ExampleRun:
    """One run of an example: the finished process and the directory its saved results are in."""

    proc: subprocess.CompletedProcess
    out: Path


def example_command(path: Path) -> list[str]:
    """The run command written in an example's docstring, split as a shell splits it."""
    text = path.read_text()
    doc = re.match(r'\s*(?:#.*\n\s*)*"""(.*?)"""', text, re.S)
    assert doc, f"{path.name}: needs a module docstring with the command that runs it"
    lines = [ln.strip() for ln in doc[1].splitlines()]
    cmd = next((ln for ln in lines if ln.startswith(("torchrun ", "python "))), None)
    assert cmd, f"{path.name}: its docstring must contain a line starting 'torchrun ' or 'python '"
    return shlex.split(cmd)


@cache
def _examples_dir() -> tempfile.TemporaryDirectory:
    """Where the examples run, made by the first run and removed as the test session ends.

    Made on first use, not at import: the rank pool's workers import this module too (a task of
    ``tests/test_strategies.py``), and a worker ends with ``os._exit``, which skips the finalizer that
    removes a ``TemporaryDirectory``; each of them left an empty ``cp_docs_examples_*`` behind.
    """
    return tempfile.TemporaryDirectory(prefix="cp_docs_examples_")


@cache
def run_example(name: str) -> ExampleRun:
    """Run ``docs/examples/<name>`` once (later calls return the same run); see the module docstring."""
    path = EXAMPLES / name
    root = Path(_examples_dir().name)
    cwd, out = root / name / "cwd", root / name / "out"
    cwd.mkdir(parents=True)
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MPLBACKEND"] = "Agg"
    argv = [str(REPO / a) if a.endswith(".py") and (REPO / a).is_file() else a for a in example_command(path)]
    if name in SAVE:
        argv += ["--save", str(out / SAVE[name])]
    if argv[0] == "torchrun":
        return ExampleRun(warm_launch.run(argv, cpu_s=CPU_S, cwd=cwd, env=env), out)
    return ExampleRun(work_limits.run([sys.executable, *argv[1:]], cpu_s=CPU_S, cwd=cwd, env=env), out)
