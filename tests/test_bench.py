"""Smoke test of the benchmark suite: every script runs at a tiny size and its contenders agree.

No timing is asserted (benchmarks are measurements, see bench/__init__.py). Each benchmark runs with
its ``torchrun`` command (its ranks forked from a process that imported torch: tests/warm_launch.py)
under a work limit, all of them at once (they are small; this keeps the test short), and each
test checks one script's JSON: the fields the report reads, and that ours, the other registered
strategies and the peers give the same attention as one process's fused SDPA.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import warm_launch
import work_limits

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Work budget of one benchmark run, its ranks together (tests/work_limits.py); the largest spend about
# 30 CPU seconds on the 2-core CI machine.
CPU_S = 240
TINY = ["--heads", "2", "--head-dim", "16"]
# fp32 against fp32 SDPA: the blocks are summed and merged in another order than one kernel call.
FP32_TOL = 1e-4
# yunchang is a peer of the benchmark, not a dependency of the library; CI installs it with
# `pip install yunchang==0.6.4 --no-deps` (torch is its only hard dependency).
HAS_YUNCHANG = importlib.util.find_spec("yunchang") is not None

RUNS = {  # name: (ranks, module, args)
    "cost": (2, "bench.cost", ["--seq", "256", "--repeats", "1", *TINY]),
    "balance": (2, "bench.balance", ["--seq", "256", "--repeats", "1", *TINY]),
    "document_balance": (
        2,
        "bench.document_balance",
        ["--seq", "512", "--short", "32", "--mean", "64", "--repeats", "1", *TINY],
    ),
    "peers_torch": (2, "bench.peers", ["--suite", "torch", "--seq", "256", "--repeats", "1", *TINY]),
    "peers_memory": (2, "bench.peers", ["--suite", "memory", "--seq", "512", "--repeats", "1", *TINY]),
    "scaling": (2, "bench.scaling", ["--seq", "256", "512", *TINY]),
    "profile": (2, "bench.profile_ring", ["--seq", "256", *TINY]),
    # yunchang's hybrid needs 4 ranks; heads 4 so that Ulysses 2 x ring 2 splits them
    "peers_yunchang": (
        4,
        "bench.peers",
        ["--suite", "yunchang", "--seq", "256", "--repeats", "1", "--heads", "4", "--head-dim", "16"],
    ),
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict[str, dict]:
    """Launch every benchmark at once; return each one's JSON (or raise with its output)."""
    out_dir = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "131072"}
    procs = {}
    for name, (nproc, module, args) in RUNS.items():
        cmd = [
            "torchrun",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            module,
            *args,
            "--out",
            str(out_dir / f"{name}.json"),
        ]
        procs[name] = warm_launch.WarmJob(cmd, cpu_s=CPU_S, cwd=REPO, env=env)
    results, failures = {}, {}
    for name, proc in work_limits.wait_all(procs).items():
        if isinstance(proc, work_limits.LimitExceeded):
            failures[name] = str(proc)
        elif proc.returncode != 0:
            failures[name] = proc.stdout[-3000:] + proc.stderr[-3000:]
        else:
            results[name] = json.loads((out_dir / f"{name}.json").read_text())
    results["_failures"] = failures
    return results


def get(smoke: dict, name: str) -> dict:
    assert name not in smoke["_failures"], smoke["_failures"][name]
    return smoke[name]


def test_provenance(smoke):
    r = get(smoke, "cost")
    assert r["command"].startswith("OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m bench.cost")
    assert {"cpu_model", "cores", "torch", "threads_per_rank"} <= set(r["machine"]) and r["machine"][
        "threads_per_rank"
    ] == 1
    assert r["date"]


