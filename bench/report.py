"""Turn ``bench/results/*.json`` into the tables of ``docs/performance.md`` and its ``perf_*.png`` plots.

    python -m bench.report                      # rewrite the generated parts of the pages + the plots
    python -m bench.report --figures /tmp/f     # only the plots, somewhere else

The page is hand-written prose with generated blocks between ``<!-- BEGIN bench:NAME -->`` and
``<!-- END bench:NAME -->``; only those blocks are rewritten. Nothing is measured here. The same
blocks are rendered into ``bench/README.md`` (the maintainers' appendix, not part of the site):
the performance targets, the full provenance of each result file (commit, uncommitted files,
machine load), which the reader's page leaves out, and the tables of the runs that were measured
under load or on uncommitted code, which the page no longer shows. A block under a table names
its commands only; commits and load averages live in the appendix's provenance table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PAGE = REPO / "docs" / "performance.md"
APPENDIX = REPO / "bench" / "README.md"
FIGURES = REPO / "docs" / "assets" / "figures"
MiB = 2**20
OURS = ("cost_", "balance_", "peers_", "scaling_", "profile_ring_")  # other files in results/ are not this page's

# The code the committed GPU results ran: the commit that added them (36e713c) changed only results and
# docs, so its parent is the measured library. The GPU result files do not record a commit themselves.
GPU_COMMIT = "55c4f3d"

# The performance goals each ratio on the page is compared with (reported next to it, not asserted).
TARGETS = {
    "cost_p4_16k": 1.10,
    "cost_p2": 1.05,
    "balance_zigzag": 1.05,
    "torch_p2": 1.0,
    "torch_p4": 0.95,
    "gpu": 0.90,
}


# ----------------------------------------------------------------------------------------- loading
def load(name: str) -> dict | None:
    """One result file, or ``None`` if it has not been produced."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def load_all(prefix: str) -> list[dict]:
    """Every result file whose name starts with ``prefix``, by name."""
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{prefix}*.json"))]


def fmt(s: dict | None, digits: int = 2) -> str:
    """``median [min-max]`` of a summary."""
    if not s:
        return "-"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def fmt_err(e: dict | None) -> str:
    """The largest of several max errors."""
    return "-" if not e else f"{max(e.values()):.1e}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def is_clean(result: dict) -> bool:
    """Whether a result ran one clean commit (no uncommitted library file)."""
    return not result["machine"].get("uncommitted_library_files")


def provenance(results: list[dict]) -> str:
    """The commands behind a table and how long each ran (the commit and the machine's load of each
    result are the appendix's, ``block_provenance``)."""
    lines = [f"`{r['command']}` ({r['duration_s']:.0f} s)" for r in results]
    return "<small>" + "<br>".join(lines) + "</small>" if lines else ""


# ------------------------------------------------------------------------------------------ tables
def _ours() -> list[dict]:
    return [r for prefix in OURS for r in load_all(prefix)]


def block_machine() -> str:
    every = _ours()
    if not every:
        return "_No results yet: run `bash bench/run_all.sh`._"
    m = every[0]["machine"]
    shown = load_all("peers_torch_") or every  # the CPU timings the page shows
    dates = sorted(r["date"] for r in shown)
    rows = [
        ["CPU", f"{m['cpu_model']}, {m['cores']} cores ({m['cores_usable']} usable), {m['memory_gb']} GB"],
        ["Software", f"torch {m['torch']}, Python {m['python']}, {m['platform']}"],
        ["Threads", f"{m['threads_per_rank']} per rank (`OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`)"],
        ["Measured", f"{dates[0]} to {dates[-1]} (UTC), the machine nearly idle; each table names its command"],
    ]
    return md_table(["", ""], rows)


def block_provenance() -> str:
    """For the maintainers: every result file of the page with its commit, uncommitted files and load."""
    rows = []
    for r in sorted(_ours(), key=lambda r: r["date"]):
        m = r["machine"]
        dirty = sorted(f.split()[-1] for f in m.get("uncommitted_library_files", []))
        name = r["command"].split("--out ")[-1].split()[0] if "--out " in r["command"] else r["benchmark"]
        start, end = m.get("load_average_at_start"), m.get("load_average_at_end")
        load = f"{start[0]:.1f} to {end[0]:.1f}" if start and end else "-"
        rows.append(
            [f"`{name}`", r["date"], f"`{m['git_commit']}`", ", ".join(dirty) if dirty else "none (clean)", load]
        )
    return md_table(["result", "measured", "commit", "uncommitted library files", "1-min load, start to end"], rows)


