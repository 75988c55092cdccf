"""The package a user installs.

* ``test_torch_version_*``: ``import cp_dtensor`` refuses a torch older than the tested one, naming it;
  ``test_torch_floor_is_one_number``: pyproject.toml, README.md and the check agree on that floor.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cp_dtensor._torch_version import MIN_TORCH, check_torch_version

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("version", ["2.13.0", "2.13.0+cpu", "2.13.0a0+git1234", "2.14.1", "3.0.0"])
def test_torch_version_at_or_above_the_floor_passes(version: str) -> None:
    check_torch_version(version)


@pytest.mark.parametrize("version", ["2.5.1", "2.12.1+cu121", "1.13.1", "nightly"])
def test_torch_version_below_the_floor_names_the_needed_one(version: str) -> None:
    with pytest.raises(ImportError, match=re.escape(f"cp_dtensor needs torch >= 2.13 (found {version})")):
        check_torch_version(version)


def test_torch_version_is_checked_at_import() -> None:
    """``import cp_dtensor`` under an old torch raises the ImportError, before any other module runs."""
    code = "import torch; torch.__version__ = '2.5.1'; import cp_dtensor"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ImportError: cp_dtensor needs torch >= 2.13 (found 2.5.1)" in proc.stderr, proc.stderr


def test_torch_floor_is_one_number() -> None:
    """The floor the import checks is the one pyproject.toml requires and README.md states."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    floor = ".".join(map(str, MIN_TORCH))
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch>={floor}" in dependencies
    assert f"needs torch >= {floor}" in (REPO / "README.md").read_text()
