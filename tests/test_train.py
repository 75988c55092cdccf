"""The recall dataset, and the training job end to end: one process vs four ranks, kill -> resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mp_pool
import pytest
import torch
import warm_launch
import work_limits

from cp_dtensor import shift_labels
from cp_dtensor.nn.loss import IGNORE_INDEX
from cp_dtensor.training import LongSequenceDataset, ModelConfig, TransformerWithCP
from cp_dtensor.training.train import TrainConfig, attention_within_own_shard, lr_at, parse_args

REPO = Path(__file__).resolve().parents[1]

# ---- the dataset --------------------------------------------------------------------------------


def test_dataset_is_deterministic_and_every_label_is_the_queried_pairs_value():
    ds = LongSequenceDataset(seq_len=256, num_pairs=6, num_keys=8, num_values=10, seed=3)
    item = ds[5]
    assert all(torch.equal(item[k], ds[5][k]) for k in item)  # a pure function of (seed, index)
    assert not torch.equal(
        item["input_ids"], LongSequenceDataset(256, num_pairs=6, num_keys=8, num_values=10, seed=4)[5]["input_ids"]
    )
    ids, labels = item["input_ids"], item["labels"]
    assert (labels != IGNORE_INDEX).sum() == ds.num_queries
    for q, src in zip(item["query_positions"].tolist(), item["source_positions"].tolist()):
        pair = int(ids[src]) - ds.pair_start
        key, value = divmod(pair, ds.num_values)
        assert src < ds.context_len <= q
        assert int(ids[q]) == ds.key_start + key  # the query asks for the pair's key...
        assert int(labels[q]) == ds.value_start + value  # ...and its label is the pair's value
    pairs = ids[: ds.context_len][(ids[: ds.context_len] >= ds.pair_start) & (ids[: ds.context_len] < ds.filler_start)]
    assert len(pairs) == ds.num_pairs
    assert len(set(((pairs - ds.pair_start) // ds.num_values).tolist())) == ds.num_pairs  # distinct keys
    assert len(set(((pairs - ds.pair_start) % ds.num_values).tolist())) == ds.num_pairs  # distinct values
    assert ds.chance_accuracy == 1 / 10


def test_dataset_puts_answers_on_other_shards():
    ds = LongSequenceDataset(seq_len=512)
    assert ds.remote_fraction(1) == 0
    # Pairs are uniform over the context; under zigzag the query's rank holds 1/P of it.
    assert 0.4 < ds.remote_fraction(2, "zigzag") < 0.65
    assert 0.65 < ds.remote_fraction(4, "zigzag") < 0.85


@pytest.mark.parametrize("num_documents", [2, 5])
def test_packed_documents_are_whole_recall_tasks(num_documents):
    ds = LongSequenceDataset(seq_len=300, num_pairs=5, num_keys=6, num_values=7, num_documents=num_documents, seed=1)
    item = ds[3]
    assert all(torch.equal(item[k], ds[3][k]) for k in item)  # still a pure function of (seed, index)
    ids, labels, docs = item["input_ids"], item["labels"], item["document_ids"]
    lengths = torch.bincount(docs).tolist()
    assert docs.tolist() == sorted(docs.tolist()) and len(lengths) == num_documents  # 0, 0, ..., D-1 in order
    assert sum(lengths) == 300 and min(lengths) >= ds.min_document_len
    assert len(set(lengths)) > 1  # random lengths, not equal splits
    assert (labels != IGNORE_INDEX).sum() == ds.answers_per_sequence == num_documents * 5
    for q, src in zip(item["query_positions"].tolist(), item["source_positions"].tolist()):
        assert docs[q] == docs[src] and src < q  # the answer lies earlier in the query's own document
        key, value = divmod(int(ids[src]) - ds.pair_start, ds.num_values)
        assert int(ids[q]) == ds.key_start + key and int(labels[q]) == ds.value_start + value
    end = torch.cumsum(torch.tensor(lengths), 0) - 1  # every document ends with its last query's value
    assert (ids[end] >= ds.value_start).all() and (ids[end] < ds.pair_start).all()
    # One document is the unpacked task: the same tokens, document ids all 0.
    one = LongSequenceDataset(seq_len=300, num_pairs=5, num_keys=6, num_values=7, seed=1)[3]
    assert one["document_ids"].eq(0).all() and one["query_positions"].min() >= 300 - 2 * 5


def test_dataset_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="num_pairs=9 must be <= num_keys=8"):
        LongSequenceDataset(seq_len=256, num_pairs=9)
    with pytest.raises(ValueError, match="seq_len=20 is too short"):
        LongSequenceDataset(seq_len=20)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        LongSequenceDataset(seq_len=0)
    with pytest.raises(ValueError, match=r"need seq_len >= 96 \(num_documents \* min_document_len = 4 \* 24\)"):
        LongSequenceDataset(seq_len=95, num_documents=4)
    with pytest.raises(ValueError, match="num_documents must be a positive int"):
        LongSequenceDataset(seq_len=95, num_documents=0)


def test_shift_labels_uses_the_next_token_of_the_full_sequence():
    ids = torch.tensor([[5, 6, 7, 8]])
    assert shift_labels(ids).tolist() == [[6, 7, 8, IGNORE_INDEX]]
    mask = torch.tensor([[True, False, True, True]])  # position 1 is no target
    assert shift_labels(ids, mask).tolist() == [[IGNORE_INDEX, 7, 8, IGNORE_INDEX]]
    # Packed documents [0, 0, 1, 1] then padding: no label crosses into the next document or comes from padding.
    ids, docs = torch.tensor([[5, 6, 7, 8, 9, 9]]), torch.tensor([[0, 0, 1, 1, -1, -1]])
    assert shift_labels(ids, document_ids=docs).tolist() == [
        [6, IGNORE_INDEX, 8, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    ]


def test_packed_dataset_labels_stay_inside_their_document():
    item = LongSequenceDataset(seq_len=256, num_documents=4, seed=3)[0]
    labelled = (item["labels"] != IGNORE_INDEX).nonzero().flatten()
    assert len(labelled) > 0
    assert torch.equal(item["document_ids"][labelled], item["document_ids"][labelled + 1])


# ---- the job's configuration ----------------------------------------------------------------------


def test_every_config_field_is_a_flag():
    cfg = parse_args(["--seq-len", "64", "--cp", "1", "--strategy", "ring", "--resume", "--dtype", "float64"])
    assert (cfg.seq_len, cfg.cp, cfg.strategy, cfg.resume, cfg.dtype) == (64, 1, "ring", True, "float64")
    assert parse_args([]) == TrainConfig()
    cfg = parse_args(["--packed", "3", "--window", "64"])
    assert (cfg.packed, cfg.window, cfg.no_document_mask) == (3, 64, False)


def test_packed_and_window_flags_become_attention_masks():
    from cp_dtensor.training.train import attention_kwargs

    docs = torch.tensor([[0, 0, 1, 1, 1, 2]])
    kw = attention_kwargs(TrainConfig(packed=3, window=4), docs)
    assert torch.equal(kw["document_ids"], docs) and kw["window"] == (3, 0)  # itself and the 3 before
    assert attention_kwargs(TrainConfig(), docs) == {}
    assert attention_kwargs(TrainConfig(packed=3, no_document_mask=True), docs) == {}


def test_strategy_and_memory_flags_reach_the_model():
    from cp_dtensor.training.train import model_config

    flags = ["--strategy", "auto", "--ac", "selective", "--loss-chunk-size", "5", "--mlp-tile-size", "3"]
    config = model_config(parse_args(flags), vocab_size=32)
    assert (config.strategy, config.activation_checkpointing) == ("auto", "selective")
    assert (config.loss_chunk_size, config.mlp_tile_size, config.vocab_size) == (5, 3, 32)
    default = model_config(parse_args([]), vocab_size=32)
    assert (default.strategy, default.loss_chunk_size, default.mlp_tile_size) == ("ring", None, None)  # 0: off


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--packed", "-1"], "--packed -1 must be >= 0"),
        (["--window", "0"], "--window 0 must be >= 1"),
        (["--mlp-tile-size", "-1"], "--mlp-tile-size -1 must be >= 0"),
        (["--no-document-mask"], "--no-document-mask needs --packed N"),
        (["--compile", "--grad-sync", "fsdp"], "--compile with --grad-sync fsdp is not supported yet"),
        (["--compile", "--loss-chunk-size", "64"], "--compile with --loss-chunk-size 64 is not supported yet"),
    ],
)
def test_bad_packing_flags_fail_loudly(flags, message):
    from cp_dtensor.training.train import _setup  # the job's first step: checks the flags before any process group

    with pytest.raises(ValueError, match=message):
        _setup(parse_args(flags))


def test_a_sequence_too_short_for_its_documents_names_the_flags():
    from cp_dtensor.training.train import _datasets

    with pytest.raises(ValueError, match=r"--seq-len 512, --packed 30.*need seq_len >= 720"):
        _datasets(parse_args(["--packed", "30", "--seq-len", "512"]))


def test_lr_warms_up_then_decays_to_a_tenth():
    cfg = TrainConfig(lr=1.0, warmup=10, steps=110)
    assert lr_at(5, cfg) == pytest.approx(0.5)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(110, cfg) == pytest.approx(0.1)


# ---- the job, end to end (torchrun subprocesses where the launch is tested, else the rank pool) --------

TINY = [
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--hidden-size",
    "16",
    "--num-heads",
    "2",
    "--num-layers",
    "1",
    "--num-pairs",
    "4",
    "--num-keys",
    "4",
    "--num-values",
    "4",
    "--steps",
    "6",
    "--warmup",
    "2",
    "--eval-samples",
    "8",
    "--log-every",
    "1",
    "--dtype",
    "float64",
    "--seed",
    "5",
]


# Work budget of one run of the job at TINY size, all its processes together: four ranks spend about
# 25 CPU seconds on the 2-core CI machine, most of it starting Python and torch.
JOB_CPU_S = 150


def job_argv(out: Path, *flags: str) -> list[str]:
    """The job's arguments after the launcher: TINY, its JSON summary in ``out``, then ``flags``."""
    return ["-m", "cp_dtensor.training", *TINY, "--out", str(out), *flags]


