"""Limits on the work of a test's processes, in CPU seconds, instead of wall-clock timeouts.

A limit is there to end a hang or a runaway. A wall-clock limit also ends a test whose machine is
busy: on 2 cores shared with two other jobs the same work takes 2-3 times as long, at a load of 30
ten times, and a limit picked on an idle machine fires although nothing is wrong. So the limits here
count what does not change with the load, the work:

* **Work.** The CPU seconds the processes spend (user and system, every thread, every descendant:
  torchrun's workers too). A unit of work gets a budget, what it needs on the CI machine with a
  margin; spending more is a runaway.
* **Stall.** A hang spends no CPU, so it never exhausts a budget. It shows instead as no thread of the
  processes running or waiting for a core: every one of them asleep, on a socket, a lock or a timer.
  Work in progress is running or runnable almost all the time, and the busier the machine the longer
  it waits runnable, so a busy machine makes it look less stalled, not more. The processes stall when
  fewer than ``STALL_FRACTION`` of the samples over the last ``STALL_S`` seconds found one of their
  threads running or runnable (a sleeping process still wakes now and then, e.g. torchrun's monitor).
  ``STALL_S`` is longer than any wait a test makes on purpose (a gloo group timeout of the rank
  pool, ``mp_pool.GROUP_TIMEOUT_S``), so those end by themselves, with their own error, first.

A process and all its descendants form one unit, followed across re-parenting (torchrun starts each
worker in its own session, so a process group would not hold them), and all of it is killed when a
limit is hit: nothing a test starts outlives it. ``CP_TEST_WORK_LOG=<file>`` appends each unit's CPU
and wall seconds to a file, as JSON lines, to size budgets from.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path

STALL_S = float(os.environ.get("CP_TEST_STALL_S", "90"))  # above mp_pool.GROUP_TIMEOUT_S (60)
STALL_FRACTION = 0.1
POLL_S = 0.5
MIN_SAMPLES = 5  # to decide on a stall (the poller itself may be slowed down by the load)
_TICK = os.sysconf("SC_CLK_TCK")


class LimitExceeded(TimeoutError):
    """A unit of work spent more than its CPU budget, or stalled."""


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (field 3, state, first), or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _cpu_s(fields: list[str]) -> float:
    """utime + stime + cutime + cstime (the process and its reaped children), in seconds."""
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / _TICK


def _busy(pid: int) -> bool:
    """Whether a thread of ``pid`` is running, runnable or in uninterruptible I/O."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        fields = _stat_task(pid, tid)
        if fields and fields[0] in "RD":
            return True
    return False


def _stat_task(pid: int, tid: str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


class Processes:
    """Processes watched as one unit: some roots and every descendant they start, even re-parented."""

    def __init__(self, roots: Iterable[int] = (), *, descendants: bool = True) -> None:
        self._descendants = descendants
        self._known: dict[int, str] = {}  # pid -> start time (field 22): a pid the OS reuses is not ours
        for pid in roots:
            self.add(pid)

    def add(self, pid: int) -> None:
        fields = _stat(pid)
        if fields is not None:
            self._known[pid] = fields[19]

    def alive(self) -> dict[int, list[str]]:
        """Every process of the unit still there (zombies included), with its stat fields; finds new descendants."""
        found = {}
        if self._descendants:
            children: dict[int, list[tuple[int, list[str]]]] = {}
            for entry in os.listdir("/proc"):
                fields = _stat(int(entry)) if entry.isdigit() else None
                if fields is not None:
                    children.setdefault(int(fields[1]), []).append((int(entry), fields))
            frontier = [pid for pid, start in self._known.items() if (_stat(pid) or [None] * 20)[19] == start]
            while frontier:
                pid = frontier.pop()
                for child, fields in children.get(pid, []):
                    if self._known.setdefault(child, fields[19]) == fields[19] and child not in found:
                        found[child] = fields
                        frontier.append(child)
        for pid, start in self._known.items():  # re-parented ones too (their parent died)
            if pid not in found:
                fields = _stat(pid)
                if fields is not None and fields[19] == start:
                    found[pid] = fields
        return found

    def kill(self) -> None:
        """SIGKILL every process of the unit."""
        for pid in self.alive():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


class Watch:
    """Checks a unit of work against its CPU budget and the stall rule; see the module docstring.

    Args:
        what: Names the work in the error.
        processes: The unit.
        cpu_s: The budget: CPU seconds the unit may spend from now on (all its processes together).
        stall_s: The stall window (``STALL_S``).
    """

    def __init__(self, what: str, processes: Processes, cpu_s: float, *, stall_s: float = STALL_S) -> None:
        self.what, self.processes, self.cpu_s, self.stall_s = what, processes, cpu_s, stall_s
        self.start = time.monotonic()
        self._base = self._spent = 0.0
        self._base = self._total()
        self._samples: deque[tuple[float, bool]] = deque()

    def _total(self) -> float:
        self._procs = self.processes.alive()
        return sum(_cpu_s(fields) for fields in self._procs.values())

    def spent(self) -> float:
        """CPU seconds the unit has spent since the watch began (never decreasing)."""
        self._spent = max(self._spent, self._total() - self._base)
        return self._spent

    def check(self) -> None:
        """Raise :class:`LimitExceeded` if the unit is over its budget or stalled."""
        now, spent = time.monotonic(), self.spent()
        if spent > self.cpu_s:
            raise LimitExceeded(f"{self.what}: spent {spent:.0f} CPU s, more than its budget of {self.cpu_s:g}")
        self._samples.append((now, any(_busy(pid) for pid in self._procs)))
        while self._samples and self._samples[0][0] < now - self.stall_s:
            self._samples.popleft()
        if now - self.start >= self.stall_s and len(self._samples) >= MIN_SAMPLES:
            busy = sum(b for _, b in self._samples) / len(self._samples)
            if busy < STALL_FRACTION:
                raise LimitExceeded(
                    f"{self.what}: stalled, no thread running or runnable in {100 * (1 - busy):.0f}% of the "
                    f"last {self.stall_s:g} s (a hang; {spent:.0f} of {self.cpu_s:g} CPU s spent)"
                )

    def log(self) -> None:
        """Append this unit's CPU and wall seconds to ``$CP_TEST_WORK_LOG`` (if set)."""
        path = os.environ.get("CP_TEST_WORK_LOG")
        if path:
            entry = {
                "test": os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0],
                "what": self.what,
                "cpu_s": round(self.spent(), 2),
                "wall_s": round(time.monotonic() - self.start, 2),
                "budget_cpu_s": self.cpu_s,
            }
            with open(path, "a") as f:
                f.write(json.dumps(entry) + "\n")


