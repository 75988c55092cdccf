"""The planner: its choice is the best of an exhaustive search, its rejections say why, its inputs parse."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest

from cp_dtensor.estimate.cli import main
from cp_dtensor.estimate.memory import GIB, ModelDims, estimate_rank_memory
from cp_dtensor.estimate.planner import DEVICES, Plan, candidates, dims_from_config, evaluate, plan

LLAMA3_8B = ModelDims(4096, 32, 32, 8, 14336, 128256)
SMALL = ModelDims(512, 4, 8, 2, 1376, 32000)
SETUPS = {
    "8B, 128K, 8 H100": (LLAMA3_8B, dict(seq_len=131072, world_size=8, device="H100")),
    "8B, 32K, 16 A100 in 2 nodes": (LLAMA3_8B, dict(seq_len=32768, world_size=16, device="A100")),
    "small, 16K, 4 CPUs, 2 GiB": (SMALL, dict(seq_len=16384, world_size=4, device="CPU", memory_budget_gib=2.0)),
}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def exhaustive_best(dims: ModelDims, *, seq_len, world_size, device, memory_budget_gib=None, gpus_per_node=8) -> Plan:
    """Every (dp, cp, tp, strategy, u, AC, loss chunk, MLP tile, sharding), written out here, evaluated."""
    dev = DEVICES[device]
    budget = memory_budget_gib or dev.memory_gib
    best = None
    for tp, cp in itertools.product(_divisors(world_size), repeat=2):
        heads = dims.num_heads // tp
        if world_size % (tp * cp) or tp > gpus_per_node or dims.num_heads % tp or seq_len % (2 * cp):
            continue
        if dims.num_kv_heads % tp and tp % dims.num_kv_heads:
            continue
        strategies = [("ring", None), ("allgather", None), ("ulysses", None)] + [("hybrid", u) for u in _divisors(cp)]
        for (strategy, u), ac, chunk, tile, sharding in itertools.product(
            strategies, ("none", "selective", "full"), (None, 4096), (None, 4096), ("ddp", "fsdp")
        ):
            if cp == 1 and (strategy, u) != ("ring", None):
                continue  # one rank: no strategy, the ring stands for it
            if (strategy == "ulysses" and heads % cp) or (strategy == "hybrid" and (u in (1, cp) or heads % u)):
                continue
            candidate = Plan(world_size // (tp * cp), cp, tp, strategy, u, "zigzag", ac, chunk, tile, sharding)
            p = evaluate(
                candidate, dims, seq_len=seq_len, batch_size=1, device=dev, gpus_per_node=gpus_per_node, efficiency=0.4
            )
            options = (ac != "none") + (chunk is not None) + (tile is not None)
            key = (p.seconds_per_token, p.bytes_per_step, p.memory_gib, options, p.describe())
            if p.memory_gib <= budget and (best is None or key < best[0]):
                best = (key, p)
    return best[1]


@pytest.mark.parametrize("name", list(SETUPS))
def test_the_plan_is_the_best_of_an_exhaustive_search(name):
    dims, kwargs = SETUPS[name]
    result = plan(dims, **kwargs)
    assert result.best == exhaustive_best(dims, **kwargs)
    assert result.best.memory_gib <= result.inputs["memory_budget_gib"]
    for runner_up in result.runners_up:  # ranked, and each a different layout
        assert runner_up.seconds_per_token >= result.best.seconds_per_token
    layouts = [(p.dp, p.cp, p.tp, p.strategy, p.ulysses_size) for p in [result.best, *result.runners_up]]
    assert len(set(layouts)) == len(layouts)


def test_memory_is_the_estimators_and_bytes_are_the_comm_models():
    from cp_dtensor.estimate.comm_model import comm_bytes

    candidate = Plan(1, 4, 1, "ring", None, "zigzag", "full", 4096, None, "fsdp")
    p = evaluate(candidate, SMALL, seq_len=16384, batch_size=1, device=DEVICES["CPU"], gpus_per_node=8, efficiency=0.4)
    oracle = estimate_rank_memory(
        SMALL,
        seq_len=16384,
        batch_size=1,
        cp_size=4,
        dtype="bf16",
        master_dtype="fp32",
        activation_checkpointing="full",
        loss_chunk_size=4096,
        param_sharding="fsdp",
    )
    assert p.memory_gib == oracle.total / GIB
    vol = comm_bytes("ring", batch=1, seq_len=16384, heads=8, kv_heads=2, head_dim=64, world_size=4, dtype=_bf16())
    attention = SMALL.num_layers * (vol.total + sum(vol.forward.values()))  # full AC re-runs the forward
    fsdp = 3 / 4 * SMALL.num_params() * (2 + 2 + 4)  # bf16 gathers forward and backward, fp32 reduce-scatter
    assert p.bytes_per_step == int(attention + fsdp)


def test_on_a_cpu_communication_adds_to_compute():
    """A CPU's cores both compute and run gloo: nothing hides, a GPU's step hides the ring's traffic."""
    candidate = Plan(1, 4, 1, "ring", None, "zigzag", "none", None, None, "ddp")
    kwargs = dict(seq_len=16384, batch_size=1, gpus_per_node=8, efficiency=0.4)
    cpu = evaluate(candidate, SMALL, device=DEVICES["CPU"], **kwargs)
    overlapped = evaluate(candidate, SMALL, device=replace(DEVICES["CPU"], overlaps_comm=True), **kwargs)
    sent_s = cpu.bytes_per_step / DEVICES["CPU"].intra_node_gbps  # attention and gradient sync, one node
    assert cpu.bytes_per_step == overlapped.bytes_per_step
    assert cpu.step_time_s - overlapped.step_time_s == pytest.approx(sent_s, rel=1e-9)  # all of it hid


