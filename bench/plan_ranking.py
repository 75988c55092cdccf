r"""Does the planner's first choice measure as fast as the best of its top three, on this CPU?

The planner (:func:`cp_dtensor.estimate.planner.plan`) ranks layouts with a time model fed a device's
FLOP/s and bandwidth. Here the device is this machine, measured first on the same 4 ranks the plans
then run on: the fp32 matmul rate one rank reaches while every rank multiplies (the ranks share the
cores), and the bytes per second one rank sends in a gloo all-reduce of a large buffer. For each
configuration (sequence length, heads, K/V heads) the planner's top three plans each run a forward
and backward of the demo model (:class:`~cp_dtensor.training.TransformerWithCP`, one sequence per dp
replica, their gradient sync included, no optimizer step), in alternating rounds so that load on
the machine hits all three alike. Per round, each plan's seconds per token (step time over the
``dp x L`` tokens it trains) is divided by the fastest plan's (by median) of that round; the report
gives min / median / max of those ratios, and whether the first choice is within 10% of the fastest::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 -m bench.plan_ranking --rounds 5

A configuration counts ("the plans differ") when its slowest plan is slower than its fastest in
every round. Results go to ``bench/results/plan_ranking.json`` with ``uptime`` before and after.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import time
from dataclasses import asdict, replace

import torch
import torch.distributed as dist

from bench import harness
from cp_dtensor import apply_ddp, apply_fsdp, init_context_parallel_group, parallelize_for_tp
from cp_dtensor.estimate.memory import ModelDims
from cp_dtensor.estimate.planner import DEVICES, Device, Plan, plan
from cp_dtensor.training import ModelConfig, TransformerWithCP

VOCAB, LAYERS = 256, 2
# (name, hidden size, heads, K/V heads, L): where ring, Ulysses, all-gather, hybrid and tp trade places
CONFIGS = [
    ("MHA 8 heads, L 2048", 256, 8, 8, 2048),
    ("MQA 8 heads, L 2048", 256, 8, 1, 2048),
    ("GQA 8/2 heads, L 4096", 128, 8, 2, 4096),
    ("2 heads (no Ulysses over 4), L 2048", 128, 2, 2, 2048),
    ("GQA 16/4 heads, wide, L 1024", 512, 16, 4, 1024),
    ("MHA 4 heads, L 8192", 128, 4, 4, 8192),
    ("MHA 16 heads, wide, L 2048", 512, 16, 16, 2048),
    ("GQA 8/4 heads, L 4096", 256, 8, 4, 4096),
]
WITHIN = 1.10  # the first choice passes within 10% of the fastest of the three


def measure_device(world: int) -> tuple[Device, dict]:
    """This machine as the planner's device: matmul FLOP/s per rank (all ranks at once) and all-reduce bytes/s."""
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    rates = []
    for _ in range(7):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(8):
            a @ b
        rates.append(8 * 2 * n**3 / (time.perf_counter() - start))
    flops = statistics.median(harness.gather_objects(statistics.median(rates)))
    buf = torch.randn(8 * 2**20)  # 32 MiB
    seconds = []
    for _ in range(5):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buf)
        seconds.append(time.perf_counter() - start)
    sent = 2 * (world - 1) / world * buf.numel() * buf.element_size()  # a ring all-reduce, per rank
    bandwidth = sent / statistics.median(harness.gather_objects(statistics.median(seconds)))
    device = replace(
        DEVICES["CPU"],
        name="this CPU",
        peak_flops=flops,
        intra_node_gbps=bandwidth,
        inter_node_gbps=bandwidth,
        source=f"measured: {n}x{n} fp32 matmuls on {world} ranks at once; a gloo all-reduce of 32 MiB",
    )
    return device, {"matmul_flops_per_rank": flops, "allreduce_bytes_per_s_per_rank": bandwidth}


def build(p: Plan, dims: ModelDims, seq_len: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The demo model under plan ``p`` and this rank's share of one sequence of its dp replica."""
    extra = {"ulysses_size": p.ulysses_size} if p.ulysses_size else {}
    group = init_context_parallel_group(p.cp, dp_size=p.dp, tp_size=p.tp, layout=p.layout, **extra)
    config = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=dims.hidden_size,
        num_layers=dims.num_layers,
        num_heads=dims.num_heads,
        num_kv_heads=dims.num_kv_heads,
        intermediate_size=dims.ffn_hidden_size,
        strategy=p.strategy,
        activation_checkpointing=p.activation_checkpointing,
        loss_chunk_size=p.loss_chunk_size,
        mlp_tile_size=p.mlp_tile_size,
    )
    torch.manual_seed(0)
    model = parallelize_for_tp(TransformerWithCP(config, cp_group=group), group)
    model = (apply_fsdp if p.param_sharding == "fsdp" else apply_ddp)(model, group)
    gen = torch.Generator().manual_seed(group.dp_mesh.get_local_rank())
    ids = torch.randint(0, VOCAB, (1, seq_len), generator=gen)
    return model, group.partition_sequence(ids, seq_dim=1)