def job_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_job(tmp: Path, name: str, *flags: str, nproc: int = 4) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run the job (``torchrun --standalone`` for nproc > 1, else ``python``), return the process and its
    JSON summary (None if none). The command runs as forks of the preloaded server (tests/warm_launch.py:
    the same command line, environment and exit status, without paying torch's import per process);
    :func:`torchrun_launches` starts torchrun itself, where the launch is what is tested."""
    out = tmp / f"{name}.json"
    launcher = ["torchrun", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable]
    proc = warm_launch.run([*launcher, *job_argv(out, *flags)], cpu_s=JOB_CPU_S, cwd=REPO, env=job_env())
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def job_case(flags: list[str]) -> dict:
    """Runs on every rank of a pool: the job as ``main`` runs it (train, then rank 0 prints the summary),
    minus the launch and the teardown of the process group. Returns rank 0's printout and the summary
    as its JSON file would hold it. For the cases that test the job's computation, not its launch."""
    import contextlib
    import io

    import torch.distributed as dist

    from cp_dtensor.training.train import _print_summary, train

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = train(parse_args([*TINY, *flags]))
        if dist.get_rank() == 0:
            _print_summary(summary)
    return {"stdout": printed.getvalue(), "summary": json.loads(json.dumps(summary))}


def pool_job(*flags: str, nproc: int = 4) -> tuple[str, dict]:
    """:func:`job_case` on a pool of ``nproc`` ranks: rank 0's printout and summary."""
    rank0 = mp_pool.run_on_ranks(nproc, job_case, list(flags))[0]
    return rank0["stdout"], rank0["summary"]


def losses(summary: dict) -> dict[int, float]:
    return {c["step"]: c["loss"] for c in summary["curve"]}


@pytest.fixture(scope="module")
def torchrun_launches(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess | Exception]]:
    """torchrun itself, its agents and their workers, where the launch is what is tested: one agent of
    4 ranks (dp 2 x cp 2, six steps, a checkpoint every two; ``uninterrupted``) and two agents of 2
    ranks as two nodes of the same job (the c10d rendezvous a multi-node run uses). Started side by
    side: each launch alone leaves a core idle part of the time (rendezvous, ranks waiting on each
    other). Returns their directory and each agent's result (its process, or the limit it hit)."""
    tmp = tmp_path_factory.mktemp("launches")
    # The two agents' rendezvous store, held here (as torchrun's agent on the endpoint's host would), on
    # a port the OS picks as it binds: no window between choosing a free port and binding it.
    store = mp_pool.serve_store()
    one = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2"]
    agent += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{store.port}", "--rdzv-id", "two-agents"]
    agent += ["--rdzv-conf", "is_host=false", "--local-addr", "127.0.0.1"]  # the store is the test's
    commands = {
        "one agent": [*one, *job_argv(tmp / "one_agent.json", "--ckpt-dir", str(tmp / "ckpt"), "--save-every", "2")],
        "agent a": [*agent, *job_argv(tmp / "two_agents.json")],
        "agent b": [*agent, *job_argv(tmp / "two_agents.json")],
    }
    jobs = {name: work_limits.Job(argv, cpu_s=JOB_CPU_S, cwd=REPO, env=job_env()) for name, argv in commands.items()}
    results = work_limits.wait_all(jobs)
    del store  # held until both agents ended
    return tmp, results


