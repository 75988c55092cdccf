"""The work limits (tests/work_limits.py): a hang and a runaway are ended, with every process they
started; a job slowed down by other work on the machine is not."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from work_limits import LimitExceeded, run

# Starts a grandchild in a session of its own (as torchrun starts its workers), writes its pid, and
# both sleep: a hang, spending no CPU.
HANG = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print(child.pid, flush=True)
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_a_hang_is_ended_as_a_stall_with_its_detached_descendants(tmp_path):
    pid_file = tmp_path / "child.pid"
    start = time.monotonic()
    with pytest.raises(LimitExceeded, match="stalled") as info:
        run([sys.executable, "-c", HANG, pid_file], cpu_s=60, stall_s=3)
    assert time.monotonic() - start < 60  # the stall window, not the budget
    assert "stdout:" in str(info.value)  # the output so far comes with the error
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the grandchild in its own session outlived the limit"


def test_a_runaway_is_ended_at_its_cpu_budget():
    with pytest.raises(LimitExceeded, match="more than its budget of 1"):
        run([sys.executable, "-c", "while True: pass"], cpu_s=1)


def test_a_job_slowed_by_other_work_is_neither_over_budget_nor_stalled():
    """0.2 CPU seconds of work at a low share of the cores (nice 10, two busy loops beside it) take
    seconds of wall time; a wall-clock limit of a second would fire, the work limits do not."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        work = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: pass\nprint('done')"
        proc = run(["nice", "-n", "10", sys.executable, "-c", work], cpu_s=5, stall_s=1)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert proc.returncode == 0 and proc.stdout == "done\n", proc.stderr


def test_the_output_and_exit_status_come_back():
    proc = run([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], cpu_s=10)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")
    assert os.path.basename(proc.args[0]).startswith("python")
