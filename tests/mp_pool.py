"""A pool of real gloo ranks kept alive for the whole test session.

Starting a process group costs seconds, so each world size gets one pool of ``P`` processes with
``torch.distributed`` initialised once. They are forks of multiprocessing's fork server, which
imports torch and cp_dtensor once for the session (``PRELOAD``): a spawned rank spent about 3.5 CPU
seconds importing them (``tests/warm_launch.py`` forks the ranks of the docs examples from it too).
A test sends a task (a module-level function and its arguments, identical on every rank) and
receives every rank's return value. Every task runs under a limit on its work, in CPU seconds, and
the stall rule of ``tests/work_limits.py`` (no rank running or runnable): a hang or a runaway fails
the test instead of blocking CI, a busy machine does not, and a pool that hit a limit or failed is
torn down and replaced, so one broken case never poisons the next.

Errors: when a rank raises, the test fails with THAT rank's traceback first (the first failure to
arrive), followed by whatever the other ranks reported within a short grace period (often only a
consequence, e.g. a timeout waiting for the failed rank). Every process group of a worker, the
default one and those :func:`group` builds for its mesh axes, has a short timeout
(``CP_TEST_GROUP_TIMEOUT``, seconds), shorter than a task's, so a rank stuck in a collective raises
and reports where it was instead of being killed silently.

State: a worker runs many tests one after the other. After every task it compares the library's
module-level settings (upper-case names of ``cp_dtensor`` modules, e.g. ``masks.DEFAULT_TILE``) and
torch's global defaults with their values before the task, and fails the task that changed one
without restoring it (use a context manager such as ``helpers.default_tile``).

How to write a multi-rank test: see ``tests/helpers.py``.
"""

from __future__ import annotations

import datetime
import importlib
import io
import os
import queue
import time
import traceback
from dataclasses import replace
from functools import cache

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from work_limits import LimitExceeded, Processes, Watch

# A task's work limit: CPU seconds per rank (the ranks together may spend world_size times this). The
# tests' tasks spend well under 10 each on the CI machine; a hang is caught by the stall rule instead.
DEFAULT_TIMEOUT_S = float(os.environ.get("CP_TEST_TIMEOUT", "120"))
GROUP_TIMEOUT_S = float(os.environ.get("CP_TEST_GROUP_TIMEOUT", "60"))  # below work_limits.STALL_S
GRACE_S = 3.0  # after a rank fails, how long to wait for the others' reports
# What the fork server imports before it forks a rank: what every rank imports first. It holds no
# thread, lock or process group when it forks (a plain ``fork`` of this process would copy this
# test process's threads' locks); each rank then starts its own.
PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "cp_dtensor"]
CONTEXT = mp.get_context("forkserver")
CONTEXT.set_forkserver_preload(PRELOAD)


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def serve_store() -> dist.TCPStore:
    """A rendezvous store held by this process, on a port the OS picks as it binds.

    Picking a free port, releasing it and letting rank 0 bind it later races with every process
    that binds a port meanwhile (an EADDRINUSE in CI, with several worlds starting at once).
    torchrun avoids the race the same way: its agent holds the store and every rank connects to it
    as a client, which ``TORCHELASTIC_USE_AGENT_STORE=True`` asks of ``env://`` initialisation.
    """
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
        TORCHELASTIC_USE_AGENT_STORE="True",
    )
    torch.set_num_threads(1)
    _share_one_gloo_device()
    timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    while True:
        item = tasks.get()
        if item is None:
            break
        name, args, kwargs = _loads(item)
        module, _, qualname = name.partition(":")
        before = _global_settings()
        try:
            fn = getattr(importlib.import_module(module), qualname)
            answer = (rank, True, _dumps(fn(*args, **kwargs)))
        except BaseException:  # report everything, including assertion errors, to the test
            answer = (rank, False, traceback.format_exc())
        leaked = _changed_settings(before)
        if leaked and answer[1]:
            answer = (
                rank,
                False,
                f"{name} changed global state and did not restore it: {leaked}. "
                "Change it inside a context manager (see tests/helpers.py).",
            )
        results.put(answer)
    dist.destroy_process_group()


def _share_one_gloo_device() -> None:
    """Every gloo process group this worker makes uses one gloo device, so one network loop thread.

    By default each group gets a device of its own, and each device a loop thread that wakes about
    100 times a second even when idle. A worker lives for the session and keeps the groups of every
    mesh its tests built: in a full run under load 18 idle workers held 580 such threads (92 in each
    rank of the 4-rank pool), the machine made ~105,000 context switches a second (487 once they
    were gone), and a torchrun launch beside two busy loops got 0-20 CPU ticks per 10 s for 20
    minutes. One device serves any number of groups (gloo keeps a context per group on it).
    """
    from torch.distributed import ProcessGroupGloo, distributed_c10d

    device = ProcessGroupGloo.create_default_device()

    class OneDeviceGloo(ProcessGroupGloo):
        def __init__(self, store, rank: int, size: int, timeout: datetime.timedelta) -> None:
            options = ProcessGroupGloo._Options()
            options._devices = [device]
            options._timeout = timeout
            super().__init__(store, rank, size, options)

    distributed_c10d.ProcessGroupGloo = OneDeviceGloo  # what new_group and init_process_group construct