def block_cost() -> str:
    results = load_all("cost_")
    rows = []
    for r in sorted(results, key=lambda r: r["world_size"]):
        for entry in r["cases"]:
            c = entry["case"]
            for name, res in entry["strategies"].items():
                if "error" in res:
                    rows.append(
                        [r["world_size"], _k(c["seq_len"]), _mask(c), name, f"error: {res['error'][:80]}", *["-"] * 6]
                    )
                    continue
                rows.append(
                    [
                        r["world_size"],
                        _k(c["seq_len"]),
                        _mask(c),
                        name,
                        fmt(res["ratio_fwd"]),
                        fmt(res.get("ratio_fwd_bwd")),
                        fmt(res.get("kernel_ratio_fwd_bwd")),
                        fmt(res.get("main_other_ratio_fwd_bwd")),
                        fmt(res.get("comm_threads_ratio_fwd_bwd")),
                        fmt(res["wall_speedup"]),
                        fmt_err(res["max_abs_err"]),
                    ]
                )
    rows.sort(
        key=lambda row: (
            row[0],
            int(row[1].rstrip("K")) * (1024 if row[1].endswith("K") else 1),
            row[2] != "causal",
            row[3] != "ring",
            row[3],
        )
    )
    # Narrow tables for the page's column: "P, seq" and "strategy, mask" share a column each.
    case = [[f"{row[0]}, {row[1]}", f"{row[3]}, {row[2]}"] for row in rows]
    cost = [[*c, *row[4:7]] for c, row in zip(case, rows)]
    split = [[*c, *row[7:9]] for c, row in zip(case, rows) if row[7] != "-" or row[8] != "-"]
    other = [[*c, *row[9:]] for c, row in zip(case, rows)]
    head = ["P, seq", "strategy, mask"]
    return "\n\n".join(
        [
            md_table([*head, "cost fwd", "cost fwd+bwd", "of which: kernels"], cost),
            "Where the rest of the fwd+bwd cost goes (per-thread CPU clocks, runs that measured it):",
            md_table([*head, "main thread outside kernels", "other threads (gloo)"], split),
            "Wall-clock speed-up over the single process, and agreement with it:",
            md_table([*head, "wall speed-up", "max abs err"], other),
            provenance(results),
        ]
    )


def _k(seq: int) -> str:
    return f"{seq // 1024}K" if seq % 1024 == 0 else str(seq)


def _mask(case: dict) -> str:
    return "causal" if case["causal"] else "full"


def block_balance() -> str:
    results = sorted(load_all("balance_"), key=lambda r: r["world_size"])
    rows = []
    for r in results:
        for entry in r["cases"]:
            for layout, res in entry["layouts"].items():
                rows.append(
                    [
                        f"{r['world_size']}, {_k(entry['case']['seq_len'])}",
                        layout,
                        fmt(res["kernel_max_over_mean"], 3),
                        f"{res['planned_max_over_mean']:.3f}",
                        fmt(res["cpu_max_over_mean"], 3),
                    ]
                )
    header = [
        "P, seq",
        "layout",
        "kernel time max/mean (measured)",
        "pairs max/mean (planned)",
        "process CPU max/mean",
    ]
    return md_table(header, rows) + "\n\n" + provenance(results)


def block_peers_torch() -> str:
    results = sorted(load_all("peers_torch_"), key=lambda r: r["world_size"])
    rows = []
    for r in results:
        for entry in r["cases"]:
            for name, res in entry["contenders"].items():
                if name == "ours":
                    continue
                if "error" in res:
                    rows.append(
                        [r["world_size"], _k(entry["case"]["seq_len"]), name, f"error: {res['error'][:80]}", "", "", ""]
                    )
                    continue
                rows.append(
                    [
                        r["world_size"],
                        _k(entry["case"]["seq_len"]),
                        name,
                        fmt(res["ours_over_theirs_wall"], 3),
                        fmt(res["ours_over_theirs_cpu"], 3),
                        fmt(res["wall"], 2),
                        fmt_err(res.get("max_abs_err")),
                    ]
                )
            ours = entry["contenders"]["ours"]
            rows.append(
                [
                    r["world_size"],
                    _k(entry["case"]["seq_len"]),
                    "**ours** (ring, zigzag)",
                    "1",
                    "1",
                    fmt(ours.get("wall"), 2),
                    fmt_err(ours.get("max_abs_err")),
                ]
            )
    ratios = md_table(["P", "seq", "contender", "our wall / theirs", "our CPU s / theirs"], [r[:5] for r in rows])
    absolute = md_table(
        ["P", "seq", "contender", "wall s (slowest rank)", "max abs err"], [[*r[:3], *r[5:]] for r in rows]
    )
    return ratios + "\n\n" + absolute + "\n\n" + provenance(results)


