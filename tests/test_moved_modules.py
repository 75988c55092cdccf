"""Modules that moved stay importable from their old paths for one release, with a warning."""

import importlib
import subprocess
import sys

import pytest

from cp_dtensor._moved import MOVED


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()))
def test_old_path_is_the_moved_module_and_warns(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_old_job_command_runs_the_job():
    proc = subprocess.run(
        [sys.executable, "-m", "cp_dtensor.train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "--grad-sync" in proc.stdout and "moved to -m cp_dtensor.training" in proc.stderr
