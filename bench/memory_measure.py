r"""Measure one rank's peak memory in a training step of :class:`~cp_dtensor.training.model.TransformerWithCP`.

This checks :mod:`cp_dtensor.estimate.memory` against what the model really allocates. One case, on CPU
(gloo) or CUDA (NCCL) alike::

    torchrun --standalone --nproc-per-node 4 -m bench.memory_measure --seq-len 16384 --cp-size 4
    python -m bench.memory_measure --seq-len 4096            # one process, cp_size 1

The whole table of ``docs/memory.md`` (every case in fresh torchrun processes, one thread per rank)::

    python -m bench.memory_measure --sweep --seq-lens 4096 8192 16384 --cp-sizes 1 2 4 \\
        --out bench/results/memory_cpu.json

Its table and figure (estimates recomputed with the current estimator)::

    python -m bench.memory_measure --report bench/results/memory_cpu.json \\
        --plot docs/assets/figures/memory/estimate_vs_measured.png

Note [Measuring peak memory on CPU]
-----------------------------------
PyTorch's CPU allocator keeps no statistics (``torch.cuda.max_memory_allocated`` has no CPU twin),
so each rank measures two ways:

* **Allocator events (the number we compare).** ``torch.profiler`` with ``profile_memory=True``
  records every allocation and free of the CPU allocator with its size and a nanosecond timestamp.
  Their running sum over forward and backward, plus the bytes alive when the step starts (weights,
  gradients and optimizer state, counted from the tensors themselves), is the peak of the tensors
  the step holds. It counts exactly the tensors PyTorch allocates (including the kernels' scratch
  buffers and the receive buffers of the ring), and nothing else: not gloo's own buffers, the
  Python heap or the profiler's bookkeeping, which are not activation memory. Its error is the
  allocator's rounding (none: sizes are the requested bytes) and events with the same timestamp,
  whose order we take as recorded.
* **Resident set size (a cross-check).** ``ru_maxrss`` after an unprofiled step minus the RSS just
  before it, with glibc's mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors
  return to the OS. It also counts malloc fragmentation and pages touched by gloo and the
  interpreter, so it reads higher by a few MB; it is reported next to the allocator figure, not used.

On CUDA the allocator does keep statistics: the peak is ``torch.cuda.max_memory_allocated()`` over
the same window (after ``reset_peak_memory_stats``).

FSDP on gloo: FSDP's all-gathers and reduce-scatters go point to point
(:class:`PointToPointAllGather`, :class:`PointToPointReduceScatter`). gloo runs a collective on a
worker thread, which holds the collective's tensors until the OS schedules it again after it has
reported completion. FSDP frees an all-gather's output right after copying it out; when the worker
thread still holds it then, the last reference, and so the free, falls to that thread, outside the
profiler's view, and the running sum keeps a whole block's weights that are gone: a peak one block
higher, at random, more often on a busy machine. gloo's all-gather also makes two transient copies of
the gathered buffer, one on each thread, which NCCL does not. A send or a receive runs on the calling
thread and holds nothing once waited for, so every free lands where FSDP makes it, and the peak is
the same on every run and counts FSDP's own buffers. What still runs on gloo's threads are the
step's few-byte collectives (the loss's token count and sum): a late free of theirs is noise.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile, record_function

__all__ = [
    "SMALL_MODEL",
    "PointToPointAllGather",
    "PointToPointReduceScatter",
    "estimate_for",
    "grad_sync_table",
    "markdown_table",
    "measure_case",
    "measured_static_bytes",
    "plot_results",
    "profiled_peak",
]

# The small model of the documented sweep: 2 layers, E = 256, 4 heads of 64, V = 256 (fp32).
SMALL_MODEL = {"vocab_size": 256, "hidden_size": 256, "num_layers": 2, "num_heads": 4}


def _storages_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _local(t):
    """The tensor this rank stores: a DTensor's (FSDP's or TP's) local shard, else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def measured_static_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """Bytes of the weights, gradients and optimizer state alive now, counted from the tensors.

    Sharded (DTensor) tensors count this rank's shard, with FSDP's padding (its storage). A DDP
    wrapper's gradient buckets, a second copy of the gradients, count as gradients (sized from the
    reducer's own bucket layout).
    """
    params = list(model.parameters())
    state = [] if optimizer is None else [t for s in optimizer.state.values() for t in s.values()]
    buckets = 0
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        buckets = sum(b.buffer().nbytes for b in model.reducer._get_zeros_like_grad_buckets())
    return {
        "weights": _storages_bytes(_local(p) for p in params),
        "grads": _storages_bytes(_local(p.grad) for p in params if p.grad is not None) + buckets,
        "optimizer_state": _storages_bytes(_local(t) for t in state),
    }


def profiled_peak(fn) -> tuple[int, str]:
    """Run ``fn()`` under the profiler; the peak of the running sum of CPU allocator events, in bytes.

    See Note [Measuring peak memory on CPU].

    Returns:
        ``(peak_bytes, where)``: the largest amount allocated during ``fn`` beyond what was alive when
        it started, and the name of the innermost ``record_function`` range or op running at that
        moment.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    memory = sorted(
        ((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"),
        key=lambda item: item[0],
    )
    running, peak, peak_ns = 0, 0, 0
    for ns, nbytes in memory:
        running += nbytes
        if running > peak:
            peak, peak_ns = running, ns
    spans = [
        (e.duration_ns(), e.name()) for e in events if e.name() != "[memory]" and e.start_ns() <= peak_ns <= e.end_ns()
    ]
    node = "autograd::engine::evaluate_function: "  # the autograd node being run, e.g. MulBackward0
    named = [(d, n.removeprefix(node)) for d, n in spans if n.startswith(("memory_measure.", "cp_dtensor.", node))]
    where = " / ".join(name for _, name in sorted(named, reverse=True))
    innermost = min(spans)[1] if spans else "?"
    return peak, f"{where} / {innermost}" if where else innermost


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _exchange(sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], group) -> None:
    """Send ``sends[peer]`` to and receive ``recvs[peer]`` from each peer (group ranks), on this thread."""
    ops = []
    for peer in sorted(set(sends) | set(recvs)):
        peer_rank = dist.get_global_rank(group, peer)
        if peer in sends:
            ops.append(dist.P2POp(dist.isend, sends[peer], peer_rank, group))
        if peer in recvs:
            ops.append(dist.P2POp(dist.irecv, recvs[peer], peer_rank, group))
    for work in dist.batch_isend_irecv(ops):
        work.wait()


class PointToPointAllGather:
    """FSDP2's all-gather (``FSDPModule.set_custom_all_gather``) as sends and receives on the calling thread.

    See Note [Measuring peak memory on CPU]. The output is allocated as FSDP's default does.
    """

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The all-gather's output buffer: ``torch.empty``, as FSDP's default."""
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        """Every rank's ``input_tensor`` into its chunk of ``output_tensor``; returns no work (it is done)."""
        chunks, me = output_tensor.chunk(group.size()), group.rank()
        if chunks[me].data_ptr() != input_tensor.data_ptr():  # FSDP's copy-in already wrote it in place
            chunks[me].copy_(input_tensor)
        peers = [p for p in range(group.size()) if p != me]
        _exchange({p: input_tensor for p in peers}, {p: chunks[p] for p in peers}, group)
        return None


class PointToPointReduceScatter(PointToPointAllGather):
    """FSDP2's reduce-scatter (``FSDPModule.set_custom_reduce_scatter``), a sum, as sends and receives.

    Allocates nothing: the first peer's chunk arrives in the output itself, each further one in the
    input's chunk sent the step before (FSDP keeps the input only until the reduction is done, and
    never reads it again). apply_fsdp makes FSDP sum (``set_force_sum_reduction_for_comms``), the
    only reduction this supports.
    """

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        """This rank's chunk of the sum over ranks of ``input_tensor``, into ``output_tensor``."""
        assert op == dist.ReduceOp.SUM, f"apply_fsdp sums gradients; got {op}"
        chunks, me = input_tensor.chunk(group.size()), group.rank()
        peers = [p for p in range(group.size()) if p != me]
        for i, peer in enumerate(peers):
            into = output_tensor if i == 0 else chunks[peers[i - 1]]  # sent already: free to reuse
            _exchange({peer: chunks[peer]}, {peer: into}, group)
            if i > 0:
                output_tensor += into
        output_tensor += chunks[me]
        return None


def _fsdp_point_to_point(model: torch.nn.Module) -> None:
    """Every FSDP unit of ``model`` all-gathers and reduce-scatters with sends and receives."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_all_gather(PointToPointAllGather())
            module.set_custom_reduce_scatter(PointToPointReduceScatter())


GRAD_SYNCS = {"none": "replicated", "ddp": "ddp", "fsdp": "fsdp"}  # --grad-sync -> the estimator's param_sharding


def estimate_for(
    config, *, seq_len: int, cp_size: int, batch_size: int, dtype: str, grad_sync: str = "none", dp_size: int = 1
) -> dict:
    """The estimator's per-rank components (bytes) for the measured configuration."""
    from cp_dtensor.estimate.memory import ModelDims, estimate_rank_memory

    dims = ModelDims(
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads or config.num_heads,
        ffn_hidden_size=config.mlp_size,
        vocab_size=config.vocab_size,
        tie_embeddings=config.tie_embeddings,
    )
    est = estimate_rank_memory(
        dims,
        seq_len=seq_len,
        batch_size=batch_size,
        cp_size=cp_size,
        dtype=dtype,
        optimizer="adamw",
        param_sharding=GRAD_SYNCS[grad_sync],
        dp_size=dp_size,
        activation_checkpointing=getattr(config, "activation_checkpointing", "none"),
        loss_chunk_size=getattr(config, "loss_chunk_size", None),
        mlp_tile_size=getattr(config, "mlp_tile_size", None),
    )
    return {"components": est.components, "total": est.total, "peak_phase": est.peak_phase}


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure_case(
    seq_len: int,
    cp_size: int,
    *,
    model: dict | None = None,
    batch_size: int = 1,
    dtype: str = "fp32",
    seed: int = 0,
    cp_group=None,
    rss: bool = True,
    grad_sync: str = "none",
) -> dict:
    """Build the model on this rank, run one measured training step, and report its memory.

    Call on every rank of the group (under torchrun, or in a test's rank pool).

    Args:
        seq_len: Global sequence length ``L``.
        cp_size: ``P``; the world must hold ``P`` ranks (dp = world / P).
        model: Keyword arguments of :class:`~cp_dtensor.training.model.ModelConfig`; default
            :data:`SMALL_MODEL`.
        batch_size: Sequences per step.
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (parameters and activations).
        seed: Seeds the weights and the token ids (identical on every rank).
        cp_group: An existing group (tests); default a new one from the torchrun environment.
        rss: Also run one unprofiled step and report the RSS cross-check (CPU only).
        grad_sync: ``"none"`` (the bare model on every rank), ``"ddp"``
            (:func:`~cp_dtensor.apply_ddp`) or ``"fsdp"`` (:func:`~cp_dtensor.apply_fsdp`: weights,
            gradients and AdamW state sharded over the ranks; on CPU its all-gathers go point to
            point, see Note [Measuring peak memory on CPU]).

    Returns:
        A dict with the case, this rank's measured ``peak_bytes`` (static + step), its ``static``
        part by component, ``activation_peak_bytes``, where the peak happened, the RSS figure, and
        the estimator's ``estimate`` for the same configuration.
    """
    from cp_dtensor import apply_ddp, apply_fsdp, init_context_parallel_group
    from cp_dtensor.training.model import ModelConfig, TransformerWithCP

    group = cp_group or init_context_parallel_group(cp_size=cp_size)
    device = torch.device("cuda", torch.cuda.current_device()) if group.device_type == "cuda" else torch.device("cpu")
    config = ModelConfig(**(model or SMALL_MODEL))
    torch.manual_seed(seed)
    net = TransformerWithCP(config, cp_group=group).to(device=device, dtype=_DTYPES[dtype])
    net = {"none": lambda m, g: m, "ddp": apply_ddp, "fsdp": apply_fsdp}[grad_sync](net, group)
    if grad_sync == "fsdp" and device.type == "cpu":
        _fsdp_point_to_point(net)  # see Note [Measuring peak memory on CPU]
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=gen)
    ids_local = group.partition_sequence(ids, seq_dim=1).to(device)
    warm = group.partition_sequence(ids[:, : 4 * cp_size], seq_dim=1).to(device)

    def step(local_ids: torch.Tensor) -> None:
        with record_function("memory_measure.forward"):
            loss = net(local_ids)
        with record_function("memory_measure.backward"):
            loss.backward()

    # Gradients and optimizer state exist from here on, as in training. A wrapped model warms up
    # twice: DDP rebuilds its gradient buckets (a second copy of them for a moment) after its first step.
    for _ in range(1 if grad_sync == "none" else 2):
        step(warm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    gc.collect()
    static = measured_static_bytes(net, optimizer)
    result = {
        "seq_len": seq_len,
        "cp_size": cp_size,
        "batch_size": batch_size,
        "dtype": dtype,
        "grad_sync": grad_sync,
        "world_size": dist.get_world_size(),
        "rank": dist.get_rank(),
        "model": asdict(config),
        "static": static,
    }
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(ids_local)
        torch.cuda.synchronize()
        result.update(
            method="torch.cuda.max_memory_allocated",
            peak_bytes=torch.cuda.max_memory_allocated(),
            activation_peak_bytes=torch.cuda.max_memory_allocated() - before,
            peak_at=None,
        )
    else:
        if rss:  # unprofiled step first: the profiled one would raise ru_maxrss with its own buffers
            rss_before, start = _rss_bytes(), time.perf_counter()
            step(ids_local)
            result["rss_step_s"] = time.perf_counter() - start
            result["rss_activation_peak_bytes"] = max(_max_rss_bytes() - rss_before, 0)
            optimizer.zero_grad(set_to_none=False)
            gc.collect()
        dist.barrier()
        delta, where = profiled_peak(lambda: step(ids_local))
        result.update(
            method="torch.profiler allocator events",
            activation_peak_bytes=delta,
            peak_bytes=sum(static.values()) + delta,
            peak_at=where,
        )
    result["estimate"] = estimate_for(
        config,
        seq_len=seq_len,
        cp_size=cp_size,
        batch_size=batch_size,
        dtype=dtype,
        grad_sync=grad_sync,
        dp_size=dist.get_world_size() // cp_size,
    )
    return result


def _one_case(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    result = measure_case(
        args.seq_len,
        args.cp_size,
        model=json.loads(args.model),
        batch_size=args.batch_size,
        dtype=args.dtype,
        rss=not args.no_rss,
        grad_sync=args.grad_sync,
    )
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        text = json.dumps(results)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        else:
            print(text)
    dist.destroy_process_group()


def _summary(ranks: list[dict]) -> dict:
    top = max(ranks, key=lambda r: r["peak_bytes"])  # the rank that needs the most
    peak, est = top["peak_bytes"], top["estimate"]["total"]
    return {
        "seq_len": ranks[0]["seq_len"],
        "cp_size": ranks[0]["cp_size"],
        "grad_sync": ranks[0].get("grad_sync", "none"),
        "measured_peak_bytes": peak,
        "estimated_peak_bytes": est,
        "relative_error": est / peak - 1,
        "measured_activation_peak_bytes": max(r["activation_peak_bytes"] for r in ranks),
        "estimated_activation_peak_bytes": est - sum(ranks[0]["static"].values()),
        "rss_activation_peak_bytes": max(r.get("rss_activation_peak_bytes", 0) for r in ranks),
        "estimated_peak_phase": ranks[0]["estimate"]["peak_phase"],
        "measured_peak_at": top["peak_at"],
    }


def _fresh_estimate(case: dict) -> dict:
    """The current estimator on a recorded case (the JSON keeps the estimate of its day too)."""
    from cp_dtensor.training.model import ModelConfig

    rank = case["ranks"][0]
    config = ModelConfig(**{k: v for k, v in rank["model"].items() if k in ModelConfig.__dataclass_fields__})
    return estimate_for(
        config,
        seq_len=rank["seq_len"],
        cp_size=rank["cp_size"],
        batch_size=rank["batch_size"],
        dtype=rank["dtype"],
        grad_sync=rank.get("grad_sync", "none"),
        dp_size=rank.get("world_size", rank["cp_size"]) // rank["cp_size"],
    )


def _peak_node(where: str) -> str:
    """The autograd node (or, outside the backward, the last range) a profiler path ends in."""
    parts = where.removeprefix("memory_measure.").split(" / ")
    return parts[1] if parts[0] == "backward" and len(parts) > 1 else parts[-1]


def markdown_table(report: dict) -> str:
    """The sweep as the two tables of ``docs/memory.md`` (MiB per rank, the largest rank).

    The first compares the measured peak with the estimate and says where each peaks; the second
    splits off the activations and cross-checks them against the resident-set growth. Two narrow
    tables rather than one wide one, so that each fits the page's text column.
    """
    mib = 2**20
    peaks = [
        "| L | P | measured peak | estimate | error | peak in: estimated, measured |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    acts = [
        "| L | P | measured activations | RSS cross-check | activations vs P = 1 |",
        "|---:|---:|---:|---:|---:|",
    ]
    act_p1 = {
        c["summary"]["seq_len"]: c["summary"]["measured_activation_peak_bytes"]
        for c in report["cases"]
        if c["summary"]["cp_size"] == 1
    }
    for case in report["cases"]:
        sm, est = case["summary"], _fresh_estimate(case)
        ratio = (
            sm["measured_activation_peak_bytes"] / act_p1[sm["seq_len"]] if sm["seq_len"] in act_p1 else float("nan")
        )
        lp = f"| {sm['seq_len']} | {sm['cp_size']} |"
        peaks.append(
            f"{lp} {sm['measured_peak_bytes'] / mib:.1f} | {est['total'] / mib:.1f} | "
            f"{100 * (est['total'] / sm['measured_peak_bytes'] - 1):+.2f}% | {est['peak_phase']}, "
            f"{_peak_node(sm['measured_peak_at'])} |"
        )
        acts.append(
            f"{lp} {sm['measured_activation_peak_bytes'] / mib:.1f} | {sm['rss_activation_peak_bytes'] / mib:.1f} | "
            f"{ratio:.3f} |"
        )
    return "\n".join([*peaks, "", *acts])


def grad_sync_table(report: dict) -> str:
    """A sweep over ``--grad-syncs`` as two markdown tables, MiB per rank (the largest rank).

    The first is what a rank holds between steps (weights, gradients with DDP's buckets, AdamW's
    moments); the second the measured and estimated peak and where the measurement peaks. The
    length column is left out when the sweep has one length (the page states it).
    """
    mib = 2**20
    several = len({c["summary"]["seq_len"] for c in report["cases"]}) > 1
    lcol, lsep = ("L | ", "---:|") if several else ("", "")
    state = [f"| {lcol}P | gradient sync | weights | grads | AdamW |", f"|{lsep}---:|---|---:|---:|---:|"]
    peaks = [
        f"| {lcol}P | gradient sync | measured peak | estimate | error | measured peak in |",
        f"|{lsep}---:|---|---:|---:|---:|---|",
    ]
    for case in report["cases"]:
        sm, est = case["summary"], _fresh_estimate(case)
        static = max(case["ranks"], key=lambda r: r["peak_bytes"])["static"]
        length = f" {sm['seq_len']} |" if several else ""
        key = f"|{length} {sm['cp_size']} | {sm.get('grad_sync', 'none')} |"
        state.append(
            f"{key} {static['weights'] / mib:.1f} | {static['grads'] / mib:.1f} | "
            f"{static['optimizer_state'] / mib:.1f} |"
        )
        peaks.append(
            f"{key} {sm['measured_peak_bytes'] / mib:.1f} | {est['total'] / mib:.1f} | "
            f"{100 * (est['total'] / sm['measured_peak_bytes'] - 1):+.2f}% | "
            f"{_peak_node(sm['measured_peak_at'])} |"
        )
    return "\n".join([*state, "", *peaks])


def plot_results(report: dict, path) -> None:
    """Estimate vs measurement: per-rank peak by case (left), activation peak against ``L`` (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 2**20
    cases = report["cases"]
    # one panel per row: at most 7.4 inches wide, so that the page's column shows it at full size
    fig, (left, right) = plt.subplots(2, 1, figsize=(7.2, 8.0))
    labels = [f"L={c['summary']['seq_len'] // 1024}K\nP={c['summary']['cp_size']}" for c in cases]
    xs = range(len(cases))
    measured = [c["summary"]["measured_peak_bytes"] / mib for c in cases]
    estimated = [_fresh_estimate(c)["total"] / mib for c in cases]
    left.bar([x - 0.2 for x in xs], measured, width=0.4, label="measured (allocator events)", color="tab:blue")
    left.bar([x + 0.2 for x in xs], estimated, width=0.4, label="estimate", color="tab:orange")
    for x, m, e in zip(xs, measured, estimated):
        error = round(100 * (e / m - 1), 1) + 0.0  # + 0.0: no "-0.0%"
        left.annotate(
            f"{error:+.1f}%",
            (x, max(m, e)),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    left.set_ylim(0, 1.12 * max(*measured, *estimated))  # room for the labels inside the axes
    left.set_xticks(list(xs), labels, fontsize=8)
    left.set_ylabel("peak memory per rank (MiB)")
    left.set_title("Per-rank peak: estimate vs measurement")
    left.legend(loc="upper left", fontsize=8)
    for cp_size, color in zip(
        sorted({c["summary"]["cp_size"] for c in cases}), ("tab:blue", "tab:green", "tab:red", "tab:purple")
    ):
        mine = [c for c in cases if c["summary"]["cp_size"] == cp_size]
        lens = [c["summary"]["seq_len"] for c in mine]
        right.plot(
            lens,
            [c["summary"]["measured_activation_peak_bytes"] / mib for c in mine],
            "o",
            color=color,
            label=f"P={cp_size} measured",
        )
        static = [sum(c["ranks"][0]["static"].values()) for c in mine]
        right.plot(
            lens,
            [(_fresh_estimate(c)["total"] - s) / mib for c, s in zip(mine, static)],
            "--",
            color=color,
            label=f"P={cp_size} estimate",
        )
    right.set_xscale("log", base=2)
    right.set_yscale("log", base=2)
    right.set_xlabel("sequence length L (tokens)")
    right.set_ylabel("peak minus weights, grads, AdamW (MiB)")
    right.set_title("Activation peak per rank: linear in L / P")
    right.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def _sweep(args: argparse.Namespace) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "131072"}
    cases = []
    for seq_len, cp_size, grad_sync in itertools.product(args.seq_lens, args.cp_sizes, args.grad_syncs):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={cp_size}",
            "-m",
            "bench.memory_measure",
            "--seq-len",
            str(seq_len),
            "--cp-size",
            str(cp_size),
            "--model",
            args.model,
            "--batch-size",
            str(args.batch_size),
            "--dtype",
            args.dtype,
            "--threads",
            str(args.threads),
            "--grad-sync",
            grad_sync,
            "--out",
            f"{args.out}.case.json",
            *(["--no-rss"] if args.no_rss else []),
        ]
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, timeout=args.timeout)
        with open(f"{args.out}.case.json") as f:
            ranks = json.load(f)
        os.remove(f"{args.out}.case.json")
        summary = _summary(ranks)
        summary["wall_s"] = round(time.perf_counter() - start, 1)
        cases.append({"summary": summary, "ranks": ranks})
        print(json.dumps(summary), flush=True)
    report = {
        "command": " ".join(["python -m bench.memory_measure", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, torch {torch.__version__}",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "threads_per_rank": args.threads,
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


def main(argv=None) -> None:
    """Command line: one case (under torchrun or plain python) or ``--sweep``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--cp-size", type=int, default=None, help="default: the world size")
    parser.add_argument("--model", default=json.dumps(SMALL_MODEL), help="ModelConfig kwargs as JSON")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", choices=list(_DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--no-rss", action="store_true", help="skip the unprofiled RSS step")
    parser.add_argument("--grad-sync", choices=list(GRAD_SYNCS), default="none", help="wrap the model so (one case)")
    parser.add_argument("--grad-syncs", choices=list(GRAD_SYNCS), nargs="+", default=["none"], help="(sweep)")
    parser.add_argument("--out", default=None, help="JSON output (default: print)")
    parser.add_argument("--sweep", action="store_true", help="run every (seq len, cp size) in fresh processes")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--cp-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case (sweep)")
    parser.add_argument("--report", default=None, help="a sweep's JSON: print its markdown table")
    parser.add_argument("--plot", default=None, help="with --report: write the figure here (PNG)")
    args = parser.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            report = json.load(f)
        by_grad_sync = any(c["summary"].get("grad_sync", "none") != "none" for c in report["cases"])
        print(grad_sync_table(report) if by_grad_sync else markdown_table(report))
        if args.plot:
            plot_results(report, args.plot)
        return
    if args.sweep:
        if not args.out:
            parser.error("--sweep needs --out")
        _sweep(args)
        return
    if args.cp_size is None:
        args.cp_size = int(os.environ.get("WORLD_SIZE", "1"))
    _one_case(args)


if __name__ == "__main__":
    main()