def test_cost_every_registered_strategy_agrees(smoke):
    from cp_dtensor.attention.api import STRATEGIES

    r = get(smoke, "cost")
    assert [e["case"]["causal"] for e in r["cases"]] == [True, False]
    for entry in r["cases"]:
        assert len(entry["baseline"]) == 1 and set(entry["strategies"]) == set(STRATEGIES)
        for name, res in entry["strategies"].items():
            assert "error" not in res, (name, res)
            assert set(res["max_abs_err"]) == {"out", "dq", "dk", "dv"}
            assert max(res["max_abs_err"].values()) < FP32_TOL, (name, res["max_abs_err"])
            for key in ("ratio_fwd", "ratio_fwd_bwd", "kernel_ratio_fwd_bwd", "wall_speedup"):
                assert res[key]["n"] == 1 and res[key]["min"] > 0, key
            assert len(res["reps"][0]["per_rank"]) == 2


def test_balance_plans_and_measures_both_layouts(smoke):
    entry = get(smoke, "balance")["cases"][0]
    # Note [Causal load balance]: zigzag plans equal work. Contiguous, chunk c: rank r computes its
    # causal diagonal c (c + 1) / 2 plus r full blocks c^2 (max/mean -> (2P - 1) / P for large c).
    c = 128
    pairs = [c * (c + 1) // 2 + r * c * c for r in range(2)]
    assert entry["layouts"]["zigzag"]["planned_max_over_mean"] == 1.0
    assert entry["layouts"]["contiguous"]["planned_max_over_mean"] == pytest.approx(max(pairs) / (sum(pairs) / 2))
    for res in entry["layouts"].values():
        assert res["kernel_max_over_mean"]["min"] >= 1.0 and len(res["kernel_seconds_per_rank"][0]) == 2


def test_document_balance_counts_every_visible_pair_and_balances_per_document(smoke):
    result = get(smoke, "document_balance")
    for name, entry in result["experiments"].items():
        lengths = entry["document_lengths"]
        assert sum(lengths) + entry["padding_tokens"] == entry["seq_len"]
        for layout, res in entry["layouts"].items():
            # every layout places every query once: the ranks' pairs add up to the causal documents' pairs
            assert sum(res["visible_pairs_per_rank"]) == sum(n * (n + 1) // 2 for n in lengths), (name, layout)
            assert len(res["kernel_seconds_per_rank"][0]) == 2 and res["kernel_max_over_zigzag_max"]["n"] == 1
    half = result["experiments"]["half"]["layouts"]  # no padding: per-document zigzag is exact
    assert half["documents"]["visible_pairs_max_over_mean"] == 1.0 < half["zigzag"]["visible_pairs_max_over_mean"]


def test_torch_cp_adapter_agrees_with_ours_and_sdpa(smoke):
    entry = get(smoke, "peers_torch")["cases"][0]
    assert set(entry["contenders"]) == {"ours", "torch-allgather", "torch-alltoall"}
    for name, res in entry["contenders"].items():
        assert "error" not in res, (name, res)
        assert max(res["max_abs_err"].values()) < FP32_TOL, (name, res["max_abs_err"])
        assert res["ours_over_theirs_wall"]["n"] == 1


def test_torch_head_tail_layout_is_our_zigzag():
    from bench.torch_cp_adapter import head_tail_positions
    from cp_dtensor.positions.layout import shard_positions

    for size in (2, 3, 4):
        for rank in range(size):
            assert torch.equal(head_tail_positions(48, size, rank), shard_positions(48, size, rank, "zigzag"))


def test_peers_memory_reports_peaks_and_identical_outputs(smoke):
    entry = get(smoke, "peers_memory")["cases"][0]
    for name, res in entry["contenders"].items():
        assert "error" not in res, (name, res)
        assert all(r["peak_rss_bytes"] >= 0 for r in res["reps"][0])
        if name != "ours":  # same shards, same kernels: compared directly with ours
            assert max(res["max_abs_diff_vs_ours"].values()) < FP32_TOL
            assert res["ours_over_theirs_peak"]["n"] == 1


def test_yunchang_forward_agrees(smoke):
    assert HAS_YUNCHANG, "the yunchang peer is not installed: pip install yunchang==0.6.4 --no-deps"
    r = get(smoke, "peers_yunchang")
    assert r["yunchang_version"] == "0.6.4"
    entry = r["cases"][0]
    assert {"ours", "yunchang-ring-zigzag", "yunchang-ring-basic", "yunchang-hybrid"} <= set(entry["contenders"])
    for name, res in entry["contenders"].items():
        assert "error" not in res, (name, res)
        assert set(res["max_abs_err"]) == {"out"} and res["max_abs_err"]["out"] < FP32_TOL, (name, res)
    # yunchang's Ulysses with torch attention runs its ring over the whole world: the page reports it wrong.
    assert entry["yunchang_ulysses"]["max_abs_err"]["out"] > 0.1


def test_scaling_records_time_and_memory(smoke):
    points = get(smoke, "scaling")["points"]
    assert [p["case"]["seq_len"] for p in points] == [256, 512]
    for p in points:
        assert "error" not in p and p["wall"]["n"] == 1 and p["reps"][0][0]["rss_start_bytes"] > 0


def test_profile_has_the_ring_labels(smoke):
    r = get(smoke, "profile")
    for rank in r["ranks"]:
        names = {row["name"] for row in rank["labels"]}
        assert {
            "cp_dtensor.ring.attn_block",
            "cp_dtensor.ring.attn_block_backward",
            "cp_dtensor.ring.merge",
        } <= names


def test_gpu_blocks_dry_run_agrees(tmp_path):
    from bench import gpu_blocks

    gpu_blocks.main(["--dry-run", "--out", str(tmp_path / "gpu.json")])
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert [(x["seq_len"], x["P"]) for x in r["results"]] == [(512, 2), (512, 4)]
    for x in r["results"]:
        # fp32 on CPU: merged blocks vs one kernel call, summation order only.
        assert max(x["max_abs_err"].values()) < 1e-5, x["max_abs_err"]
        assert x["efficiency_fwd_bwd"]["n"] == 1 and x["kernel_calls_per_rank"]


def test_gpu_check_runs_on_cpu():
    """bench/gpu_check.py (the one-GPU check of every strategy vs fp64) works: here on CPU with gloo.

    Its own comparisons are the test: it exits 1 if any case misses its tolerance.
    """
    cmd = [
        "torchrun",
        "--standalone",
        "--nproc-per-node=1",
        "-m",
        "bench.gpu_check",
        "--cpu",
        "--seq",
        "128",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = warm_launch.run(cmd, cpu_s=CPU_S, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check: 0 failure(s)" in proc.stdout
    from cp_dtensor.attention.api import STRATEGIES

    # every registered strategy x dtypes x masks, + the module per dtype
    assert proc.stdout.count("ok ") == len(STRATEGIES) * 2 * 4 + 2


def test_plan_cost_runs(tmp_path):
    from bench import plan_cost

    plan_cost.main(["--repeats", "1", "--cases", "1", "--out", str(tmp_path / "plan.json")])
    row = json.loads((tmp_path / "plan.json").read_text())["rows"][0]
    assert row["kernel_calls"] > 0 and set(row["cpu_s"]) == {"intervals", "pair_by_pair"}


def test_report_regenerates_the_committed_page(tmp_path):
    """The tables on docs/performance.md and bench/README.md are what bench/report.py makes of the JSON."""
    from bench import report

    page = report.PAGE.read_text()
    # The memory harness's block mirrors another module's results file (bench.memory_measure);
    # it is regenerated with the page but not pinned here, so re-measuring memory never breaks this test.
    pinned = {name: fn for name, fn in report.BLOCKS.items() if name != "memory-harness"}
    assert report.render_page(page, pinned) == page, "run: python -m bench.report"
    appendix = report.APPENDIX.read_text()  # bench/README.md: the targets and the full provenance
    assert report.render_page(appendix, pinned) == appendix, "run: python -m bench.report"
    made = {p.name for p in report.make_plots(tmp_path)}
    committed = {p.name for p in report.FIGURES.glob("perf_*.png")}
    assert made == committed