@pytest.fixture(scope="module")
def uninterrupted(torchrun_launches) -> dict:
    """Four ranks (dp 2 x cp 2) under one torchrun agent, six steps, a checkpoint every two."""
    tmp, results = torchrun_launches
    proc = results["one agent"]
    assert isinstance(proc, subprocess.CompletedProcess) and proc.returncode == 0, f"one agent: {proc}"
    summary = json.loads((tmp / "one_agent.json").read_text())
    assert (summary["dp"], summary["cp"]) == (2, 2)
    return summary


def test_two_agents_of_two_ranks_reproduce_one_agent_of_four(torchrun_launches, uninterrupted):
    """Two torchrun agents on this machine, as two nodes of 2 ranks, run the job of ``uninterrupted``
    (one agent of 4 ranks, dp 2 x cp 2) with the c10d rendezvous a multi-node run uses: each agent's
    ranks are consecutive global ranks, so each cp ring stays inside a "node" and the dp all-reduce
    crosses them, as docs/running.md explains."""
    tmp, results = torchrun_launches
    for node in ("agent a", "agent b"):
        proc = results[node]
        assert isinstance(proc, subprocess.CompletedProcess) and proc.returncode == 0, f"{node}: {proc}"
    summary = json.loads((tmp / "two_agents.json").read_text())
    assert (summary["world_size"], summary["dp"], summary["cp"]) == (4, 2, 2)
    # Bitwise: the same global ranks on the same mesh do the same sums in the same order; which agent
    # a rank runs under changes nothing it computes.
    assert losses(summary) == losses(uninterrupted)
    assert summary["eval_accuracy"] == uninterrupted["eval_accuracy"]


