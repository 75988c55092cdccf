r"""Peak memory per token and step time of each memory option (chunked loss, activation checkpointing).

Every option runs in the same processes, one after the other, at each sequence length (one torchrun
per length), measured as :mod:`bench.memory_measure` measures (Note [Measuring peak memory on CPU]):
allocator events for the peak, an unprofiled step for the time. The report fits the per-rank peak
against the sequence length (least squares over the lengths): the slope is the bytes each token
costs, and ``(budget - intercept) / slope`` the longest sequence a budget holds::

    python -m bench.memory_options --seq-lens 1024 2048 4096 --cp-size 4 --out bench/results/memory_options.json
    python -m bench.memory_options --report bench/results/memory_options.json

One length by hand (what the sweep runs)::

    torchrun --standalone --nproc-per-node 4 -m bench.memory_options --seq-len 2048 --out case.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.distributed as dist

__all__ = ["MODEL", "OPTIONS", "fit", "label", "markdown_tables"]

MODEL = {"vocab_size": 32_000, "hidden_size": 512, "num_layers": 4, "num_heads": 8}
"""The measured model: E = 512, 4 layers, 8 heads of 64, V = 32K, SwiGLU 1376 (fp32)."""

LOSS_CHUNK = 256
OPTIONS = {
    "today": {},
    "chunked loss": {"loss_chunk_size": LOSS_CHUNK},
    "selective AC": {"activation_checkpointing": "selective"},
    "full AC": {"activation_checkpointing": "full"},
    "all on (chunked + full AC)": {"loss_chunk_size": LOSS_CHUNK, "activation_checkpointing": "full"},
}
"""Name -> ``ModelConfig`` keyword arguments added to :data:`MODEL`."""

GIB, MIB = 2**30, 2**20


def _one_length(args: argparse.Namespace) -> None:
    from bench.memory_measure import measure_case

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cases = {}
    for name, extra in OPTIONS.items():
        ranks = [None] * dist.get_world_size()
        r = measure_case(args.seq_len, dist.get_world_size(), model={**MODEL, **extra}, rss=True)
        dist.all_gather_object(ranks, r)
        cases[name] = ranks
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"seq_len": args.seq_len, "cases": cases}, f)
    dist.destroy_process_group()


def _sweep(args: argparse.Namespace) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    lengths = []
    for seq_len in args.seq_lens:
        part = f"{args.out}.L{seq_len}.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={args.cp_size}",
            "-m",
            "bench.memory_options",
            "--seq-len",
            str(seq_len),
            "--out",
            part,
        ]
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, timeout=args.timeout)
        with open(part) as f:
            lengths.append({**json.load(f), "wall_s": round(time.perf_counter() - start, 1)})
        os.remove(part)
        print(f"L={seq_len} done in {lengths[-1]['wall_s']} s", flush=True)
    report = {
        "command": " ".join(["python -m bench.memory_options", *sys.argv[1:]]),
        "commit": commit + (" (with uncommitted changes)" if dirty.stdout.strip() else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, torch {torch.__version__}",
        "load_average_after": os.getloadavg(),
        "cp_size": args.cp_size,
        "model": MODEL,
        "options": OPTIONS,
        "lengths": lengths,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line ``y = slope x + intercept``; returns ``(slope, intercept)``."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def _case(ranks: list[dict]) -> dict:
    top = max(ranks, key=lambda r: r["peak_bytes"])
    return {
        "peak": top["peak_bytes"],
        "estimate": top["estimate"]["total"],
        "step_s": max(r["rss_step_s"] for r in ranks),
    }


def label(name: str) -> str:
    """An option's name on the page: the run without any option is the baseline."""
    return "baseline" if name == "today" else name


def markdown_tables(report: dict, budget_gib: float = 4.0) -> str:
    """The per-option peaks with the estimate's error, then bytes per token and the longest fit.

    Two narrow tables rather than one wide one, so that each fits the page's text column.
    """
    names = list(report["options"])
    lens = [entry["seq_len"] for entry in report["lengths"]]
    cases = {name: [_case(entry["cases"][name]) for entry in report["lengths"]] for name in names}
    slopes = {name: fit(lens, [c["peak"] for c in cases[name]]) for name in names}
    base_slope = slopes[names[0]][0]
    budget = budget_gib * GIB
    base_len = (budget - slopes[names[0]][1]) / base_slope
    head = " | ".join(f"L={n}" for n in lens)
    peaks = [f"| option | {head} | estimate error (max) |", "|---|" + "---:|" * (len(lens) + 1)]
    costs = [
        f"| option | bytes per token | vs baseline | longest in {budget_gib:g} GiB | vs baseline |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in names:
        errors = [c["estimate"] / c["peak"] - 1 for c in cases[name]]
        worst = max(errors, key=abs)
        cells = " | ".join(f"{c['peak'] / MIB:.1f}" for c in cases[name])
        peaks.append(f"| {label(name)} | {cells} | {100 * worst:+.1f}% |")
        slope, intercept = slopes[name]
        longest = (budget - intercept) / slope
        costs.append(
            f"| {label(name)} | {slope / 1024:.1f} KiB | {base_slope / slope:.2f}x fewer | "
            f"{longest / 1024:.1f}K tokens | {longest / base_len:.2f}x |"
        )
    return "\n".join([*peaks, "", *costs])


def main(argv=None) -> None:
    """Command line: one length (under torchrun), ``--seq-lens`` (the sweep) or ``--report``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=None, help="one length, under torchrun")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None, help="the sweep: a torchrun per length")
    parser.add_argument("--cp-size", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per length (sweep)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--report", default=None, help="a sweep's JSON: print its tables")
    args = parser.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            print(markdown_tables(json.load(f)))
    elif args.seq_lens:
        _sweep(args)
    else:
        _one_length(args)


if __name__ == "__main__":
    main()