def block_peers_memory() -> str:
    results = load_all("peers_memory_")
    rows = []
    for r in results:
        for entry in r["cases"]:
            for name, res in entry["contenders"].items():
                if "error" in res:
                    rows.append(
                        [r["world_size"], _k(entry["case"]["seq_len"]), name, f"error: {res['error'][:80]}", "", ""]
                    )
                    continue
                per_rank = [round(x["peak_rss_bytes"] / MiB) for x in res["reps"][0]]
                s = res["peak_rss_bytes_max_rank"]
                rows.append(
                    [
                        r["world_size"],
                        _k(entry["case"]["seq_len"]),
                        name,
                        f"{s['median'] / MiB:.0f} [{s['min'] / MiB:.0f}-{s['max'] / MiB:.0f}]",
                        ", ".join(map(str, per_rank)),
                        fmt(res["ours_over_theirs_peak"], 3) if name != "ours" else "1",
                    ]
                )
    header = ["P", "seq", "contender", "peak MiB above start, worst rank", "per rank (first repeat)", "ours / theirs"]
    return md_table(header, rows) + "\n\n" + provenance(results)


def _paired_wall(ours: dict, theirs: dict) -> dict:
    """Summary of ``ours / theirs`` slowest-rank wall times, repeat by repeat."""
    walls = [[max(r["wall"] for r in rep) for rep in c["reps"]] for c in (ours, theirs)]
    ratios = [o / t for o, t in zip(*walls)]
    return {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios), "n": len(ratios)}


def block_peers_yunchang() -> str:
    results = sorted(load_all("peers_yunchang_"), key=lambda r: r["world_size"])
    rows = []
    for r in results:
        for entry in r["cases"]:
            for name, res in entry["contenders"].items():
                if "error" in res:
                    rows.append(
                        [r["world_size"], _k(entry["case"]["seq_len"]), name, f"error: {res['error'][:80]}", "", ""]
                    )
                    continue
                ratio = "1" if name == "ours" else fmt(res["ours_over_theirs_wall"], 3)
                if name == "ours-hybrid" and "error" not in entry["contenders"].get("yunchang-hybrid", {"error": 1}):
                    ratio = "vs yunchang-hybrid: " + fmt(_paired_wall(res, entry["contenders"]["yunchang-hybrid"]), 3)
                rows.append(
                    [
                        r["world_size"],
                        _k(entry["case"]["seq_len"]),
                        name,
                        ratio,
                        fmt(res["wall"], 3),
                        fmt_err(res.get("max_abs_err")),
                    ]
                )
            uly = entry.get("yunchang_ulysses", {})
            rows.append(
                [
                    r["world_size"],
                    _k(entry["case"]["seq_len"]),
                    "yunchang-ulysses (not timed)",
                    "-",
                    "-",
                    uly.get("error", fmt_err(uly.get("max_abs_err"))) + " (wrong)"
                    if uly.get("max_abs_err") and max(uly["max_abs_err"].values()) > 1e-3
                    else fmt_err(uly.get("max_abs_err")),
                ]
            )
    version = results[0].get("yunchang_version") if results else None
    header = [
        "P, seq",
        "contender",
        "our wall / theirs (fwd; our ring unless noted)",
        "wall s (slowest rank)",
        "max abs err",
    ]
    rows = [[f"{row[0]}, {row[1]}", *row[2:]] for row in rows]  # one column less: the page's width
    return (
        (f"yunchang {version}, forward only.\n\n" if version else "")
        + md_table(header, rows)
        + "\n\n"
        + provenance(results)
    )


def block_scaling() -> str:
    r = load("scaling_p4")
    if not r:
        return "_Not measured yet._"
    rows = []
    for pt in r["points"]:
        c = pt["case"]
        if "error" in pt:
            rows.append([_k(c["seq_len"]), f"error: {pt['error'][:100]}", "", "", ""])
            continue
        start = max(x["rss_start_bytes"] for x in pt["reps"][0]) / MiB
        rows.append(
            [
                _k(c["seq_len"]),
                fmt(pt["wall"], 1),
                fmt(pt["cpu_sum"], 1),
                f"{pt['peak_rss_bytes_max_rank']['median'] / MiB:.0f}",
                f"{start:.0f}",
            ]
        )
    ext = extrapolate_memory(r)
    header = [
        "seq",
        "wall s",
        "CPU s, all ranks",
        "peak MiB above start, worst rank",
        "RSS at start MiB (inputs, torch)",
    ]
    note = ""
    if ext:
        note = (
            f"\n\nPer-rank memory grows by {ext['bytes_per_token'] / 1024:.2f} KiB per token of the global sequence "
            f"(fit over the measured lengths); 4 ranks would fill {ext['budget_gb']:.0f} GB at about "
            f"{ext['max_seq'] / 1e6:.1f}M tokens, where one causal fwd+bwd would take about "
            f"{ext['hours']:.0f} hours of wall time at the measured O(L^2) rate (extrapolated, not run)."
        )
    return md_table(header, rows) + note + "\n\n" + provenance([r])