def _bf16():
    import torch

    return torch.bfloat16


def test_rejections_say_why():
    result = plan(ModelDims(8192, 80, 64, 8, 28672, 128256), seq_len=1 << 20, world_size=256, device="H100")
    reasons = {r.what: r.reason for r in result.rejections}
    assert reasons["tp 16"] == "tp 16 > 8 devices per node"
    assert reasons["tp 1 x cp 128, ulysses"] == "cp 128 does not divide the 64 query heads per tp rank"
    assert any("GiB per rank > budget 79 GiB" in r for r in reasons.values())
    assert result.best is not None


def test_nothing_fits_is_an_answer_not_an_error():
    result = plan(LLAMA3_8B, seq_len=1 << 20, world_size=1, device="H100")
    assert result.best is None and result.runners_up == [] and result.rejections


def test_dims_from_a_transformers_config(tmp_path):
    config = {  # Llama-3-8B's config.json, the keys the planner reads
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "model_type": "llama",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert dims_from_config(tmp_path) == LLAMA3_8B
    assert dims_from_config(tmp_path / "config.json") == LLAMA3_8B
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="lacks num_hidden_layers, num_attention_heads, vocab_size"):
        dims_from_config(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"device": "TPU"}, "Invalid device 'TPU'. Must be one of: 'H100', 'H200', 'A100', 'B200', 'CPU'"),
        ({"world_size": 0}, "world_size must be a positive int, got 0"),
        ({"memory_budget_gib": -1}, "memory_budget_gib must be a positive number of GiB, got -1"),
        ({"efficiency": 2}, r"efficiency must be in \(0, 1\], got 2"),
    ],
)
def test_bad_inputs_are_value_errors_naming_them(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        plan(SMALL, **{"seq_len": 4096, "world_size": 4, **kwargs})


def test_cli_plan_equals_python_and_takes_overrides(capsys, tmp_path):
    args = ["plan", "--hidden-size", "512", "--num-layers", "4", "--num-heads", "8", "--num-kv-heads", "2"]
    args += ["--ffn-hidden-size", "1376", "--seq-len", "16K", "--world-size", "4", "--device", "CPU"]
    args += ["--memory-budget-gb", "2", "--peak-tflops", "0.2", "--intra-node-gbps", "8"]
    assert main([*args, "--json"]) == 0
    from_cli = json.loads(capsys.readouterr().out)
    device = replace(DEVICES["CPU"], peak_flops=0.2e12, intra_node_gbps=8e9)
    expected = plan(SMALL, seq_len=16384, world_size=4, device=device, memory_budget_gib=2.0)
    assert from_cli == json.loads(expected.to_json())
    assert main(args) == 0
    table = capsys.readouterr().out
    assert expected.best.describe() in table and "rejected" in table
    with pytest.raises(SystemExit):
        main(["plan", "--seq-len", "4K", "--world-size", "4"])  # no model
    assert "plan needs the model" in capsys.readouterr().err


# ---- strategy="auto" ------------------------------------------------------------------------------


@pytest.mark.parametrize("cross_node", [False, True])
@pytest.mark.parametrize("seq_len", [8192, 131072, 1 << 20])
@pytest.mark.parametrize(("heads", "kv_heads", "cp"), [(32, 8, 8), (64, 8, 16), (8, 1, 16), (32, 32, 4)])
def test_auto_picks_the_fastest_strategy_of_the_time_model(cross_node, seq_len, heads, kv_heads, cp):
    import torch

    from cp_dtensor.estimate.comm_model import comm_bytes
    from cp_dtensor.estimate.planner import attention_choice

    dev = DEVICES["H100"]
    choice = attention_choice(1, seq_len, heads, kv_heads, 128, cp, torch.bfloat16, True, None, dev, cross_node)
    # the oracle, written out: forward + backward attention at 40% of peak against the bytes sent
    bw = dev.inter_node_gbps if cross_node else dev.intra_node_gbps
    compute = 4 * heads * 128 * seq_len * seq_len / cp / 2 * 3.5 / (dev.peak_flops * 0.4)
    names = ["ring", "allgather"] + (["ulysses"] if heads % cp == 0 else [])
    times = {}
    for name in names:
        vol = comm_bytes(
            name,
            batch=1,
            seq_len=seq_len,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=128,
            world_size=cp,
            dtype=torch.bfloat16,
        )
        a2a = sum(n for op, n in [*vol.forward.items(), *vol.backward.items()] if op == "all_to_all")
        times[name] = max(compute, (vol.total - a2a) / bw) + a2a / bw
    assert choice.seconds == pytest.approx(times, rel=1e-12)
    assert times[choice.strategy] == min(times.values())
    assert choice.strategy in choice.reason


def auto_case(causal: bool) -> dict:
    """On 4 gloo ranks: strategy="auto" is the chosen strategy's call (output, gradients, bytes), cached."""
    import mp_pool
    import torch

    from cp_dtensor import ContextParallelAttention, auto_strategy, context_parallel_attention, count_comm
    from cp_dtensor.estimate.planner import attention_choice

    group = mp_pool.group(4)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, h, 16, 8, generator=gen, dtype=torch.float64) for h in (8, 2, 2))
    q, k, v = (group.partition_sequence(t, seq_dim=2).requires_grad_() for t in (q, k, v))
    results = {}
    for strategy in ("auto", auto_strategy(q, k, group, causal=causal).strategy):
        with count_comm() as counter:
            out = context_parallel_attention(q, k, v, group, strategy=strategy, causal=causal)
            out.sum().backward()
        results[strategy] = (out.detach(), [t.grad.clone() for t in (q, k, v)], dict(counter.bytes))
        for t in (q, k, v):
            t.grad = None
    hits = attention_choice.cache_info().hits
    auto_strategy(q, k, group, causal=causal)
    module = ContextParallelAttention(32, 8, group, num_kv_heads=2, strategy="auto").double()
    y = module(torch.randn(2, 4, 32, dtype=torch.float64, generator=gen), position_ids=group.position_ids(16))
    return {"results": results, "cached": attention_choice.cache_info().hits > hits, "module_shape": tuple(y.shape)}


