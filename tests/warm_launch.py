"""A ``torchrun --standalone`` or ``python`` command run as forks of a process that imported torch once.

Under ``torchrun`` most of a small example's work is starting: the agent imports torch, and every
rank imports torch and cp_dtensor again, about 2 + 3.5 CPU seconds a rank on the CI machine, most of
what the docs examples cost together (a page's blocks, run by ``python``, pay 3.5 of their ~4). Here
multiprocessing's fork server (a public API) imports them once for the test session
(``mp_pool.CONTEXT``, the rank pool's), and each rank is a fork of it that gets what torchrun's
agent gives a worker:

* the command line read by torchrun's own parser (``torch.distributed.run.get_args_parser``), so a
  flag torchrun does not know fails here too; only ``--standalone`` on one node is taken;
* torchrun's worker environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``,
  ``TORCHELASTIC_*``, ``OMP_NUM_THREADS`` 1 unless set), with a rendezvous store held by the test,
  as torchrun's agent holds it (``TORCHELASTIC_USE_AGENT_STORE=True``);
* the script or module run as ``__main__`` with the arguments, from the given directory, with the
  ``sys.path`` of ``python script.py`` there (the script's directory, ``PYTHONPATH`` of the given
  environment, the interpreter's own paths: nothing of the test's), unbuffered as ``python -u``;
* every rank's stdout and stderr into the same two files, as torchrun's workers share the agent's;
* exit status 1 and the other ranks stopped as soon as one rank fails, as torchrun stops them.

A ``python [-P] script|-m module ...`` command is one such process without torchrun's environment,
with its own exit status.

What the agent itself does (rendezvous across agents, restarts, signal handling) is not replayed
here: the tests that launch ``torchrun`` for real check it (``tests/test_train.py``: one agent of
four ranks, two agents of two ranks).
"""

from __future__ import annotations

import atexit
import ctypes
import io
import json
import os
import runpy
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from mp_pool import CONTEXT, serve_store
from work_limits import POLL_S, STALL_S, LimitExceeded, Processes, Watch

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter that MALLOC_MMAP_THRESHOLD_ sets (malloc.h)


@dataclass
class Launch:
    """What a command starts: ``nproc`` ranks (torchrun's workers) or one plain ``python`` process."""

    nproc: int
    target: str  # a script's path or a module's name
    module: bool
    args: list[str]
    torchrun: bool
    safe_path: bool = False  # python -P: neither the script's directory nor the working directory first


