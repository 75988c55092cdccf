"""The memory estimator: its math, its inventory against autograd, its estimate against a measured peak, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mp_pool
import pytest
import torch

from cp_dtensor import estimate_context_parallel_memory_savings
from cp_dtensor.estimate.cli import main, parse_tokens
from cp_dtensor.estimate.memory import GIB, ModelDims, default_ffn_hidden_size, estimate_rank_memory, saved_per_token

SEED = dict(seq_len=1_000_000, hidden_size=4096, num_layers=32, batch_size=1, cp_size=8)


def test_seed_example_runs_as_written(capsys):
    savings = estimate_context_parallel_memory_savings(
        seq_len=1_000_000, hidden_size=4096, num_layers=32, batch_size=1, cp_size=8
    )
    print(f"Without CP: {savings['without_cp_gb']:.1f} GB")
    print(f"With CP:    {savings['with_cp_gb']:.1f} GB")
    print(f"Savings:    {savings['savings_gb']:.1f} GB")
    print(f"Reduction:  {savings['reduction_factor']:.1f}x")
    print(f"Max seq len (theoretical): {savings['max_seq_len_with_cp']:,} tokens")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    assert savings["without_cp_gb"] > savings["with_cp_gb"] > 0
    assert savings["savings_gb"] == pytest.approx(savings["without_cp_gb"] - savings["with_cp_gb"])
    assert savings["max_seq_len_with_cp"] > savings["max_seq_len_without_cp"] > 0


@pytest.mark.parametrize("attention", ["flash", "naive"])
@pytest.mark.parametrize("cp_size", [2, 4, 8])
def test_breakdown_sums_to_the_total(attention, cp_size):
    s = estimate_context_parallel_memory_savings(**{**SEED, "cp_size": cp_size, "seq_len": 65536}, attention=attention)
    for key in ("without_cp", "with_cp"):
        assert sum(s["breakdown_gb"][key].values()) == pytest.approx(s[f"{key}_gb"], rel=1e-12)


@pytest.mark.parametrize("cp_size", [2, 4, 8])
def test_flash_activations_per_layer_shrink_exactly_p_fold(cp_size):
    # flash keeps no score matrix: every saved tensor is linear in L / P (exact arithmetic on integers)
    s = estimate_context_parallel_memory_savings(**{**SEED, "cp_size": cp_size})
    per_layer = s["activations_per_layer_gb"]
    assert per_layer["without_cp"] / per_layer["with_cp"] == pytest.approx(cp_size, rel=1e-12)


def test_naive_keeps_the_probability_stripe():
    s = estimate_context_parallel_memory_savings(**SEED, attention="naive")
    b, h, local = 2, 4096 // 128, 1_000_000 // 8
    stripe = b * h * local * 1_000_000 / GIB  # (B, H, L/P, L) bf16 probabilities, one layer
    flash = estimate_context_parallel_memory_savings(**SEED)["activations_per_layer_gb"]["with_cp"]
    assert s["activations_per_layer_gb"]["with_cp"] >= flash + stripe


@pytest.mark.parametrize("attention", ["flash", "naive"])
def test_max_seq_len_is_the_boundary(attention):
    kwargs = dict(hidden_size=1024, num_layers=8, batch_size=1, cp_size=4, num_heads=8, vocab_size=1000)
    s = estimate_context_parallel_memory_savings(seq_len=4096, **kwargs, attention=attention, memory_budget_gb=20.0)
    longest = s["max_seq_len_with_cp"]
    assert longest > 0 and longest % 8 == 0  # zigzag: a multiple of 2P
    dims = ModelDims(1024, 8, 8, 8, default_ffn_hidden_size(1024), 1000)
    common = dict(batch_size=1, cp_size=4, attention=attention)
    assert estimate_rank_memory(dims, seq_len=longest, **common).total <= 20 * GIB
    assert estimate_rank_memory(dims, seq_len=longest + 8, **common).total > 20 * GIB


def _gain(attention: str, cp_size: int, num_layers: int) -> float:
    s = estimate_context_parallel_memory_savings(
        seq_len=4096 * cp_size,
        hidden_size=512,
        num_layers=num_layers,
        batch_size=1,
        cp_size=cp_size,
        num_heads=8,
        vocab_size=1000,
        attention=attention,
        include_weights=False,
        memory_budget_gb=1e6,
    )
    return s["max_seq_len_with_cp"] / s["max_seq_len_without_cp"]


@pytest.mark.parametrize("cp_size", [4, 16])
def test_longest_sequence_grows_p_fold_with_flash_and_sqrt_p_fold_with_naive(cp_size):
    # Activations only, huge budget: flash memory is linear in L/P -> P-fold (the lengths are rounded to 2P).
    assert _gain("flash", cp_size, num_layers=64) == pytest.approx(cp_size, rel=1e-3)
    # naive keeps B H (L/P) L probabilities per layer -> sqrt(P)-fold; the score block of the layer in
    # backward (L^2 at P = 1, L^2/P^2 after) adds a factor sqrt((N + 2) / (N + 2/P)), 1.5% at N = 64.
    assert _gain("naive", cp_size, num_layers=64) == pytest.approx(math.sqrt(cp_size), rel=0.02)


def test_activations_at_cp4_are_under_030_of_cp1_for_the_measured_model():
    # the bound, on the estimator for the documented sweep's model (measured in docs/memory.md)
    for seq_len in (4096, 8192, 16384):
        s = estimate_context_parallel_memory_savings(
            seq_len=seq_len,
            hidden_size=256,
            num_layers=2,
            batch_size=1,
            cp_size=4,
            num_heads=4,
            vocab_size=256,
            dtype="fp32",
        )
        assert 1 / s["activation_reduction_factor"] <= 0.30


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"dtype": "fp8"}, "Invalid dtype 'fp8'. Must be one of: 'fp32', 'bf16', 'fp16'"),
        ({"attention": "sdpa"}, "Invalid attention 'sdpa'. Must be one of: 'flash', 'naive'"),
        ({"optimizer": "adam"}, "Invalid optimizer 'adam'. Must be one of: 'adamw', 'sgd', 'none'"),
        ({"param_sharding": "zero3"}, "Invalid param_sharding 'zero3'. Must be one of: 'replicated', 'ddp'"),
        ({"cp_size": 3}, "seq_len=1000000 must be a multiple of cp_size=3"),
        ({"cp_size": 0}, "cp_size must be a positive int, got 0"),
        ({"seq_len": 2.5}, "seq_len must be a positive int, got 2.5"),
        ({"num_heads": 30}, "num_heads=30 must divide hidden_size=4096"),
        ({"num_kv_heads": 5}, "num_kv_heads=5 must divide num_heads=32"),
        ({"hidden_size": 1000}, "Pass num_heads"),
        ({"memory_budget_gb": -1}, "memory_budget_gb must be a positive number of GiB, got -1"),
        ({"activation_checkpointing": "yes"}, "Invalid activation_checkpointing 'yes'. Must be one of: False, True"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_value_and_options(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        estimate_context_parallel_memory_savings(**{**SEED, **kwargs})


# ---- the inventory against autograd, and the estimate against a measurement (real gloo ranks) ----


def saved_bytes_case(dtype_name: str, num_kv_heads: int | None) -> tuple[int, int, int, int]:
    """Runs on one rank: bytes one decoder block saves for backward (autograd hooks) and the model's size."""
    from cp_dtensor.training.model import ModelConfig, TransformerWithCP

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    group = mp_pool.group(1)
    config = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=num_kv_heads)
    model = TransformerWithCP(config, cp_group=group).to(dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:  # weights are counted as weights, not activations
            saved[storage.data_ptr()] = storage.nbytes()  # views of one storage count once
        return t

    batch, seq_len = 2, 32
    x = torch.randn(batch, seq_len, 64, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[0](x, group.position_ids(seq_len))
    num_params = sum(p.numel() for p in model.parameters())
    return sum(saved.values()), batch * seq_len, config.mlp_size, num_params


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_saved_tensor_inventory_matches_autograd_exactly(dtype, num_kv_heads):
    saved, tokens, mlp_size, num_params = mp_pool.run_on_ranks(1, saved_bytes_case, dtype, num_kv_heads)[0]
    dims = ModelDims(64, 2, 4, num_kv_heads or 4, mlp_size, 64)
    b = {"fp32": 4, "bf16": 2}[dtype]
    rope = 32 * 2 * dims.head_dim * 4  # fp32 cos and sin, (S, D) each
    assert saved == tokens * sum(saved_per_token(dims, b).values()) + rope  # exact: it is an inventory
    assert num_params == dims.num_params()
    assert mlp_size == default_ffn_hidden_size(64)


SMALL = {"vocab_size": 256, "hidden_size": 128, "num_layers": 2, "num_heads": 4}


def measured_case(seq_len: int, cp_size: int) -> dict:
    from bench.memory_measure import measure_case

    torch.set_num_threads(1)
    return measure_case(seq_len, cp_size, model=SMALL, cp_group=mp_pool.group(cp_size), rss=False)


def test_estimate_is_within_20_percent_of_the_measured_peak():
    ranks = mp_pool.run_on_ranks(2, measured_case, 1024, 2)
    for r in ranks:
        estimate, static = r["estimate"]["total"], sum(r["static"].values())
        # the contract (the documented sweep is within ~1%): total peak, and the part above
        # weights, gradients and optimizer state (which are counted exactly on both sides)
        assert estimate == pytest.approx(r["peak_bytes"], rel=0.20)
        assert estimate - static == pytest.approx(r["activation_peak_bytes"], rel=0.20)
        assert r["method"] == "torch.profiler allocator events"


OPTIONS = {
    "chunked loss": {"loss_chunk_size": 96},
    "selective": {"activation_checkpointing": "selective"},
    "full": {"activation_checkpointing": "full"},
    "chunked + full": {"loss_chunk_size": 96, "activation_checkpointing": "full"},
}


def measured_options_case(seq_len: int, cp_size: int) -> dict:
    from bench.memory_measure import measure_case

    torch.set_num_threads(1)
    model = {**SMALL, "vocab_size": 4096}  # a vocabulary large enough for the loss to matter
    group = mp_pool.group(cp_size)
    return {
        name: measure_case(seq_len, cp_size, model={**model, **extra}, cp_group=group, rss=False)
        for name, extra in OPTIONS.items()
    }


def test_estimate_follows_each_memory_option_within_10_percent():
    for rank in mp_pool.run_on_ranks(2, measured_options_case, 1024, 2):
        for name, r in rank.items():
            estimate, static = r["estimate"]["total"], sum(r["static"].values())
            # the per-option contract: 10% of the part above weights, gradients and optimizer state
            assert estimate - static == pytest.approx(r["activation_peak_bytes"], rel=0.10), name


# ---- the command line -------------------------------------------------------------------------


def test_cli_prints_a_table_and_json(capsys):
    args = ["estimate", "--seq-len", "1_000_000", "--hidden-size", "4096", "--num-layers", "32", "--cp-size", "8"]
    assert main(args) == 0
    table = capsys.readouterr().out
    for word in ("weights", "activations", "ring_buffers", "logits", "total (peak)", "longest sequence"):
        assert word in table
    assert main([*args, "--json"]) == 0
    expected = json.loads(json.dumps(estimate_context_parallel_memory_savings(**SEED)))
    assert json.loads(capsys.readouterr().out) == expected


# One non-default value per argument of the estimator, and the same value as the command line spells it.
EVERY_OPTION = {
    "seq_len": (65536, "64K"),
    "hidden_size": (2048, "2048"),
    "num_layers": (4, "4"),
    "batch_size": (2, "2"),
    "cp_size": (4, "4"),
    "num_heads": (32, "32"),
    "num_kv_heads": (2, "2"),
    "ffn_hidden_size": (5632, "5632"),
    "vocab_size": (128_256, "128256"),
    "dtype": ("fp32", "fp32"),
    "attention": ("naive", "naive"),
    "activation_checkpointing": ("selective", "selective"),
    "include_weights": (False, None),  # --no-weights
    "optimizer": ("sgd", "sgd"),
    "memory_budget_gb": (40.0, "40"),
    "dp_size": (2, "2"),
    "param_sharding": ("fsdp", "fsdp"),
    "tie_embeddings": (True, None),  # a flag
    "loss_chunk_size": (1024, "1K"),
    "master_dtype": ("fp32", "fp32"),
    "mlp_tile_size": (2048, "2K"),
}
FLAGS = {"include_weights": "--no-weights"}
BASE = dict(seq_len=32768, hidden_size=1024, num_layers=2, batch_size=1, cp_size=2)


def _cli_args(options: dict) -> list[str]:
    args = []
    for name, (_, text) in options.items():
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        args += [flag] if text is None else [flag, text]
    return args


def test_every_estimator_argument_has_a_test_value_here():
    import inspect

    # a new argument of the estimator must join EVERY_OPTION (and so the command line and the test below)
    assert set(inspect.signature(estimate_context_parallel_memory_savings).parameters) == set(EVERY_OPTION)


@pytest.mark.parametrize("name", sorted(EVERY_OPTION))
def test_cli_and_python_agree_on_each_option(capsys, name):
    base = {**BASE, "param_sharding": "fsdp"} if name == "dp_size" else BASE  # dp_size matters under FSDP only
    options = {k: (v, str(v)) for k, v in base.items()} | {name: EVERY_OPTION[name]}
    assert main(["estimate", *_cli_args(options), "--json"]) == 0
    from_cli = json.loads(capsys.readouterr().out)
    from_python = estimate_context_parallel_memory_savings(**{k: v for k, (v, _) in options.items()})
    assert from_cli == json.loads(json.dumps(from_python))
    assert from_cli["config"][name] == EVERY_OPTION[name][0]  # the option reached the estimator
    default = estimate_context_parallel_memory_savings(**base)
    numbers = {k: v for k, v in from_python.items() if k != "config"}
    assert numbers != {k: v for k, v in default.items() if k != "config"}  # and changed the estimate


def test_cli_and_python_agree_with_every_option_at_once(capsys):
    assert main(["estimate", *_cli_args(EVERY_OPTION), "--json"]) == 0
    from_python = estimate_context_parallel_memory_savings(**{k: v for k, (v, _) in EVERY_OPTION.items()})
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(from_python))


def test_fsdp_mixed_precision_counts_fp32_master_state_for_the_7b_example():
    # FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the sharded weights, gradients
    # and AdamW moments are fp32 (4 + 4 + 8 bytes per parameter over the 8 ranks), the gathered ones bf16
    kwargs = dict(SEED, seq_len=131072, param_sharding="fsdp")
    static = ("weights", "grads", "optimizer_state")
    pure = estimate_context_parallel_memory_savings(**kwargs)["breakdown_gb"]["with_cp"]
    mixed = estimate_context_parallel_memory_savings(**kwargs, master_dtype="fp32")["breakdown_gb"]["with_cp"]
    dims = ModelDims(4096, 32, 32, 32, default_ffn_hidden_size(4096), 32000)
    n = dims.num_params()
    gathered = (n - 32 * dims.layer_params() + dims.layer_params()) * 2  # root + one block, bf16
    assert sum(mixed[k] for k in static) == pytest.approx((16 * n / 8 + gathered) / GIB, rel=1e-12)
    assert round(sum(pure[k] for k in static), 1) == 7.1
    assert round(sum(mixed[k] for k in static), 1) == 13.4
    # the activations are the bf16 ones either way
    assert mixed["activations"] == pure["activations"]


def test_cli_output_shown_in_the_docs_is_current(capsys):
    assert main(["estimate", "--seq-len", "128K", "--hidden-size", "4096", "--num-layers", "32", "--cp-size", "8"]) == 0
    assert capsys.readouterr().out.strip() in (REPO / "docs" / "memory.md").read_text()


def test_cli_rejects_bad_values_with_the_estimators_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["estimate", "--seq-len", "1000", "--hidden-size", "4096", "--num-layers", "2", "--cp-size", "3"])
    assert exit_info.value.code == 2
    assert "seq_len=1000 must be a multiple of cp_size=3" in capsys.readouterr().err


