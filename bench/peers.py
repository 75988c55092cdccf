"""Ours against the peers, side by side: same inputs, same processes, alternating A B A B.

    # PyTorch's built-in CP (torch.distributed.tensor.experimental), causal forward + backward:
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 -m bench.peers --suite torch --seq 8192 16384
    # per-rank peak memory, ours vs torch's two rotate methods (fresh processes, glibc returns freed memory):
    MALLOC_MMAP_THRESHOLD_=131072 OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 \
        -m bench.peers --suite memory --seq 32768
    # yunchang (USP) 0.6.4, causal forward only:
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 -m bench.peers --suite yunchang --seq 8192 16384

Contenders:

* ``ours``: :func:`cp_dtensor.ring_attention`, zigzag layout (and ``ours-hybrid``, Ulysses 2 x ring,
  next to yunchang's hybrid).
* ``torch-allgather`` / ``torch-alltoall``: PyTorch's ``_templated_ring_attention`` with its head-tail
  load balancing (the same shards as our zigzag) and each rotate method, run on CPU through the
  benchmark-only adapter :mod:`bench.torch_cp_adapter`.
* ``yunchang-*``: yunchang's ring (contiguous ``basic`` and ``zigzag``) and hybrid (``LongContextAttention``,
  Ulysses 2 x zigzag ring), ``AttnType.TORCH_FLASH`` with its CUDA-only op swapped for the CPU one
  (:mod:`bench.yunchang_adapter`). Forward only; yunchang's Ulysses with torch attention is checked for
  agreement, not timed.

Every contender's local output (and gradients) is compared with the rows of one process's fused SDPA on
the whole sequence at the same global positions. Reported per repeat: our wall time / theirs (the
slowest rank's), our CPU seconds / theirs (summed over ranks), and with ``--suite memory`` each rank's
peak resident memory above its start (:class:`bench.harness.PeakRSS`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os

import torch
import torch.distributed as dist

from bench.cases import Case, cp_call, max_errors, sdpa, time_call
from bench.harness import (
    RESULTS,
    Run,
    finish,
    gather_objects,
    init_rank,
    log,
    now,
    rank,
    summary,
    world_size,
    write_result,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=["torch", "memory", "yunchang"], required=True)
    p.add_argument("--seq", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--repeats-at", default="", help="per-length repeats, e.g. 16384:2")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------- reference
def reference(case: Case, backward: bool) -> dict[str, torch.Tensor]:
    """Fused SDPA on the whole sequence, computed on rank 0 and broadcast: ``out`` (and grads)."""
    names = ["out", "dq", "dk", "dv"] if backward else ["out"]
    ref = {n: torch.empty(case.shape) for n in names}
    if rank() == 0:
        full = case.full_inputs()
        q, k, v = (full[n].clone().requires_grad_(backward) for n in "qkv")
        with torch.set_grad_enabled(backward):
            out = sdpa(case.causal)(q, k, v)
            if backward:
                out.backward(full["dout"])
        ref = {"out": out.detach(), **({"dq": q.grad, "dk": k.grad, "dv": v.grad} if backward else {})}
    for n in names:
        dist.broadcast(ref[n], src=0)
    return ref


def rows(full: dict[str, torch.Tensor], runs: list[Run]) -> dict[str, torch.Tensor]:
    """The rows of every reference tensor at ``runs`` (dim 2)."""
    return {n: torch.cat([t[:, :, s : s + m] for s, m in runs], dim=2) for n, t in full.items()}


def worst(errors: dict[str, float]) -> dict[str, float]:
    """Max over ranks of each rank's max errors."""
    every = gather_objects(errors)
    return {n: max(e[n] for e in every) for n in errors}


# --------------------------------------------------------------------------------- contenders
class Contender:
    """A named attention call on this rank: its function of local ``(q, k, v)``, the positions of
    its shard, the context it runs in, and whether its tensors are ``(B, S, H, D)``."""

    def __init__(self, name, fn, runs, context=contextlib.nullcontext, bshd=False):
        self.name, self.fn, self.runs, self.context, self.bshd = name, fn, runs, context, bshd

    def inputs(self, case: Case) -> dict[str, torch.Tensor]:
        inp = case.inputs(self.runs)
        return {n: t.transpose(1, 2).contiguous() for n, t in inp.items()} if self.bshd else inp

    def call(self):
        if not self.bshd:
            return self.fn
        return lambda q, k, v: self.fn(q, k, v).transpose(1, 2)  # back to (B, H, S, D)

    def run(self, inp, *, backward, memory=False):
        return time_call(self.call(), (), inp, backward=backward, context=self.context, memory=memory)