def extrapolate_memory(r: dict, budget_gb: float = 22.0) -> dict | None:
    """Linear fit of the worst rank's (start + peak) memory against L, and the L that fills the budget."""
    pts = [p for p in r["points"] if "error" not in p]
    if len(pts) < 2:
        return None
    xs = [p["case"]["seq_len"] for p in pts]
    ys = [max(x["rss_start_bytes"] + x["peak_rss_bytes"] for x in p["reps"][0]) for p in pts]
    slope = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
    intercept = ys[0] - slope * xs[0]
    max_seq = (budget_gb * 2**30 / r["world_size"] - intercept) / slope
    wall = pts[-1]["wall"]["median"] * (max_seq / xs[-1]) ** 2
    return {"bytes_per_token": slope, "budget_gb": budget_gb, "max_seq": max_seq, "hours": wall / 3600}


def block_profile() -> str:
    out = []
    for r in sorted(load_all("profile_ring_"), key=lambda r: r["world_size"]):
        names = sorted({row["name"] for rk in r["ranks"] for row in rk["labels"]})
        header = ["label"] + [f"rank {rk['rank']} s (calls)" for rk in r["ranks"]]
        rows = []
        for n in names:
            row = [f"`{n}`"]
            for rk in r["ranks"]:
                hit = [x for x in rk["labels"] if x["name"] == n]
                row.append(f"{hit[0]['cpu_total_s']:.2f} ({hit[0]['calls']})" if hit else "-")
            rows.append(row)
        rows.append(
            ["process CPU s / wall s of the call"]
            + [f"{rk['timing']['cpu']:.2f} / {rk['timing']['wall']:.2f}" for rk in r["ranks"]]
        )
        ops = r["ranks"][0]["top_ops"][:8]
        ops_table = md_table(
            ["operator (rank 0)", "self s", "calls"],
            [[f"`{o['name']}`", f"{o['self_cpu_s']:.3f}", o["calls"]] for o in ops],
        )
        c = r["case"]
        out.append(
            f"**P = {r['world_size']}**, seq {c['seq_len']}, causal fwd+bwd, heads {c['heads']}, "
            f"head_dim {c['head_dim']}, fp32\n\n"
            + md_table(header, rows)
            + "\n\n"
            + ops_table
            + "\n\n"
            + provenance([r])
        )
    return "\n\n".join(out) if out else "_Not measured yet._"


def block_gpu() -> str:
    r = load("gpu_blocks")
    if not r:
        return (
            "_Not measured yet: no GPU was available. Run `python -m bench.gpu_blocks` on a machine with one GPU; "
            "it writes `bench/results/gpu_blocks.json` and this table is regenerated from it._"
        )
    rows = [
        [
            x["seq_len"],
            x["P"],
            fmt(x["efficiency_fwd"], 3),
            fmt(x["efficiency_fwd_bwd"], 3),
            fmt(x["max_rank_share_fwd_bwd"], 3),
            fmt(x["tflops_fwd_bwd_full"], 0),
            fmt(x["tflops_fwd_bwd_blocks"], 0),
            fmt_err(x["max_abs_err"]),
        ]
        for x in r["results"]
    ]
    efficiency = md_table(
        ["seq", "P", "efficiency fwd", "efficiency fwd+bwd", "slowest rank's share"], [x[:5] for x in rows]
    )
    rates = md_table(["seq", "P", "TFLOP/s full", "TFLOP/s blocks", "max abs err"], [[*x[:2], *x[5:]] for x in rows])
    return f"{r['device']}, torch {r['torch']}, CUDA {r['cuda']}: `{r['command']}`\n\n{efficiency}\n\n{rates}"