def test_parse_tokens():
    assert parse_tokens("4K") == 4096
    assert parse_tokens("1M") == 1024**2
    assert parse_tokens("1_000_000") == 1_000_000
    with pytest.raises(Exception, match="invalid token count"):
        parse_tokens("lots")


# ---- the page's table and figure come from the committed measurements ---------------------------

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "bench" / "results" / "memory_cpu.json"


def test_docs_table_is_the_committed_measurement_against_the_current_estimator(tmp_path):
    from bench.memory_measure import markdown_table, plot_results

    report = json.loads(REPORT.read_text())
    table = markdown_table(report)  # estimates recomputed now: the page must follow the estimator
    page = (REPO / "docs" / "memory.md").read_text()
    assert table in page, "regenerate it: python -m bench.memory_measure --report bench/results/memory_cpu.json"
    for case in report["cases"]:
        assert len(case["ranks"]) == case["summary"]["cp_size"]
    plot_results(report, tmp_path / "figure.png")
    assert (tmp_path / "figure.png").stat().st_size > 10_000


def test_docs_options_tables_are_the_committed_measurement():
    from bench.memory_options import markdown_tables

    report = json.loads((REPO / "bench" / "results" / "memory_options.json").read_text())
    assert markdown_tables(report) in (REPO / "docs" / "memory.md").read_text(), (
        "regenerate it: python -m bench.memory_options --report bench/results/memory_options.json"
    )


def test_docs_option_times_are_the_committed_measurement():
    from bench.memory_options_time import markdown_table

    report = json.loads((REPO / "bench" / "results" / "memory_options_time.json").read_text())
    assert markdown_table(report) in (REPO / "docs" / "memory.md").read_text(), (
        "the page's time table must be bench/results/memory_options_time.json's (bench.memory_options_time)"
    )
