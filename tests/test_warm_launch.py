"""tests/warm_launch.py: a torchrun or python command run as forks of the preloaded server behaves as
torchrun and python would for what the tests read: environment, path, output, exit status."""

from __future__ import annotations

import json
import sys

import pytest
from warm_launch import WarmJob, run

RANK_SCRIPT = """
import json, os, sys
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE", "OMP_NUM_THREADS")
print(json.dumps({"env": {k: os.environ.get(k) for k in keys}, "argv": sys.argv[1:], "path0": sys.path[0],
                  "cwd": os.getcwd(), "name": __name__}), flush=True)
if os.environ.get("RANK") == "1" and "--fail" in sys.argv:
    sys.exit(3)
if "--fail" in sys.argv:
    import time
    time.sleep(600)  # stopped by the launcher once rank 1 failed, as torchrun stops the others
"""


def test_torchrun_ranks_get_torchruns_environment_and_the_scripts_path(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = run(["torchrun", "--standalone", "--nproc-per-node=2", str(script), "--x", "1"], cpu_s=60, cwd=cwd, env={})
    assert proc.returncode == 0, proc.stderr
    ranks = sorted((json.loads(line) for line in proc.stdout.splitlines()), key=lambda r: r["env"]["RANK"])
    for rank, r in enumerate(ranks):
        assert r["env"] == {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "OMP_NUM_THREADS": "1",
        }
        assert (r["argv"], r["path0"], r["cwd"], r["name"]) == (["--x", "1"], str(tmp_path), str(cwd), "__main__")


def test_a_failed_rank_fails_the_launch_and_stops_the_others(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    proc = run(
        ["torchrun", "--standalone", "--nproc-per-node=2", str(script), "--fail"], cpu_s=60, cwd=tmp_path, env={}
    )
    assert proc.returncode == 1 and "1: 3" in proc.stderr, proc.stderr


def test_a_python_command_keeps_its_exit_status_and_P_keeps_the_script_directory_off_the_path(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT + "\nsys.exit(5)\n")
    proc = run([sys.executable, "-P", str(script)], cpu_s=60, cwd=tmp_path, env={})
    assert proc.returncode == 5
    assert json.loads(proc.stdout)["path0"] != str(tmp_path) and json.loads(proc.stdout)["env"]["RANK"] is None


def test_a_flag_torchrun_does_not_know_fails_as_in_torchrun():
    with pytest.raises(SystemExit):
        WarmJob(["torchrun", "--standalone", "--no-such-flag", "x.py"], cpu_s=10, cwd=None, env={})