def block_memory_harness() -> str:
    r = load("memory_cpu")
    if not r:
        return (
            "_The per-rank memory of the transformer model vs P comes from the memory harness "
            "(`bench.memory_measure`); it is rendered here from `bench/results/memory_cpu.json` once measured._"
        )
    cases = [c["summary"] for c in r["cases"]]
    single = {c["seq_len"]: c["measured_activation_peak_bytes"] for c in cases if c["cp_size"] == 1}
    rows = [
        [
            _k(c["seq_len"]),
            c["cp_size"],
            f"{c['measured_peak_bytes'] / MiB:.0f}",
            f"{c['measured_activation_peak_bytes'] / MiB:.0f}",
            f"{c['measured_activation_peak_bytes'] / single[c['seq_len']]:.2f}" if c["seq_len"] in single else "-",
            f"{c['relative_error']:+.1%}",
        ]
        for c in sorted(cases, key=lambda c: (c["seq_len"], c["cp_size"]))
    ]
    header = ["seq", "P", "peak per rank MiB", "activation peak MiB", "activations vs P = 1", "estimator error"]
    model = r["cases"][0]["ranks"][0].get("model", {})
    what = ", ".join(f"{k} {model[k]}" for k in ("hidden_size", "num_layers", "num_heads") if k in model)
    return (
        f"The memory harness's measurement of the small transformer ({what}, fp32, forward + backward; "
        f"command, machine and code on the [Memory](memory.md) page):\n\n" + md_table(header, rows)
    )


# ----------------------------------------------------------------------------------------- summary
# The page's summary: only results measured on one commit on a quiet machine (their provenance is the
# appendix's block "summary-sources"); each row says what a reader can do with it.
SUMMARY_SOURCES = {
    "PyTorch's CP": "peers_torch_p4",
    "GPU kernels": "gpu_blocks",
    "torch.compile": "compile_step",
    "memory estimate, CPU": "memory_cpu",
    "memory estimate, GPU": "gpu/memory_gpu",
    "memory options": "memory_options_all_on_16k",
    "their time": "memory_options_time",
}


def _long_sequence_bytes_per_token(options: dict) -> float:
    """The estimator's per-rank bytes per token of the sequence past the point where the peak moves
    (the memory options' model at P = 4, between 64K and 256K tokens)."""
    from bench.memory_options import MODEL
    from cp_dtensor import estimate_context_parallel_memory_savings as estimate

    shape = dict(**MODEL, dtype="fp32", batch_size=1, cp_size=4, **options)
    low, high = (estimate(seq_len=n, **shape)["with_cp_gb"] * 2**30 for n in (65536, 262144))
    return (high - low) / (262144 - 65536)


def block_summary() -> str:
    rows = []
    torch_cp = load(SUMMARY_SOURCES["PyTorch's CP"])
    if torch_cp:
        case = next(e for e in torch_cp["cases"] if e["case"]["seq_len"] == 16384)
        ag, a2a = (
            case["contenders"][n]["ours_over_theirs_wall"]["median"] for n in ("torch-allgather", "torch-alltoall")
        )
        rows.append(
            [
                "[Ring vs PyTorch's CP](#against-pytorchs-context-parallelism), CPU, 4 ranks, 16K tokens",
                f"wall time {ag:.2f}x its all-gather rotation's, {a2a:.2f}x its all-to-all's",
                "Either is fine: same kernels, same blocks",
            ]
        )
    gpu = load(SUMMARY_SOURCES["GPU kernels"])
    if gpu:
        p8 = sorted((x for x in gpu["results"] if x["P"] == 8), key=lambda x: -x["seq_len"])
        rates = ", ".join(f"{x['efficiency_fwd_bwd']['median']:.2f} at {_k(x['seq_len'] // 8)}" for x in p8)
        rows.append(
            [
                f"[Ring kernels on a GPU](#the-block-kernels-on-one-gpu) vs one flash call, {gpu['device']}, 8 ranks",
                f"{rates} tokens per rank",
                "Keep 16K or more tokens per GPU",
            ]
        )
    comp = load(SUMMARY_SOURCES["torch.compile"])
    if comp:
        rows.append(
            [
                "[`torch.compile`](#torchcompile) of the job's step, CPU, cp 2",
                f"{comp['eager_over_compiled']['median']:.2f}x faster at the median; "
                f"{comp['compile_s']:.0f} s to compile once",
                "Compile long runs; skip it for short tests",
            ]
        )
    cpu, gpu_mem = load(SUMMARY_SOURCES["memory estimate, CPU"]), load(SUMMARY_SOURCES["memory estimate, GPU"])
    if cpu and gpu_mem:
        worst = max(abs(c["summary"]["relative_error"]) for c in cpu["cases"])
        errors = [c["summary"]["relative_error"] for c in gpu_mem["cases"]]
        rows.append(
            [
                "[Memory estimate](memory.md#checked-against-the-real-model) vs the allocator's peak",
                f"CPU: within {worst:.1%} ({len(cpu['cases'])} cases); "
                f"{gpu_mem['device']}: {min(errors):+.0%} to {max(errors):+.0%}",
                "Plan with it; on CUDA it is an upper bound",
            ]
        )
    check = load(SUMMARY_SOURCES["memory options"])
    if check:
        base = _long_sequence_bytes_per_token({})
        both = _long_sequence_bytes_per_token({"loss_chunk_size": 256, "activation_checkpointing": "full"})
        worst = max(r["peak_bytes"] for r in check["ranks"])
        error = next(r for r in check["ranks"] if r["peak_bytes"] == worst)["estimate"]["total"] / worst - 1
        rows.append(
            [
                "[Chunked loss + full activation checkpointing]"
                "(memory.md#fitting-more-tokens-chunked-loss-and-activation-checkpointing)",
                f"{base / both:.1f}x fewer bytes per token on long sequences (estimator; "
                f"{error:+.1%} against a measured peak at {_k(check['seq_len'])} tokens)",
                "Turn both on when memory binds",
            ]
        )
    times = load(SUMMARY_SOURCES["their time"])
    if times:
        t = times["vs_today"]
        rows.append(
            [
                "[Their cost in step time](memory.md#what-each-option-costs-in-time), CPU, 2 ranks",
                f"both {t['all on (chunked + full AC)']['median']:.2f}x, selective checkpointing alone "
                f"{t['selective AC']['median']:.2f}x",
                "Try selective first",
            ]
        )
    return md_table(["question", "measured", "what to do"], rows)


def block_summary_sources() -> str:
    """For the maintainers: where each row of the page's summary comes from."""
    rows = []
    for what, name in SUMMARY_SOURCES.items():
        r = load(name)
        if r is None:
            continue
        m = r.get("machine")
        commit = GPU_COMMIT if name.startswith("gpu") else None
        if isinstance(m, dict) and m.get("git_commit"):
            commit = m["git_commit"] + ("" if is_clean(r) else " (uncommitted library files)")
        commit = commit or r.get("commit") or SUMMARY_COMMITS.get(name, "-")
        if isinstance(m, dict):
            load_avg = m.get("load_average_at_end") or m.get("loadavg_1m")
            load_avg = load_avg[0] if isinstance(load_avg, list) else load_avg
        else:
            load_avg = (r.get("load_average_after") or [None])[0]
        rows.append(
            [
                what,
                f"`bench/results/{name}.json`",
                f"`{commit}`",
                "-" if load_avg is None else f"{load_avg:.1f}",
                SUMMARY_NOTES.get(name, ""),
            ]
        )
    return md_table(["summary row", "result", "code", "1-min load at the end", "note"], rows)


# Commits of results whose JSON records none (from the commits that added them; see the notes below).
SUMMARY_COMMITS = {"memory_cpu": "ff24753", "memory_options_all_on_16k": "2d16121", "compile_step": "fcbdb4f"}
SUMMARY_NOTES = {
    "peers_torch_p4": "clean tree; load 2.6 at the start",
    "gpu_blocks": "one H200 to itself; the JSON records no commit: 36e713c added it and changed only "
    "results and docs, so the code is its parent",
    "compile_step": "empty compile cache; whether the tree was clean is not recorded",
    "memory_cpu": "bytes, not time: load does not change them; committed with the code it measured",
    "gpu/memory_gpu": "same run as gpu_blocks",
    "memory_options_all_on_16k": "bytes; the row's factor is the estimator's, this file checks it",
    "memory_options_time": "both options alternate with the baseline in the same processes",
}


# ------------------------------------------------------------------------------------------ targets
def _find_cost(P: int, seq: int, causal: bool, strategy: str = "ring") -> dict | None:
    for r in load_all("cost_"):
        if r["world_size"] != P:
            continue
        for e in r["cases"]:
            if e["case"]["seq_len"] == seq and e["case"]["causal"] == causal:
                res = e["strategies"].get(strategy)
                if res and "error" not in res:
                    return res
    return None


def block_targets() -> str:
    rows = []

    def add(what, target, measured, ok):
        status = "-" if ok is None else ("met" if ok else "**missed**")
        rows.append([what, target, measured, status])

    res = _find_cost(4, 16384, True)
    s = res and res.get("ratio_fwd_bwd")
    add(
        "CPU cost of CP, seq 16K, P=4, causal fwd+bwd (ring)",
        f"<= {TARGETS['cost_p4_16k']}",
        fmt(s, 3),
        None if not s else s["median"] <= TARGETS["cost_p4_16k"],
    )
    for seq in (8192, 16384):
        res = _find_cost(2, seq, True)
        s = res and res.get("ratio_fwd_bwd")
        if s:
            add(
                f"CPU cost of CP, P=2, seq {_k(seq)}, causal fwd+bwd (ring)",
                f"<= {TARGETS['cost_p2']}",
                fmt(s, 3),
                s["median"] <= TARGETS["cost_p2"],
            )
    for r in load_all("balance_"):
        if r["world_size"] in (4, 8):
            s = r["cases"][0]["layouts"]["zigzag"]["kernel_max_over_mean"]
            add(
                f"Load balance, zigzag, P={r['world_size']} (kernel time max/mean)",
                f"<= {TARGETS['balance_zigzag']}",
                fmt(s, 3),
                s["median"] <= TARGETS["balance_zigzag"],
            )
    for r in sorted(load_all("peers_torch_"), key=lambda r: r["world_size"]):
        P = r["world_size"]
        goal = TARGETS["torch_p2"] if P == 2 else TARGETS["torch_p4"]
        for e in r["cases"]:
            for name in ("torch-allgather", "torch-alltoall"):
                res = e["contenders"].get(name)
                if res and "error" not in res:
                    s = res["ours_over_theirs_wall"]
                    add(
                        f"Wall vs PyTorch CP ({name}), P={P}, seq {_k(e['case']['seq_len'])}, causal fwd+bwd",
                        f"<= {goal}",
                        fmt(s, 3),
                        s["median"] <= goal,
                    )
    for r in load_all("peers_memory_"):
        for e in r["cases"]:
            res = e["contenders"].get("torch-allgather")
            if res and "error" not in res:
                s = res["ours_over_theirs_peak"]
                add(
                    f"Peak memory per rank vs PyTorch CP (allgather), P={r['world_size']},"
                    f" seq {_k(e['case']['seq_len'])}",
                    "well under 1",
                    fmt(s, 3),
                    s["median"] < 0.9,
                )
    g = load("gpu_blocks")
    if g:
        for x in g["results"]:
            s = x["efficiency_fwd_bwd"]
            add(
                f"GPU block efficiency, seq {_k(x['seq_len'])}, P={x['P']}, fwd+bwd",
                f">= {TARGETS['gpu']}",
                fmt(s, 3),
                s["median"] >= TARGETS["gpu"],
            )
    else:
        add("GPU block efficiency, fwd+bwd", f">= {TARGETS['gpu']}", "not measured (no GPU)", None)
    return md_table(["target", "goal", "measured: median [min-max]", "status"], rows)


BLOCKS = {
    "summary": block_summary,
    "summary-sources": block_summary_sources,
    "machine": block_machine,
    "targets": block_targets,
    "cost": block_cost,
    "balance": block_balance,
    "peers-torch": block_peers_torch,
    "peers-memory": block_peers_memory,
    "peers-yunchang": block_peers_yunchang,
    "scaling": block_scaling,
    "profile": block_profile,
    "gpu": block_gpu,
    "memory-harness": block_memory_harness,
    "provenance": block_provenance,
}


def render_page(text: str, blocks: dict | None = None) -> str:
    """Replace every generated block of the page (or only ``blocks``)."""
    for name, fn in (BLOCKS if blocks is None else blocks).items():
        pattern = re.compile(rf"(<!-- BEGIN bench:{name} -->\n).*?(<!-- END bench:{name} -->)", re.S)
        if pattern.search(text):
            body = fn().rstrip("\n") + "\n"
            text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    return text