def test_kill_mid_save_then_resume_reproduces_the_losses(uninterrupted, tmp_path):
    ckpt = tmp_path / "ckpt"
    # Killed (os._exit on every rank) inside step 4's save, after the data is written, before it is published.
    proc, _ = run_job(
        tmp_path, "b", "--ckpt-dir", str(ckpt), "--save-every", "2", "--crash-at-step", "4", "--crash-in-save"
    )
    assert proc.returncode != 0
    assert sorted(p.name for p in ckpt.iterdir()) == [".tmp_step_00000004", "step_00000002"]
    _, resumed = pool_job("--ckpt-dir", str(ckpt), "--save-every", "2", "--resume")  # (resuming needs no launch)
    assert resumed["first_step"] == 3  # from the last complete checkpoint
    expected = losses(uninterrupted)
    # fp64; model, optimizer and data position restored exactly, so only the order of the gradient
    # all-reduce's sums may differ (DDP rebuilds its buckets after the first step of each run).
    for step, loss in losses(resumed).items():
        assert loss == pytest.approx(expected[step], rel=1e-12, abs=0), step
    assert resumed["eval_accuracy"] == pytest.approx(uninterrupted["eval_accuracy"], abs=0)


def test_resume_onto_more_ranks_reproduces_the_losses(uninterrupted, tmp_path):
    """Saved by one process, resumed by four (dp 2 x cp 2): weights, optimizer and data position carry over."""
    ckpt = tmp_path / "ckpt"
    proc, _ = run_job(tmp_path, "one", "--ckpt-dir", str(ckpt), "--save-every", "2", "--crash-at-step", "2", nproc=1)
    assert proc.returncode != 0 and sorted(p.name for p in ckpt.iterdir()) == ["step_00000002"]
    _, resumed = pool_job("--ckpt-dir", str(ckpt), "--save-every", "2", "--resume")
    assert (resumed["dp"], resumed["cp"], resumed["first_step"]) == (2, 2, 3)
    # fp64; the one-process steps and the four-rank steps sum in other orders only (as below).
    for step, loss in losses(resumed).items():
        assert loss == pytest.approx(losses(uninterrupted)[step], rel=1e-10, abs=0), step


