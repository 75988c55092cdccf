"""The registry of groups by key, which compiled attention uses to find its group (one process, a world of one)."""

from __future__ import annotations

import sys
from pathlib import Path

import work_limits

REPO = Path(__file__).resolve().parents[1]


def test_a_group_key_lives_as_long_as_any_copy_and_no_longer():
    # Compiled graphs name their group by key: a copy made by with_layout keeps the key alive after
    # the original is gone, and the registry forgets keys whose groups are all gone (it stays bounded).
    code = """
import gc
from cp_dtensor import init_context_parallel_group
from cp_dtensor.mesh import group as g
copy = init_context_parallel_group(1).with_layout("contiguous")  # the original is dropped at once
gc.collect()
assert g.ContextParallelGroup.from_key(copy.key).mesh is copy.mesh
key = copy.key
del copy
gc.collect()
init_context_parallel_group(1)  # registering prunes what is gone
assert key not in g._GROUPS, g._GROUPS
try:
    g.ContextParallelGroup.from_key(key)
except ValueError as e:
    assert "No live ContextParallelGroup" in str(e)
else:
    raise AssertionError("a dead key resolved")
print("ok")
"""
    out = work_limits.run([sys.executable, "-c", code], cpu_s=60, cwd=REPO / "docs")  # work, not wall time
    assert out.stdout.strip() == "ok", out.stdout + out.stderr