# ------------------------------------------------------------------------------------------ figures
def make_plots(out: Path) -> list[Path]:
    """Draw every ``perf_*.png`` whose results exist into ``out``; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    save = {"dpi": 120, "bbox_inches": "tight", "metadata": {"Software": None}}
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fn in (_plot_cost, _plot_balance, _plot_peers, _plot_scaling):
        fig = fn(plt)
        if fig is not None:
            path = out / f"perf_{fn.__name__.removeprefix('_plot_')}.png"
            fig.savefig(path, **save)
            plt.close(fig)
            written.append(path)
    return written


def _errbar(ax, x, summaries, **kw):
    med = [s["median"] for s in summaries]
    lo = [s["median"] - s["min"] for s in summaries]
    hi = [s["max"] - s["median"] for s in summaries]
    return ax.bar(x, med, yerr=[lo, hi], capsize=3, **kw)


def _plot_cost(plt):
    results = load_all("cost_")
    bars = []  # (label, strategy, summary)
    for r in sorted(results, key=lambda r: r["world_size"]):
        for e in r["cases"]:
            for name, res in e["strategies"].items():
                if "error" not in res and res.get("ratio_fwd_bwd"):
                    c = e["case"]
                    bars.append((f"P={r['world_size']}\n{_k(c['seq_len'])} {_mask(c)}", name, res["ratio_fwd_bwd"]))
    if not bars:
        return None
    labels = list(dict.fromkeys(b[0] for b in bars))
    names = list(dict.fromkeys(b[1] for b in bars))
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(labels) + 2), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs, ss = [], []
        for j, label in enumerate(labels):
            hit = [b[2] for b in bars if b[0] == label and b[1] == name]
            if hit:
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ss.append(hit[0])
        _errbar(ax, xs, ss, width=width, label=name)
    ax.axhline(1.0, color="gray", lw=1)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("sum of ranks' CPU s / one process's SDPA")
    ax.set_title("Cost of CP on CPU, fwd+bwd (median, min-max; the limit is 1.0)")
    ax.set_ylim(0.9, max(1.15, max(b[2]["max"] for b in bars) + 0.03))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _plot_balance(plt):
    results = sorted(load_all("balance_"), key=lambda r: r["world_size"])
    if not results:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    Ps = [r["world_size"] for r in results]
    for i, layout in enumerate(("zigzag", "contiguous")):
        ss = [r["cases"][0]["layouts"][layout]["kernel_max_over_mean"] for r in results]
        _errbar(ax, [j + (i - 0.5) * 0.38 for j in range(len(Ps))], ss, width=0.38, label=f"{layout}, measured")
        planned = [r["cases"][0]["layouts"][layout]["planned_max_over_mean"] for r in results]
        ax.plot(
            [j + (i - 0.5) * 0.38 for j in range(len(Ps))],
            planned,
            "k_",
            ms=18,
            mew=2,
            label="planned (pairs)" if i == 0 else None,
        )
    ax.set_xticks(range(len(Ps)), [f"P={p}" for p in Ps])
    ax.set_ylabel("max / mean of per-rank kernel time")
    ax.set_title(f"Causal load balance, seq {_k(results[0]['cases'][0]['case']['seq_len'])} fwd+bwd")
    ax.legend(fontsize=8)
    return fig


def _plot_peers(plt):
    bars = []
    for r in sorted(
        load_all("peers_torch_") + load_all("peers_yunchang_"), key=lambda r: (r["benchmark"], r["world_size"])
    ):
        for e in r["cases"]:
            for name, res in e["contenders"].items():
                if name.startswith("ours") or "error" in res:
                    continue
                bars.append((f"{name}\nP={r['world_size']} {_k(e['case']['seq_len'])}", res["ours_over_theirs_wall"]))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(max(7, 0.55 * len(bars) + 2), 4.2))
    _errbar(
        ax, range(len(bars)), [b[1] for b in bars], width=0.7, color=["C0" if "torch" in b[0] else "C2" for b in bars]
    )
    ax.axhline(1.0, color="gray", lw=1)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7, rotation=90)
    ax.set_ylabel("our ring's wall time / theirs (< 1: ours faster)")
    ax.set_title("Against the peers, same inputs, alternating (torch: fwd+bwd; yunchang: fwd)")
    return fig


def _plot_scaling(plt):
    r = load("scaling_p4")
    if not r:
        return None
    pts = [p for p in r["points"] if "error" not in p]
    xs = [p["case"]["seq_len"] for p in pts]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.loglog(xs, [p["wall"]["median"] for p in pts], "o-", label="wall s, causal fwd+bwd")
    ax.loglog(xs, [p["cpu_sum"]["median"] for p in pts], "^-", label="CPU s, all ranks")
    ax.loglog(
        xs, [p["peak_rss_bytes_max_rank"]["median"] / MiB for p in pts], "s-", label="peak MiB per rank (above start)"
    )
    ax.loglog(
        xs,
        [pts[0]["wall"]["median"] * (x / xs[0]) ** 2 for x in xs],
        ":",
        color="gray",
        label="O(L^2) from the first point",
    )
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xticks(xs, [_k(x) for x in xs])
    ax.set_xlabel("sequence length")
    ax.set_title(f"Scaling at P={r['world_size']} (heads 8, head_dim 64, fp32)")
    ax.legend(fontsize=8)
    return fig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--figures", type=Path, default=None, help="write only the plots, into this folder")
    p.add_argument("--results", type=Path, default=None, help="read the JSON files from here")
    args = p.parse_args(argv)
    if args.results:
        global RESULTS
        RESULTS = args.results
    if args.figures:
        for path in make_plots(args.figures):
            print(f"wrote {path}")
        return
    for path in (PAGE, APPENDIX):
        path.write_text(render_page(path.read_text()))
        print(f"rewrote the generated blocks of {path}")
    for path in make_plots(FIGURES):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
