"""The training job's step, compiled (``--compile``) vs eager, in the same processes: ratio and compile time.

Two copies of the job's model (same weights) train on the same batches, alternating one eager step
and one compiled step; the first compiled step includes the compilation. Prints (rank 0) and writes
``bench/results/compile_step.json``: per-step seconds of each, min / median / max of the ratio
eager / compiled over the steps after the first, and the first compiled step's extra seconds.

    torchrun --standalone --nproc-per-node=2 -m bench.compile_step [job flags, e.g. --seq-len 1024]
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from cp_dtensor.training import train


def _timed_step(cfg, step, run, batch, cp_group) -> float:
    model, ddp, optimizer = run
    dist.barrier()
    t0 = time.perf_counter()
    train._step(cfg, step, ddp, model, optimizer, batch, cp_group, contextlib.nullcontext)
    dist.barrier()
    return time.perf_counter() - t0


def main(argv: list[str]) -> None:
    cfg = train.parse_args(argv)
    dataset, _ = train._datasets(cfg)
    cp_group, device = train._setup(cfg)
    cfgs = {name: replace(cfg, compile=name == "compiled") for name in ("eager", "compiled")}
    runs = {name: train._build(c, cp_group, device, dataset.vocab_size) for name, c in cfgs.items()}
    dp_rank, per_dp = cp_group.dp_mesh.get_local_rank(), cfg.batch_size // cp_group.dp_mesh.size()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(1, cfg.steps + 1):
        first = (step - 1) * cfg.batch_size + dp_rank * per_dp
        batch = train.local_batch([dataset[first + i] for i in range(per_dp)], cp_group, device, cfg)
        for name, run in runs.items():
            seconds[name].append(_timed_step(cfgs[name], step, run, batch, cp_group))
    ratios = [e / c for e, c in zip(seconds["eager"][1:], seconds["compiled"][1:], strict=True)]
    result = {
        "command": f"torchrun --standalone --nproc-per-node={dist.get_world_size()} -m bench.compile_step "
        + " ".join(argv),
        "machine": train._machine(),
        "torch": torch.__version__,
        "seconds": seconds,
        "eager_over_compiled": {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)},
        "compile_s": seconds["compiled"][0] - statistics.median(seconds["compiled"][1:]),
    }
    if dist.get_rank() == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=1))
        out = Path(__file__).parent / "results" / "compile_step.json"
        out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