def _global_settings() -> dict[str, object]:
    """Module-level settings a task could leave changed: cp_dtensor's upper-case names, torch's defaults."""
    import sys

    found = {
        "torch.get_default_dtype()": torch.get_default_dtype(),
        "torch.is_grad_enabled()": torch.is_grad_enabled(),
        "torch.are_deterministic_algorithms_enabled()": torch.are_deterministic_algorithms_enabled(),
    }
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name == "cp_dtensor" or mod_name.startswith("cp_dtensor.")):
            continue
        for attr, value in vars(mod).items():
            if attr.isupper() and isinstance(value, (int, float, str, bool, tuple, type(None))):
                found[f"{mod_name}.{attr}"] = value
    return found


def _changed_settings(before: dict[str, object]) -> dict[str, tuple[object, object]]:
    """Settings whose value differs from ``before`` (names that appeared since, by import, do not count)."""
    after = _global_settings()
    return {k: (v, after[k]) for k, v in before.items() if k in after and after[k] != v}


class RankPool:
    """``world_size`` gloo ranks (forks of the preloaded server) that run tasks on request."""

    def __init__(self, world_size: int) -> None:
        ctx = CONTEXT
        self.world_size = world_size
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        self._store = serve_store()  # held for the pool's life: the ranks' rendezvous
        self._procs = [
            ctx.Process(
                target=_worker, args=(r, world_size, self._store.port, self._tasks[r], self._results), daemon=True
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn, *args, timeout: float = DEFAULT_TIMEOUT_S, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results in rank order.

        ``timeout`` is the task's work limit: CPU seconds per rank (see ``tests/work_limits.py``).

        Raises:
            RuntimeError: A rank raised (its traceback is in the message).
            TimeoutError: The ranks spent more than ``timeout`` CPU seconds each, or stalled.
        """
        payload = _dumps((f"{fn.__module__}:{fn.__qualname__}", args, kwargs))
        watch = Watch(fn.__qualname__, Processes(self._pids(), descendants=False), timeout * self.world_size)
        for q in self._tasks:
            q.put(payload)
        answers: dict[int, tuple[bool, object]] = {}
        failures: list[tuple[int, str]] = []  # in order of arrival: the first is the real one
        limit = None
        while len(answers) < self.world_size:
            if failures and time.monotonic() > failures[0][2] + GRACE_S:
                break  # the others may be stuck waiting on the failed rank: do not wait for them long
            try:
                rank, ok, data = self._results.get(timeout=0.5)
            except queue.Empty:
                try:
                    watch.check()
                except LimitExceeded as error:
                    limit = error
                    break
                continue
            answers[rank] = (ok, data)
            if not ok:
                failures.append((rank, data, time.monotonic()))
        missing = sorted(set(range(self.world_size)) - set(answers))
        if failures:
            first_rank, first_tb, _ = failures[0]
            parts = [f"{fn.__qualname__}: rank {first_rank} failed first:\n{first_tb}"]
            parts += [f"then rank {r} failed:\n{tb}" for r, tb, _ in failures[1:]]
            if missing:
                parts.append(f"(no answer from ranks {missing}: probably waiting on rank {first_rank})")
            raise RuntimeError("\n".join(parts))
        if missing:
            raise TimeoutError(f"{limit}; ranks {missing} did not finish (ranks {sorted(answers)} did)")
        watch.log()
        return [_loads(answers[r][1]) for r in range(self.world_size)]

    def _pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def close(self) -> None:
        """Stop the workers (kill them if they do not stop in a few seconds)."""
        for q in self._tasks:
            try:
                q.put(None)
            except Exception:
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


_POOLS: dict[int, RankPool] = {}


def run_on_ranks(world_size: int, fn, *args, timeout: float = DEFAULT_TIMEOUT_S, **kwargs) -> list:
    """Run ``fn`` on a (cached) pool of ``world_size`` gloo ranks; replace the pool if the task fails."""
    pool = _POOLS.get(world_size)
    if pool is None:
        pool = _POOLS[world_size] = RankPool(world_size)
    try:
        return pool.run(fn, *args, timeout=timeout, **kwargs)
    except BaseException:
        # A failed or hung task may leave ranks out of step: start afresh next time.
        _POOLS.pop(world_size, None)
        pool.close()
        raise


def close_all() -> None:
    """Stop every pool (called at the end of the test session)."""
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


# ---- helpers for code running INSIDE a worker -------------------------------------------------


@cache
def _cached_group(cp_size: int, dp_size: int | None, extra: tuple):
    from cp_dtensor import init_context_parallel_group

    options = {"timeout": GROUP_TIMEOUT_S, **dict(extra)}  # a test may ask for another timeout
    return init_context_parallel_group(cp_size, dp_size=dp_size, **options)


def group(cp_size: int, *, layout: str = "zigzag", dp_size: int | None = None, **extra):
    """A cached ``ContextParallelGroup`` for this worker (meshes are built once per shape).

    Every process group of its mesh (sub-groups included) times out after ``GROUP_TIMEOUT_S`` unless
    ``extra`` names another ``timeout``; ``extra`` goes to ``init_context_parallel_group``.
    """
    return replace(_cached_group(cp_size, dp_size, tuple(sorted(extra.items()))), layout=layout)