def test_one_process_run_matches_four_ranks_and_fails_below_min_accuracy(uninterrupted, tmp_path):
    # The same global batch in one process (cp = dp = 1): the same computation, so the same losses.
    proc, single = run_job(tmp_path, "single", "--min-accuracy", "1.01", nproc=1)
    assert (single["dp"], single["cp"]) == (1, 1)
    # fp64; sharding changes only the order of sums (ring blocks, gradient all-reduce).
    for step, loss in losses(single).items():
        assert loss == pytest.approx(losses(uninterrupted)[step], rel=1e-10, abs=0), step
    assert proc.returncode == 3, "an accuracy below --min-accuracy must fail the job"
    assert "FAILED: eval accuracy" in proc.stdout


def test_packed_windowed_job_on_four_ranks_matches_one_process():
    # --packed 2: two recall documents per 32-token sequence; --window 6: each token sees itself and 5 before.
    flags = ("--packed", "2", "--window", "6")
    printed, four = pool_job(*flags)
    assert (four["dp"], four["cp"]) == (2, 2) and "2 packed documents (document mask)" in printed
    _, single = pool_job(*flags, nproc=1)
    # fp64; the same masked computation, sharded or not: only the order of sums differs.
    for step, loss in losses(single).items():
        assert loss == pytest.approx(losses(four)[step], rel=1e-10, abs=0), step
    # The dispatch strategy (only the K/V rows the masks need move) trains the same model.
    _, dispatched = pool_job(*flags, "--strategy", "dispatch")
    for step, loss in losses(single).items():
        assert loss == pytest.approx(losses(dispatched)[step], rel=1e-10, abs=0), step
    # The masks reach the attention: dropping either changes the losses (beyond rounding).
    for name, changed in (
        ("nomask", ("--packed", "2", "--window", "6", "--no-document-mask")),
        ("nowindow", ("--packed", "2")),
    ):
        _, other = pool_job(*changed, nproc=1)
        assert abs(losses(other)[6] - losses(single)[6]) > 1e-6, name


# ---- the counterfactual the job reports: the same weights without context parallelism -------------

OWN_SHARD_CONFIG = ModelConfig(vocab_size=16, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)


def own_shard_case(ids_BL: torch.Tensor) -> dict[str, torch.Tensor]:
    """Runs on every rank (cp 2): local logits with the ring, then with each rank on its own shard."""
    group, alone = mp_pool.group(2), mp_pool.group(1, dp_size=2)
    torch.manual_seed(0)
    model = TransformerWithCP(OWN_SHARD_CONFIG, cp_group=group).double()
    ids_local = group.partition_sequence(ids_BL, seq_dim=1)
    with attention_within_own_shard(model, alone):
        own = model(ids_local, return_logits=True)
    try:
        with attention_within_own_shard(model, group):
            error = None
    except ValueError as e:
        error = str(e)
    return {
        "error": error,
        "positions": group.position_ids(ids_BL.shape[1]),
        "own": own,
        "ring": model(ids_local, return_logits=True),  # the real group is back
    }


