"""What every benchmark shares: one thread per rank, seeded inputs by shard, timers, statistics, JSON.

Inputs are generated in chunks of ``GEN_CHUNK`` tokens, each from its own seed, so a rank can build
exactly its shard (any runs of global positions) without materialising the whole sequence, and a
single process can build the whole sequence that is bit-identical to the concatenated shards.

Legend: ``B`` batch, ``H`` heads, ``S`` sequence length, ``D`` head dim.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
GEN_CHUNK = 256  # tokens per independently seeded piece of an input tensor
TENSOR_IDS = {"q": 0, "k": 1, "v": 2, "dout": 3}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

Run = tuple[int, int]  # (global start position, number of tokens)


_LOAD_AT_START: list[tuple[float, float, float]] = []


def init_rank() -> None:
    """One thread per rank (the benches' rule) and the default process group from torchrun's env."""
    _LOAD_AT_START.append(os.getloadavg())
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if not dist.is_initialized() and "RANK" in os.environ:
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))


def finish() -> None:
    """Wait for every rank, then tear the process groups down (the peers' extra groups included), so
    no communication thread is still running when the interpreter exits."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """World size (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def log(*args: object) -> None:
    """Print on rank 0 only, flushed (torchrun interleaves the ranks' output)."""
    if rank() == 0:
        print(*args, flush=True)


def barrier() -> None:
    """Barrier when distributed; no-op in one process."""
    if dist.is_initialized():
        dist.barrier()


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------- inputs
def make_tensor(
    name: str, shape: tuple[int, int, int, int], runs: Sequence[Run], *, seed: int, dtype: torch.dtype
) -> torch.Tensor:
    """Tensor ``name`` of global shape ``(B, H, S, D)`` restricted to ``runs`` of positions (dim 2).

    Args:
        name: ``"q"``, ``"k"``, ``"v"`` or ``"dout"`` (each its own stream of numbers).
        shape: Global shape ``(B, H, S, D)``.
        runs: Runs ``(start, length)`` of positions to keep, in the order to store them.
        seed: Base seed; the same seed gives the same global tensor on every rank.
        dtype: Dtype of the result (numbers are drawn in fp32, then cast).

    Returns:
        ``(B, H, sum(lengths), D)``, unit-normal.
    """
    b, h, s, d = shape
    pieces = []
    for start, length in runs:
        assert 0 <= start and start + length <= s, (start, length, s)
        first, last = start // GEN_CHUNK, (start + length - 1) // GEN_CHUNK
        chunks = []
        for c in range(first, last + 1):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + TENSOR_IDS[name] * 100_003 + c)
            chunks.append(torch.randn(b, h, min(GEN_CHUNK, s - c * GEN_CHUNK), d, generator=gen))
        block = torch.cat(chunks, dim=2) if len(chunks) > 1 else chunks[0]
        offset = start - first * GEN_CHUNK
        pieces.append(block[:, :, offset : offset + length])
    return torch.cat(pieces, dim=2).to(dtype).contiguous()


def make_inputs(
    shape: tuple[int, int, int, int], runs: Sequence[Run], *, seed: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """``q``, ``k``, ``v`` and the output gradient ``dout`` over ``runs`` (see :func:`make_tensor`)."""
    return {name: make_tensor(name, shape, runs, seed=seed, dtype=dtype) for name in TENSOR_IDS}


def scatter_runs(full: torch.Tensor, runs: Sequence[Run], seq_dim: int = 2) -> torch.Tensor:
    """The rows of ``full`` at ``runs`` (a rank's shard of a global tensor)."""
    return torch.cat([full.narrow(seq_dim, s, n) for s, n in runs], dim=seq_dim)


# ----------------------------------------------------------------------------------------- timing
class Stopwatch:
    """CPU seconds of this process (all threads, user + system) and wall seconds, from creation."""

    def __init__(self) -> None:
        self.cpu0, self.wall0, self.thread0 = time.process_time(), time.perf_counter(), time.thread_time()

    def lap(self) -> tuple[float, float]:
        """``(cpu_seconds, wall_seconds)`` since creation."""
        return time.process_time() - self.cpu0, time.perf_counter() - self.wall0

    def thread(self) -> float:
        """CPU seconds of the calling thread alone since creation (the rest of the process's CPU
        seconds are other threads': gloo's communication threads)."""
        return time.thread_time() - self.thread0


def summary(values: Sequence[float]) -> dict[str, float]:
    """``min`` / ``median`` / ``max`` / ``n`` of ``values``."""
    vals = [float(v) for v in values]
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals)}


# ----------------------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakRSS:
    """Peak resident memory of this process during a ``with`` block, above its RSS at the start.

    Resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``) on entry and reads
    ``VmHWM`` on exit, so several measurements can alternate in one process. Run under
    ``MALLOC_MMAP_THRESHOLD_=131072`` so that freed tensors go back to the kernel (glibc would
    otherwise keep them and the next block would reuse pages it never counts).

    The peak is never below the RSS at the start, which the block held. ``VmHWM`` alone can read
    lower: the kernel resets and raises the high-water mark from its per-CPU RSS counters without
    summing them (``get_mm_rss``: off by up to 32 pages per CPU), while ``VmRSS`` is the exact sum
    (Linux >= 6.16). A block that allocates less than that, and frees memory it found, then read a
    negative peak, more often on a busy machine (the process moves between CPUs, each keeps a part).
    """

    def __enter__(self) -> PeakRSS:
        gc_collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.start_bytes = _status_kb("VmRSS") * 1024
        self.peak_bytes = 0
        return self

    def __exit__(self, *exc) -> None:
        self.peak_bytes = max(_status_kb("VmHWM") * 1024 - self.start_bytes, 0)


def gc_collect() -> None:
    """Free unreachable tensors before a memory measurement."""
    import gc

    gc.collect()


# ------------------------------------------------------------------------------- machine, results
def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, object]:
    """The machine and software a result was measured on."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": mem_gb,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads_per_rank": torch.get_num_threads(),
        "load_average_at_start": _LOAD_AT_START[0] if _LOAD_AT_START else None,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "uncommitted_library_files": _git("status", "--porcelain", "--", "cp_dtensor").splitlines(),
    }


def command_line() -> str:
    """The command that launched this run (torchrun with the world size, or python)."""
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    module = Path(sys.argv[0]).relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
    if "WORLD_SIZE" in os.environ:
        return f"OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node {os.environ['WORLD_SIZE']} -m {module} {args}"
    return f"OMP_NUM_THREADS=1 python -m {module} {args}"


def write_result(path: str | Path, payload: dict, started: datetime.datetime) -> None:
    """Write ``payload`` with the machine, command and dates as JSON (rank 0 only)."""
    if rank() != 0:
        return
    payload = {
        "machine": {**machine(), "load_average_at_end": os.getloadavg()},
        "command": command_line(),
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1),
        **payload,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    print(f"wrote {path}", flush=True)


def now() -> datetime.datetime:
    """The current time, UTC."""
    return datetime.datetime.now(datetime.timezone.utc)


def launch(module: str, nproc: int, args: Sequence[str], *, timeout: float, env: dict | None = None) -> str:
    """Run ``torchrun -m module args`` with one thread per rank; return its output, raise on failure."""
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        module,
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout
