r"""Step time of each memory option against today's step, alternating in the same processes.

The memory report (:mod:`bench.memory_options`) times one step per option; this measures the time
cost properly: every round runs one training step (forward, backward, no optimizer) of each option
on the same batch, in turn, so that load on the machine hits all options alike; the report gives each
option's time divided by today's in the same round, min / median / max over the rounds. By
construction full activation checkpointing adds one forward of every block (~1/3 of a step whose
backward costs two forwards), selective one forward of every MLP, and the chunked loss one more
LM-head matmul::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m bench.memory_options_time \
        --seq-len 2048 --rounds 7 --out bench/results/memory_options_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

import torch
import torch.distributed as dist

from bench.memory_options import MODEL, OPTIONS, label


def markdown_table(report: dict) -> str:
    """The page's table: each option's step time relative to the baseline, median [min-max] over rounds."""
    rows = ["| option | step time vs baseline |", "|---|---:|"]
    for name, r in report["vs_today"].items():
        if name != "today":
            rows.append(f"| {label(name)} | {r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}] |")
    return "\n".join(rows)


def _step(model: torch.nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = model(ids)
    loss.backward()
    model.zero_grad(set_to_none=True)
    dist.barrier()  # the slowest rank's time
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    """Run the rounds on every rank (under torchrun); rank 0 writes the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="bench/results/memory_options_time.json")
    args = parser.parse_args(argv)

    from cp_dtensor import init_context_parallel_group
    from cp_dtensor.training import ModelConfig, TransformerWithCP

    torch.set_num_threads(1)
    cp_group = init_context_parallel_group(cp_size=int(os.environ.get("WORLD_SIZE", "1")))
    models = {}
    for name, extra in OPTIONS.items():
        torch.manual_seed(0)
        models[name] = TransformerWithCP(ModelConfig(**MODEL, **extra), cp_group=cp_group)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, MODEL["vocab_size"], (1, args.seq_len), generator=gen)
    ids_local = cp_group.partition_sequence(ids, seq_dim=1)
    for model in models.values():  # warm-up: allocator, plans
        _step(model, ids_local)
    seconds = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            seconds[name].append(_step(model, ids_local))
    if dist.get_rank() == 0:
        base = seconds["today"]
        ratios = {name: [s / b for s, b in zip(times, base)] for name, times in seconds.items()}
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
        report = {
            "command": f"torchrun --nproc-per-node {cp_group.size} -m bench.memory_options_time "
            f"--seq-len {args.seq_len} --rounds {args.rounds}",
            "commit": commit.strip(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "load_average_after": os.getloadavg(),
            "model": MODEL,
            "seq_len": args.seq_len,
            "cp_size": cp_group.size,
            "step_s_median": {name: statistics.median(t) for name, t in seconds.items()},
            "vs_today": {
                name: {"min": min(r), "median": statistics.median(r), "max": max(r)} for name, r in ratios.items()
            },
        }
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        for name, r in report["vs_today"].items():
            print(f"{name:32s} {r['min']:.3f} / {r['median']:.3f} / {r['max']:.3f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