def parse_command(argv: list[str]) -> Launch:
    """``torchrun --standalone ...`` as torchrun's own parser reads it, or ``python [-P] [-u] script|-m module ...``."""
    if argv[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args(argv[1:])
        assert args.standalone and args.nnodes in ("1", "1:1"), f"only torchrun --standalone on one node: {argv}"
        assert not args.no_python and not args.run_path, argv
        return Launch(int(args.nproc_per_node), args.training_script, args.module, args.training_script_args, True)
    assert argv[0] in ("python", sys.executable), argv
    rest, safe_path = list(argv[1:]), False
    while rest[0] in ("-P", "-u"):
        safe_path |= rest.pop(0) == "-P"
    if rest[0] == "-m":
        return Launch(1, rest[1], True, rest[2:], False, safe_path)
    assert not rest[0].startswith("-"), f"unsupported python option {rest[0]}: {argv}"
    return Launch(1, rest[0], False, rest[1:], False, safe_path)


def torchrun_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    """The environment torchrun's agent gives worker ``rank`` (its rendezvous store on ``port``)."""
    return {
        "LOCAL_RANK": str(rank),
        "RANK": str(rank),
        "GROUP_RANK": "0",
        "ROLE_RANK": str(rank),
        "ROLE_NAME": "default",
        "LOCAL_WORLD_SIZE": str(nproc),
        "WORLD_SIZE": str(nproc),
        "GROUP_WORLD_SIZE": "1",
        "ROLE_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCHELASTIC_RUN_ID": "none",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
    }


@cache
def _python_path(executable: str) -> tuple[str, ...]:
    """The interpreter's own ``sys.path`` (no script directory, no ``PYTHONPATH``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import json, sys; print(json.dumps(sys.path[1:]))"
    return tuple(json.loads(subprocess.run([executable, "-c", code], env=env, capture_output=True, check=True).stdout))


def _rank_main(target: str, module: bool, args: list[str], env: dict, cwd: str, path: list[str], out: str, err: str):
    """One rank, in a fork of the server: redirect, take the environment, run ``target`` as ``__main__``."""
    import torch

    for fd, name in ((1, out), (2, err)):
        file = os.open(name, os.O_WRONLY | os.O_APPEND)
        os.dup2(file, fd)
        os.close(file)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)  # python -u
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    os.environ.clear()
    os.environ.update(env)
    if "MALLOC_MMAP_THRESHOLD_" in env:  # glibc reads it as a process starts; the server started without it
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, int(env["MALLOC_MMAP_THRESHOLD_"]))
    os.chdir(cwd)
    if "OMP_NUM_THREADS" in env:  # torch read it when the server imported it
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.path[:] = path
    code = 0
    try:
        if module:
            sys.argv = [target, *args]  # run_module puts the module's file first
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [target, *args]
            runpy.run_path(target, run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if not isinstance(exit_.code, (int, type(None))):
            print(exit_.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what the interpreter runs when a script ends
    os._exit(code)


class WarmJob:
    """A ``torchrun --standalone`` or ``python`` command run as forks of the server, with
    ``work_limits.Job``'s interface."""

    def __init__(self, argv: list[str], *, cpu_s: float, cwd, env: dict, stall_s: float = STALL_S) -> None:
        self.argv = [str(a) for a in argv]
        launch = parse_command(self.argv)
        self._dir = tempfile.TemporaryDirectory(prefix="cp_warm_launch_")
        self._out, self._err = (Path(self._dir.name) / n for n in ("stdout", "stderr"))
        self._out.touch()
        self._err.touch()
        cwd = str(Path(cwd or os.getcwd()).resolve())
        target = launch.target
        if not launch.module and not Path(target).is_absolute():
            target = str(Path(cwd, target))
        first = [] if launch.safe_path else [cwd if launch.module else str(Path(target).parent)]
        pythonpath = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        path = [*first, *pythonpath, *_python_path(sys.executable)]
        self._torchrun = launch.torchrun
        self._store = serve_store() if launch.torchrun else None
        self._procs = []
        for rank in range(launch.nproc):
            rank_env = dict(env)
            if launch.torchrun:
                rank_env.setdefault("OMP_NUM_THREADS", "1")
                rank_env |= torchrun_env(rank, launch.nproc, self._store.port)
            proc = CONTEXT.Process(
                target=_rank_main,
                args=(target, launch.module, launch.args, rank_env, cwd, path, str(self._out), str(self._err)),
            )  # not a daemon: a rank may start processes of its own
            proc.start()
            self._procs.append(proc)
        what = " ".join(self.argv[:6]) + (" ..." if len(self.argv) > 6 else "")
        self.watch = Watch(what, Processes([p.pid for p in self._procs]), cpu_s, stall_s=stall_s)
        self.returncode: int | None = None

    def kill(self) -> None:
        """Stop every rank now (a rank left hanging on purpose); :meth:`result` reads what they wrote."""
        self._stop()
        self.returncode = 1 if self._torchrun else self._procs[0].exitcode

    def _stop(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
            proc.join()

    def poll(self) -> bool:
        """Whether every rank has ended (the others are stopped when one fails); raises at a limit."""
        codes = [p.exitcode for p in self._procs]
        if any(c not in (None, 0) for c in codes) or all(c is not None for c in codes):
            self._stop()
            codes = [p.exitcode for p in self._procs]
            self.returncode = codes[0] if not self._torchrun else int(any(c != 0 for c in codes))
            return True
        try:
            self.watch.check()
        except LimitExceeded as error:
            self.watch.processes.kill()
            self._stop()
            raise LimitExceeded(f"{error}\n{self._tail()}") from None
        return False

    def result(self) -> subprocess.CompletedProcess:
        """The exit status (1 if a rank failed) and the ranks' output."""
        self.watch.log()
        self.watch.processes.kill()
        codes = {rank: p.exitcode for rank, p in enumerate(self._procs) if p.exitcode != 0}
        err = self._err.read_text(errors="replace")
        if codes and self._torchrun:  # torchrun's summary names the failed ranks the same way
            err += f"\n{self.argv[0]}: ranks failed (rank: exit code): {codes}\n"
        out = self._out.read_text(errors="replace")
        self._store = None
        self._dir.cleanup()
        return subprocess.CompletedProcess(self.argv, self.returncode, out, err)

    def wait(self) -> subprocess.CompletedProcess:
        while not self.poll():
            time.sleep(POLL_S)
        return self.result()

    def _tail(self) -> str:
        return f"stdout:\n{self._out.read_text()[-3000:]}\nstderr:\n{self._err.read_text()[-3000:]}"


def run(command: str | list[str], *, cpu_s: float, cwd=None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a ``torchrun --standalone`` or ``python`` command as :class:`WarmJob` (``work_limits.run``'s interface)."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    return WarmJob(argv, cpu_s=cpu_s, cwd=cwd, env=dict(os.environ if env is None else env)).wait()
