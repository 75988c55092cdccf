"""Time spent inside the block kernels, measured without touching the library.

:func:`kernel_time` wraps :func:`cp_dtensor.local.kernels.block_forward` and ``block_backward`` wherever a
``cp_dtensor`` module imported them, for the duration of a ``with`` block, and adds up the *thread*
CPU seconds of each call (``time.thread_time``: time on a core, not time waiting for one, so the
figure holds when ranks oversubscribe the cores). With one thread per rank that is the kernels' work.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["KernelTime", "kernel_time"]


@dataclass
class KernelTime:
    """Thread CPU seconds and calls of the block kernels, by ``"fwd"`` / ``"bwd"``."""

    seconds: dict[str, float] = field(default_factory=lambda: {"fwd": 0.0, "bwd": 0.0})
    calls: dict[str, int] = field(default_factory=lambda: {"fwd": 0, "bwd": 0})

    @property
    def total(self) -> float:
        """Forward plus backward kernel seconds."""
        return self.seconds["fwd"] + self.seconds["bwd"]


def _timed(fn, key: str, acc: KernelTime):
    def wrapper(*args, **kwargs):
        t0 = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            acc.seconds[key] += time.thread_time() - t0
            acc.calls[key] += 1

    wrapper.__wrapped__ = fn
    return wrapper


@contextlib.contextmanager
def kernel_time() -> Iterator[KernelTime]:
    """Count the block kernels' thread CPU seconds inside the ``with`` block (not re-entrant)."""
    import cp_dtensor.local.kernels as kernels

    acc = KernelTime()
    originals = {"block_forward": kernels.block_forward, "block_backward": kernels.block_backward}
    assert not hasattr(originals["block_forward"], "__wrapped__"), "kernel_time() is not re-entrant"
    patched: list[tuple[object, str, object]] = []
    for name, module in list(sys.modules.items()):
        if not (name == "cp_dtensor" or name.startswith("cp_dtensor.")) or module is None:
            continue
        for attr, key in (("block_forward", "fwd"), ("block_backward", "bwd")):
            if getattr(module, attr, None) is originals[attr]:
                patched.append((module, attr, originals[attr]))
                setattr(module, attr, _timed(originals[attr], key, acc))
    try:
        yield acc
    finally:
        for module, attr, fn in patched:
            setattr(module, attr, fn)