def step_seconds(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """One forward and backward (gradient sync included); the slowest rank's seconds."""
    dist.barrier()
    start = time.perf_counter()
    model(ids).backward()
    model.zero_grad(set_to_none=True)
    dist.barrier()
    return time.perf_counter() - start


def run_config(name: str, hidden: int, heads: int, kv_heads: int, seq_len: int, device: Device, rounds: int) -> dict:
    """The planner's top three for one configuration, timed in alternating rounds."""
    dims = ModelDims(hidden, LAYERS, heads, kv_heads, 4 * hidden, VOCAB)
    result = plan(
        dims,
        seq_len=seq_len,
        world_size=dist.get_world_size(),
        gpus_per_node=dist.get_world_size(),
        device=device,
        efficiency=1.0,  # the device's FLOP/s is the matmul rate measured, not a datasheet peak
        loss_chunk_size=1024,
        mlp_tile_size=1024,
        num_runners_up=2,
    )
    plans = [result.best, *result.runners_up]
    built = [build(p, dims, seq_len) for p in plans]
    for model, ids in built:  # warm-up: allocator, plans, gloo connections
        step_seconds(model, ids)
    per_token = [[] for _ in plans]
    for _ in range(rounds):
        for i, (model, ids) in enumerate(built):
            per_token[i].append(step_seconds(model, ids) / (plans[i].dp * seq_len))
    fastest = min(range(len(plans)), key=lambda i: statistics.median(per_token[i]))
    ratios = [[t / f for t, f in zip(times, per_token[fastest])] for times in per_token]
    slowest = max(range(len(plans)), key=lambda i: statistics.median(ratios[i]))
    del built
    gc.collect()
    return {
        "name": name,
        "model": asdict(dims),
        "seq_len": seq_len,
        "plans": [
            {
                "rank_by_planner": i + 1,
                "plan": p.describe(),
                "predicted_s_per_token": p.seconds_per_token,
                "predicted_vs_first": p.seconds_per_token / plans[0].seconds_per_token,
                "measured_s_per_token": harness.summary(per_token[i]),
                "measured_vs_fastest": harness.summary(ratios[i]),
            }
            for i, p in enumerate(plans)
        ],
        "fastest_measured": fastest + 1,
        "plans_differ": min(ratios[slowest]) > 1.0,  # the slowest is slower in every round
        "first_within_10pct": statistics.median(ratios[0]) <= WITHIN,
    }


def main(argv: list[str] | None = None) -> None:
    """Measure the device, then every configuration (under torchrun, 4 ranks); rank 0 writes the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--configs", type=int, default=len(CONFIGS), help="the first N configurations")
    parser.add_argument("--out", default=str(harness.RESULTS / "plan_ranking.json"))
    args = parser.parse_args(argv)
    started = harness.now()
    harness.init_rank()
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    device, measured = measure_device(dist.get_world_size())
    harness.log(f"device: {measured}")
    results = []
    for config in CONFIGS[: args.configs]:
        r = run_config(*config, device=device, rounds=args.rounds)
        results.append(r)
        for p in r["plans"]:
            m = p["measured_vs_fastest"]
            harness.log(
                f"{r['name']:<38} #{p['rank_by_planner']} {p['plan']:<70} predicted x{p['predicted_vs_first']:.2f} "
                f"measured x{m['median']:.2f} [{m['min']:.2f}-{m['max']:.2f}]"
            )
    counted = [r for r in results if r["plans_differ"]]
    harness.write_result(
        args.out,
        {
            "uptime_before": uptime_before,
            "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
            "device": asdict(device),
            "measured": measured,
            "rounds": args.rounds,
            "configs": results,
            "configs_where_plans_differ": len(counted),
            "first_within_10pct_where_plans_differ": sum(r["first_within_10pct"] for r in counted),
        },
        started,
    )
    harness.finish()


if __name__ == "__main__":
    main()