@functools.cache
def _group(ulysses_size: int | None = None):
    from cp_dtensor import init_context_parallel_group

    extra = {} if ulysses_size is None else {"ulysses_size": ulysses_size}
    return init_context_parallel_group(cp_size=world_size(), device_type="cpu", **extra)


@functools.cache
def _yunchang_hybrid_groups(size: int) -> None:
    import yunchang

    yunchang.set_seq_parallel_pg(2, size // 2, rank(), size)


def torch_contenders(seq_len: int) -> list[Contender]:
    from bench.torch_cp_adapter import torch_context_parallel
    from cp_dtensor import ring_attention

    group = _group()
    runs = group.runs(seq_len)
    out = [Contender("ours", cp_call(ring_attention, group, True), runs)]
    for method in ("allgather", "alltoall"):
        ctx = lambda m=method: torch_context_parallel(group.cp_mesh, rotate_method=m)  # noqa: E731
        out.append(Contender(f"torch-{method}", sdpa(True), runs, ctx))
    return out


def yunchang_contenders(seq_len: int) -> list[Contender]:
    import yunchang
    from yunchang.kernels import AttnType

    from bench import yunchang_adapter as ya
    from cp_dtensor import ring_attention
    from cp_dtensor.attention.api import STRATEGIES

    ya.patch_for_cpu()
    size, me = world_size(), rank()
    group = _group()
    pg, attn = group.process_group, AttnType.TORCH_FLASH
    basic = ya.runs_of(ya.positions("basic", seq_len, me, size, size, 1))
    out = [
        Contender("ours", cp_call(ring_attention, group, True), group.runs(seq_len)),
        Contender(
            "yunchang-ring-zigzag",
            lambda q, k, v: yunchang.zigzag_ring_flash_attn_func(q, k, v, causal=True, group=pg, attn_type=attn),
            group.runs(seq_len),
            bshd=True,
        ),
        Contender(
            "yunchang-ring-basic",
            lambda q, k, v: yunchang.ring_flash_attn_func(q, k, v, causal=True, group=pg, attn_type=attn),
            basic,
            bshd=True,
        ),
    ]
    if size >= 4 and size % 2 == 0:
        _yunchang_hybrid_groups(size)
        layer = yunchang.LongContextAttention(ring_impl_type="zigzag", attn_type=attn)
        hybrid_runs = ya.runs_of(ya.positions("zigzag", seq_len, me, size, size // 2, 2))
        out.append(Contender("yunchang-hybrid", lambda q, k, v: layer(q, k, v, causal=True), hybrid_runs, bshd=True))
        if "hybrid" in STRATEGIES:
            hgroup = _group(ulysses_size=2)
            out.append(Contender("ours-hybrid", cp_call(STRATEGIES["hybrid"], hgroup, True), hgroup.runs(seq_len)))
    return out


def yunchang_ulysses_check(case: Case, ref: dict[str, torch.Tensor]) -> dict[str, object]:
    """yunchang's Ulysses with torch attention: its error against the reference (not timed)."""
    import yunchang
    from yunchang.kernels import AttnType

    from bench import yunchang_adapter as ya

    runs = ya.runs_of(ya.positions("basic", case.seq_len, rank(), world_size(), world_size(), 1))
    c = Contender(
        "yunchang-ulysses",
        lambda q, k, v: yunchang.UlyssesAttention(dist.group.WORLD, attn_type=AttnType.TORCH_FLASH)(
            q, k, v, causal=True
        ),
        runs,
        bshd=True,
    )
    try:
        with torch.no_grad():
            _, got = c.run(c.inputs(case), backward=False)
        return {"max_abs_err": worst(max_errors(got, rows(ref, runs)))}
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"[:500]}


# ---------------------------------------------------------------------------------------- suites
def run_suite(case: Case, contenders: list[Contender], repeats: int, *, backward: bool, memory: bool) -> dict:
    """Check every contender against the reference, then alternate them ``repeats`` times."""
    inputs = {c.name: c.inputs(case) for c in contenders}
    entry: dict = {"case": case.as_dict(), "backward": backward, "contenders": {}}
    if not memory:  # at the memory size a reference would dominate the peak: compare with ours instead
        ref = reference(case, backward)
    for c in contenders:
        res: dict = {"reps": []}
        try:
            if not memory:  # warm-up run, and agreement with the reference
                _, got = c.run(inputs[c.name], backward=backward)
                res["max_abs_err"] = worst(max_errors(got, rows(ref, c.runs)))
        except Exception as err:
            res = {"error": f"{type(err).__name__}: {err}"[:500]}
        entry["contenders"][c.name] = res
    if not memory:
        if any(c.name.startswith("yunchang") for c in contenders):
            entry["yunchang_ulysses"] = yunchang_ulysses_check(case, ref)
        del ref
    ours_result = None
    for rep in range(repeats):
        for c in contenders:
            res = entry["contenders"][c.name]
            if "error" in res:
                continue
            timing, got = c.run(inputs[c.name], backward=backward, memory=memory)
            res["reps"].append(gather_objects(timing))
            if memory and rep == 0:  # same shards as ours: compare directly
                if c.name == "ours":
                    ours_result = got
                elif ours_result is not None and c.runs == contenders[0].runs:
                    res["max_abs_diff_vs_ours"] = worst(max_errors(got, ours_result))
            del got
    if rank() == 0:
        _ratios(entry, memory)
    return entry


def _ratios(entry: dict, memory: bool) -> None:
    ours = entry["contenders"]["ours"]["reps"]
    for res in entry["contenders"].values():
        if "error" in res:
            continue
        wall = [max(r["wall"] for r in rep) for rep in res["reps"]]
        cpu = [sum(r["cpu"] for r in rep) for rep in res["reps"]]
        res["wall"] = summary(wall)
        res["cpu_sum"] = summary(cpu)
        ours_wall = [max(r["wall"] for r in rep) for rep in ours]
        ours_cpu = [sum(r["cpu"] for r in rep) for rep in ours]
        res["ours_over_theirs_wall"] = summary([o / t for o, t in zip(ours_wall, wall)])
        res["ours_over_theirs_cpu"] = summary([o / t for o, t in zip(ours_cpu, cpu)])
        if memory:
            peak = [max(r["peak_rss_bytes"] for r in rep) for rep in res["reps"]]
            ours_peak = [max(r["peak_rss_bytes"] for r in rep) for rep in ours]
            res["peak_rss_bytes_max_rank"] = summary(peak)
            res["ours_over_theirs_peak"] = summary([o / t for o, t in zip(ours_peak, peak)])


def main(argv=None) -> None:
    args = parse_args(argv)
    init_rank()
    started = now()
    reps_at = {int(k): int(v) for k, v in (i.split(":") for i in args.repeats_at.split(",") if i)}
    make = yunchang_contenders if args.suite == "yunchang" else torch_contenders
    backward = args.suite != "yunchang"
    extra: dict = {}
    if args.suite == "yunchang":
        from bench import yunchang_adapter

        extra["yunchang_version"] = yunchang_adapter.version()
    if args.suite == "memory":
        extra["malloc_mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    cases = []
    for seq_len in args.seq:
        case = Case(seq_len, args.heads, args.head_dim, causal=True)
        log(f"peers[{args.suite}]: P={world_size()} {case}")
        entry = run_suite(
            case, make(seq_len), reps_at.get(seq_len, args.repeats), backward=backward, memory=args.suite == "memory"
        )
        cases.append(entry)
        for name, res in entry["contenders"].items() if rank() == 0 else ():
            log(
                f"  {name}: "
                + (
                    res.get("error")
                    or f"ours/theirs wall {res['ours_over_theirs_wall']['median']:.3f}"
                    f" err {res.get('max_abs_err') or res.get('max_abs_diff_vs_ours')}"
                )
            )
    out = args.out or RESULTS / f"peers_{args.suite}_p{world_size()}.json"
    write_result(
        out, {"benchmark": f"peers_{args.suite}", "world_size": world_size(), **extra, "cases": cases}, started
    )


if __name__ == "__main__":
    main()
    finish()