class Job:
    """A command started under a work budget, its output kept in temporary files."""

    def __init__(self, argv: list, *, cpu_s: float, cwd=None, env=None, stall_s: float = STALL_S) -> None:
        self.argv = [str(a) for a in argv]
        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.argv, cwd=cwd, env=env, stdout=self._out, stderr=self._err)
        what = " ".join(self.argv[:6]) + (" ..." if len(self.argv) > 6 else "")
        self.watch = Watch(what, Processes([self.proc.pid]), cpu_s, stall_s=stall_s)

    def poll(self) -> bool:
        """Whether the command has ended; raises :class:`LimitExceeded` (killing it all) at a limit."""
        if self.proc.poll() is not None:
            return True
        try:
            self.watch.check()
        except LimitExceeded as error:
            self.watch.processes.kill()
            self.proc.wait()
            raise LimitExceeded(f"{error}\n{self._tail()}") from None
        return False

    def result(self) -> subprocess.CompletedProcess:
        """The ended command's exit status and output; kills anything it left running."""
        self.watch.log()
        self.watch.processes.kill()
        out, err = (self._read(f) for f in (self._out, self._err))
        return subprocess.CompletedProcess(self.argv, self.proc.returncode, out, err)

    def wait(self) -> subprocess.CompletedProcess:
        """Wait for the command to end (or a limit); return :meth:`result`."""
        while not self.poll():
            time.sleep(POLL_S)
        return self.result()

    @staticmethod
    def _read(f) -> str:
        f.seek(0)
        return f.read().decode(errors="replace")

    def _tail(self) -> str:
        return f"stdout:\n{self._read(self._out)[-3000:]}\nstderr:\n{self._read(self._err)[-3000:]}"


def run(argv: list, *, cpu_s: float, cwd=None, env=None, stall_s: float = STALL_S) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, text=True)`` under a work budget of ``cpu_s`` CPU seconds.

    Raises:
        LimitExceeded: The command and its descendants spent more than ``cpu_s`` or stalled; all of
            them were killed. The message ends with the output so far.
    """
    return Job(argv, cpu_s=cpu_s, cwd=cwd, env=env, stall_s=stall_s).wait()


def wait_all(jobs: dict[str, Job]) -> dict[str, subprocess.CompletedProcess | LimitExceeded]:
    """Wait for jobs running side by side; each ends with its result or the limit it hit."""
    results: dict[str, subprocess.CompletedProcess | LimitExceeded] = {}
    while len(results) < len(jobs):
        for name, job in jobs.items():
            if name in results:
                continue
            try:
                if job.poll():
                    results[name] = job.result()
            except LimitExceeded as error:
                results[name] = error
        time.sleep(POLL_S)
    return results