def own_shard_oracle(ids_BL: torch.Tensor, positions: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """One process: the whole sequence, and each shard's tokens as a sequence of their own."""
    torch.manual_seed(0)
    model = TransformerWithCP(OWN_SHARD_CONFIG, cp_group=mp_pool.group(1)).double()
    full = model(ids_BL, return_logits=True)
    own = [model(ids_BL[:, pos], return_logits=True, position_ids=pos) for pos in positions]
    return {"ring": [full[:, pos] for pos in positions], "own": own}


def test_attention_within_own_shard_sees_only_the_shard_and_restores_the_ring():
    ids_BL = torch.randint(0, OWN_SHARD_CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ranks = mp_pool.run_on_ranks(2, own_shard_case, ids_BL)
    (oracle,) = mp_pool.run_on_ranks(1, own_shard_oracle, ids_BL, [r["positions"] for r in ranks])
    for rank, r in enumerate(ranks):
        # fp64; the same attention over the same keys, so only the order of sums differs.
        torch.testing.assert_close(r["own"], oracle["own"][rank], rtol=0, atol=1e-12)
        torch.testing.assert_close(r["ring"], oracle["ring"][rank], rtol=0, atol=1e-12)
        assert (r["own"] - r["ring"]).abs().max() > 1e-3  # without the other shard's keys the logits change
        assert r["error"] == "own_shard must be a one-rank cp group, got cp size 2."


# ---- the recorded default run (the README's first command) ----------------------------------------


def test_the_recorded_default_run_is_the_default_job_and_makes_its_point():
    """``docs/assets/data/train_curve.json`` is what the README's first command prints, with today's defaults.

    Re-record it after changing a default: ``OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4
    -m cp_dtensor.training --out docs/assets/data/train_curve.json``.
    """
    from dataclasses import asdict

    summary = json.loads((REPO / "docs" / "assets" / "data" / "train_curve.json").read_text())
    recorded = {k: v for k, v in summary["config"].items() if k != "out"}
    assert recorded == {k: v for k, v in asdict(TrainConfig()).items() if k != "out"}
    assert (summary["dp"], summary["cp"], summary["backend"]) == (2, 2, "gloo")
    assert summary["steps_run"] == TrainConfig().steps
    # The point of the job: answers whose pair sits on another cp rank are recalled as well as the
    # others, and only through context-parallel attention: each rank alone, the same weights still
    # recall the local ones but fall to near chance (1 / 8) on the others.
    assert summary["eval_accuracy"] >= 0.9 and summary["eval_accuracy_remote"] >= 0.9
    assert summary["own_shard_accuracy_local"] >= 0.9
    assert summary["own_shard_accuracy_remote"] < 0.25


def test_the_readme_quotes_the_recorded_default_runs_last_lines(capsys):
    from cp_dtensor.training.train import _print_summary

    _print_summary(json.loads((REPO / "docs" / "assets" / "data" / "train_curve.json").read_text()))
    printed = capsys.readouterr().out.splitlines()
    last = "\n".join(printed[next(i for i, line in enumerate(printed) if line.startswith("held-out recall")) :])
    assert f"```text\n{last}\n```" in (REPO / "README.md").read_text()


def test_each_rank_alone_is_measured_alike_under_every_strategy(uninterrupted):
    # fp64: the strategies train the same weights up to rounding, and each rank alone is the same
    # one-rank attention under all of them, so every recall agrees exactly.
    keys = ("eval_accuracy", "own_shard_accuracy_local", "own_shard_accuracy_remote")
    for strategy in (["--strategy", "ulysses"], ["--strategy", "hybrid", "--ulysses-size", "2"]):
        printed, summary = pool_job(*strategy)
        assert "each rank alone" in printed
        assert [summary[k] for k in keys] == [uninterrupted[k] for k in keys], strategy
