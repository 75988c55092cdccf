"""The style checks: ``ruff check`` and ``ruff format --check`` over the tree, as pyproject.toml configures them.

A test, so that the README's test command runs them too. ruff comes with the ``docs`` extra, pinned
(its formatting moves between releases); the test fails, rather than skips, without it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import work_limits

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff(args: list[str]) -> None:
    proc = work_limits.run([sys.executable, "-m", "ruff", *args], cpu_s=60, cwd=REPO)  # work, not wall time
    if "No module named ruff" in proc.stderr:
        pytest.fail('ruff is not installed: pip install -e ".[docs]" (it pins the version CI uses)')
    assert proc.returncode == 0, f"ruff {' '.join(args)} (fix: ruff check --fix . && ruff format .):\n{proc.stdout}"