def test_auto_runs_the_chosen_strategy_on_gloo():
    import mp_pool
    import torch

    for rank in mp_pool.run_on_ranks(4, auto_case, True):
        (auto, chosen), (name,) = list(rank["results"].values()), [n for n in rank["results"] if n != "auto"]
        torch.testing.assert_close(auto[0], chosen[0], rtol=0, atol=0)  # the same strategy: bitwise
        for got, want in zip(auto[1], chosen[1], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert auto[2] == chosen[2] and auto[2], name  # and the same bytes
        assert rank["cached"] and rank["module_shape"] == (2, 4, 32)


def test_auto_without_the_planner_names_what_to_import():
    from cp_dtensor import get_strategy

    with pytest.raises(ValueError, match="or 'auto' \\(import cp_dtensor to register it\\)"):
        get_strategy("auto")


# ---- the planner's plans run, and are exact -------------------------------------------------------

RUN_DIMS = ModelDims(32, 2, 4, 2, 48, 32)  # the demo model of run_plans_case: 4 query heads, 2 K/V heads
RUN_SEQ, RUN_BATCH, RUN_CHUNK, RUN_TILE = 16, 4, 5, 3  # 5- and 3-token tiles: uneven over 4..16 local tokens


def sampled_plans() -> list[Plan]:
    """One plan per layout the planner ranks for 4 CPU ranks, the options turned so each value appears.

    Layout i (dp x cp x tp, strategy) gets AC mode ``i % 3``, the loss chunked when ``i % 2``, the MLP
    tiled when ``(i // 2) % 2`` and FSDP when ``(i // 3) % 2 == 0``: every option meets several
    layouts. Each is one of :func:`candidates`' plans (the planner could name it) with its predictions.
    """
    kwargs = dict(seq_len=RUN_SEQ, world_size=4, gpus_per_node=4)
    result = plan(
        RUN_DIMS, **kwargs, device="CPU", loss_chunk_size=RUN_CHUNK, mlp_tile_size=RUN_TILE, num_runners_up=20
    )
    found, _ = candidates(RUN_DIMS, **kwargs, loss_chunk_size=RUN_CHUNK, mlp_tile_size=RUN_TILE)
    sample = []
    for i, ranked in enumerate([result.best, *result.runners_up]):
        options = dict(
            activation_checkpointing=("none", "selective", "full")[i % 3],
            loss_chunk_size=RUN_CHUNK if i % 2 else None,
            mlp_tile_size=RUN_TILE if (i // 2) % 2 else None,
            param_sharding="fsdp" if (i // 3) % 2 == 0 else "ddp",
        )
        if options["mlp_tile_size"] and ranked.tp > 1:  # the tiled MLP with tp runs under FSDP only
            options["param_sharding"] = "fsdp"
        turned = replace(ranked, **options)
        assert any(replace(turned, **{k: getattr(c, k) for k in PREDICTIONS}) == c for c in found), turned
        sample.append(turned)
    return sample


PREDICTIONS = ("memory_gib", "bytes_per_step", "step_time_s", "seconds_per_token")


def run_plans_case(plans: list[Plan], batch: dict) -> list[dict]:
    """On every rank: each plan's forward and backward of the demo model in fp64; the loss and whole grads.

    A plan of one process (``dp = cp = tp = 1``) is the oracle: the bare model, no wrapper.
    """
    import mp_pool
    import torch
    from torch.distributed.tensor import DTensor

    from cp_dtensor import apply_ddp, apply_fsdp, parallelize_for_tp
    from cp_dtensor.training import ModelConfig, TransformerWithCP

    results = []
    for p in plans:
        extra = {"tp_size": p.tp} if p.tp > 1 else {}
        extra |= {"ulysses_size": p.ulysses_size} if p.ulysses_size else {}
        group = mp_pool.group(p.cp, layout=p.layout, dp_size=p.dp, **extra)
        config = ModelConfig(
            vocab_size=RUN_DIMS.vocab_size,
            hidden_size=RUN_DIMS.hidden_size,
            num_layers=RUN_DIMS.num_layers,
            num_heads=RUN_DIMS.num_heads,
            num_kv_heads=RUN_DIMS.num_kv_heads,
            intermediate_size=RUN_DIMS.ffn_hidden_size,
            strategy=p.strategy,
            activation_checkpointing=p.activation_checkpointing,
            loss_chunk_size=p.loss_chunk_size,
            mlp_tile_size=p.mlp_tile_size,
        )
        torch.manual_seed(1)  # the same initial weights in every process
        model = TransformerWithCP(config, cp_group=group).double()
        if p.dp * p.cp * p.tp > 1:
            model = parallelize_for_tp(model, group)
            wrap = apply_fsdp if p.param_sharding == "fsdp" else apply_ddp
            wrapped = wrap(model, group)
        else:
            wrapped = model
        rows = slice(
            group.dp_mesh.get_local_rank() * RUN_BATCH // p.dp, (group.dp_mesh.get_local_rank() + 1) * RUN_BATCH // p.dp
        )
        ids, labels = (group.partition_sequence(batch[k][rows], seq_dim=1) for k in ("input_ids", "labels"))
        loss = wrapped(ids, labels)
        loss.backward()
        whole = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
        results.append({"loss": loss.item(), "grads": {n: whole(q.grad) for n, q in model.named_parameters()}})
    return results


def test_a_sample_of_the_planners_plans_runs_exactly_on_gloo():
    """Every layout the planner ranks for 4 ranks, with every option value among them, runs one training
    step of the demo model on 4 gloo ranks, and its loss and gradients equal one process's."""
    import mp_pool
    import torch

    from cp_dtensor import shift_labels

    sample = sampled_plans()
    assert {(p.dp, p.cp, p.tp) for p in sample} == {(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4)}
    assert {p.strategy for p in sample} == {"ring", "allgather", "ulysses", "hybrid"}
    assert {(p.activation_checkpointing, p.loss_chunk_size, p.mlp_tile_size, p.param_sharding) for p in sample} >= {
        ("none", None, None, "fsdp"),
        ("selective", RUN_CHUNK, None, "fsdp"),
        ("full", None, RUN_TILE, "fsdp"),
    }
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, RUN_DIMS.vocab_size, (RUN_BATCH, RUN_SEQ), generator=gen)
    batch = {"input_ids": ids, "labels": shift_labels(ids, torch.rand(RUN_BATCH, RUN_SEQ, generator=gen) < 0.5)}
    one = Plan(1, 1, 1, "ring", None, "zigzag", "none", None, None, "ddp")
    (single,) = mp_pool.run_on_ranks(1, run_plans_case, [one], batch)[0]
    for rank in mp_pool.run_on_ranks(4, run_plans_case, sample, batch):
        for p, got in zip(sample, rank, strict=True):
            # fp64: the same sums in another order (attention blocks, loss shards, gradient reduction,
            # tp partial sums), ~1e-16 relative per term: 1e-10 is far above that, far below any bug.
            assert got["loss"] == pytest.approx(single["loss"], rel=1e-10, abs=0), p.describe()
            for name, want in single["grads"].items():
                torch.testing.assert_close(got["grads"][name], want, rtol=0, atol=1e-10, msg=f"{p.describe()}: {name}")


def test_the_tiled_mlp_with_tp_under_ddp_is_never_planned_and_says_why():
    found, rejections = candidates(RUN_DIMS, seq_len=RUN_SEQ, world_size=4, gpus_per_node=4, loss_chunk_size=RUN_CHUNK,
                                   mlp_tile_size=RUN_TILE)  # fmt: skip
    assert not [p for p in found if p.mlp_tile_size and p.tp > 1 and p.param_sharding == "ddp"]
    assert any("need fsdp" in r.reason for r in rejections), rejections
