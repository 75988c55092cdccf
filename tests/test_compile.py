"""torch.compile(fullgraph=True) of context-parallel attention: same numbers as eager, no recompilation.

Every strategy runs as one ``cp_dtensor::attention`` node under compile (Note [Attention as a custom
op] in :mod:`cp_dtensor.attention.compiled`). One compiled function per strategy holds four calls (fp64 and fp32,
causal and documents + window), so each world compiles one graph per strategy: compile time, not
attention, is what these tests spend.
"""

from __future__ import annotations

from pathlib import Path

import mp_pool
import pytest
import torch
from helpers import torchrun_job_losses

from cp_dtensor import context_parallel_attention

# fp64: the compiled graph runs the same kernels in the same order as eager inside the operator;
# only the code around it (inductor's fused elementwise ops) may round differently: ~1e-12.
# fp32: likewise, at fp32 resolution.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}

B, H, H_KV, D, L = 1, 4, 2, 8, 16


def _inputs(seed: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (B, H, L, D), "k": (B, H_KV, L, D), "v": (B, H_KV, L, D), "dout": (B, H, L, D)}
    out = {n: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for n, s in shapes.items()}
    out["ids"] = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4]).repeat(B, 1)
    return out


def attend_case(world_size: int, strategy: str, ulysses_size: int | None) -> list[dict]:
    """Runs on every rank: eager and compiled attention, forward and backward, two steps of new data."""
    import torch._dynamo

    extra = {} if ulysses_size is None else {"ulysses_size": ulysses_size}
    group = mp_pool.group(world_size, **extra)

    def step(*tensors):  # (q, k, v) fp64, (q, k, v) fp32, document ids, sinks fp64, sinks fp32
        ids = tensors[6]
        outs = []
        for i in range(2):
            q, k, v = tensors[3 * i : 3 * i + 3]
            outs.append(context_parallel_attention(q, k, v, group, strategy=strategy, causal=True))
            outs.append(context_parallel_attention(q, k, v, group, strategy=strategy, document_ids=ids, window=(5, 0)))
            outs.append(
                context_parallel_attention(
                    q, k, v, group, strategy=strategy, causal=True, sinks=tensors[7 + i], softcap=0.5
                )
            )
        return outs

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    errors = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(2):  # the second step: new data, same shapes, must not recompile
            results = {}
            for name, fn in (("eager", step), ("compiled", compiled)):
                tensors, douts = [], []
                for dtype in (torch.float64, torch.float32):
                    x = _inputs(seed, dtype)
                    tensors += [group.partition_sequence(x[n], seq_dim=2).requires_grad_() for n in "qkv"]
                    douts.append(group.partition_sequence(x["dout"], seq_dim=2))
                ids = group.partition_sequence(_inputs(seed, torch.float64)["ids"], seq_dim=1)
                sinks = [
                    torch.linspace(-2.0, 2.0, H, dtype=dtype).requires_grad_()
                    for dtype in (torch.float64, torch.float32)
                ]
                outs = fn(*tensors, ids, *sinks)
                loss = sum((o * douts[i // 3]).sum() for i, o in enumerate(outs))
                loss.backward()
                results[name] = [o.detach() for o in outs] + [t.grad for t in tensors + sinks]
            errors.append(
                [
                    (a.dtype, (a - b).abs().max().item())
                    for a, b in zip(results["eager"], results["compiled"], strict=True)
                ]
            )
    return errors


@pytest.mark.parametrize(
    ("strategy", "world_size", "ulysses_size"),
    [("ring", 2, None), ("ulysses", 2, None), ("allgather", 2, None), ("hybrid", 4, 2), ("dispatch", 2, None)],
)
def test_compiled_attention_equals_eager_without_recompiling(strategy, world_size, ulysses_size):
    for rank_errors in mp_pool.run_on_ranks(world_size, attend_case, world_size, strategy, ulysses_size, timeout=300):
        for step_errors in rank_errors:
            for dtype, error in step_errors:
                assert error <= TOLERANCE[dtype], (dtype, error)


def model_case(strategy: str) -> list[float]:
    """Runs on every rank: TransformerWithCP eager and compiled (fullgraph), logits and weight gradients."""
    import torch._dynamo

    from cp_dtensor.training import ModelConfig, TransformerWithCP

    group = mp_pool.group(2)
    assert group.size == 2  # a copy of the pool's group: slices its cp mesh before compiling (see ContextParallelGroup)
    config = ModelConfig(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, strategy=strategy)
    eager, compiled = (TransformerWithCP(config, cp_group=group).double() for _ in range(2))
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(fullgraph=True, dynamic=False)
    torch._dynamo.reset()
    errors = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(2):  # a second step with new tokens and documents must not recompile
            g = torch.Generator().manual_seed(seed)
            ids = group.partition_sequence(torch.randint(0, 16, (1, L), generator=g), seq_dim=1)
            docs = torch.tensor([[0] * (3 + seed) + [1] * (L - 3 - seed)])  # global, as the training job passes
            dlogits = torch.randn(1, L // 2, 16, generator=g, dtype=torch.float64)
            results = []
            for model in (eager, compiled):
                model.zero_grad()
                logits = model(ids, return_logits=True, document_ids=docs)
                (logits * dlogits).sum().backward()
                results.append([logits.detach()] + [p.grad for p in model.parameters()])
            errors.append(max((a - b).abs().max().item() for a, b in zip(*results, strict=True)))
    return errors


def test_transformer_compiles_fullgraph_and_matches_eager():
    # fp64 model; inductor may fuse and reorder the elementwise code around the attention: ~1e-12.
    for rank_errors in mp_pool.run_on_ranks(2, model_case, "ring", timeout=300):
        assert max(rank_errors) <= 1e-12, rank_errors


def model_loss_case(strategy: str) -> list[float]:
    """Runs on every rank: the model WITH its loss (labels from the ids, one gather) compiled fullgraph."""
    import torch._dynamo

    from cp_dtensor.training import ModelConfig, TransformerWithCP

    group = mp_pool.group(2)
    config = ModelConfig(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, strategy=strategy)
    eager, compiled = (TransformerWithCP(config, cp_group=group).double() for _ in range(2))
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    compiled.compile(fullgraph=True, dynamic=False)
    errors = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(2):
            g = torch.Generator().manual_seed(seed)
            ids = group.partition_sequence(torch.randint(0, 16, (1, L), generator=g), seq_dim=1)
            docs = torch.tensor([[0] * (3 + seed) + [1] * (L - 3 - seed)])
            results = []
            for model in (eager, compiled):
                model.zero_grad()
                loss = model(ids, document_ids=docs)
                loss.backward()
                results.append([loss.detach()] + [p.grad for p in model.parameters()])
            errors.append(max((a - b).abs().max().item() for a, b in zip(*results, strict=True)))
    return errors


def test_transformer_with_its_loss_compiles_fullgraph_and_matches_eager():
    # fp64 model; the loss's all-reduce is a functional collective inside the graph: ~1e-12 as above.
    for rank_errors in mp_pool.run_on_ranks(2, model_loss_case, "ring", timeout=300):
        assert max(rank_errors) <= 1e-12, rank_errors


def _qkv(group, seq_len: int, seed: int):
    """Local fp64 shards of q, k, v, dout and document ids (a shard: gathered inside the call) of one length."""
    g = torch.Generator().manual_seed(seed)
    full = [torch.randn(B, h, seq_len, D, generator=g, dtype=torch.float64) for h in (H, H_KV, H_KV, H)]
    ids = (torch.arange(seq_len) * 3 // seq_len).repeat(B, 1)  # three documents
    q, k, v, dout = (group.partition_sequence(x, seq_dim=2) for x in full)
    return [x.requires_grad_() for x in (q, k, v)], dout, group.partition_sequence(ids, seq_dim=1)


def _run_counted(fn, group, seq_len: int, seed: int):
    """Forward and backward of ``fn`` on one input; the outputs, gradients and the comm counts of each pass."""
    from cp_dtensor import count_comm

    (q, k, v), dout, ids = _qkv(group, seq_len, seed)
    with count_comm() as forward:
        out = fn(q, k, v, ids)
    with count_comm() as backward:
        (out * dout).sum().backward()
    counts = [dict(c.bytes) for c in (forward, backward)] + [dict(c.calls) for c in (forward, backward)]
    return [out.detach(), q.grad, k.grad, v.grad], counts


def shapes_and_bytes_case(world_size: int, strategy: str, ulysses_size: int | None) -> list[str]:
    """Runs on every rank: compiled vs eager, same numbers and same bytes, at three lengths, dynamic None and True.

    Returns the mismatches found (empty when all agree).
    """
    import torch._dynamo

    extra = {} if ulysses_size is None else {"ulysses_size": ulysses_size}
    group = mp_pool.group(world_size, **extra)

    def step(q, k, v, ids):
        return context_parallel_attention(q, k, v, group, strategy=strategy, causal=True, document_ids=ids)

    lengths = [4 * world_size * n for n in (2, 3, 4)]  # zigzag: multiples of 2 * cp; Ulysses: heads split
    problems = []
    for dynamic in (None, True):
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
        for seed, seq_len in enumerate(lengths):
            eager_out, eager_counts = _run_counted(step, group, seq_len, seed)
            comp_out, comp_counts = _run_counted(compiled, group, seq_len, seed)
            error = max((a - b).abs().max().item() for a, b in zip(eager_out, comp_out, strict=True))
            if not error <= 1e-12:  # the same kernels in the same order inside the operator: fp64 rounding
                problems.append(f"dynamic={dynamic} L={seq_len}: max error {error}")
            if eager_counts != comp_counts:
                problems.append(
                    f"dynamic={dynamic} L={seq_len}: bytes/calls eager {eager_counts} compiled {comp_counts}"
                )
    return problems


@pytest.mark.parametrize(
    ("strategy", "world_size", "ulysses_size"),
    [("ring", 2, None), ("ulysses", 2, None), ("allgather", 2, None), ("hybrid", 4, 2)],
)
def test_compiled_equals_eager_in_numbers_and_bytes_at_every_length(strategy, world_size, ulysses_size):
    # Forward and backward counted separately: the compiled backward must not gather the document
    # ids again. dynamic=None compiles a static graph, then one dynamic one for later lengths;
    # dynamic=True one dynamic graph from the start. Neither may raise.
    for problems in mp_pool.run_on_ranks(world_size, shapes_and_bytes_case, world_size, strategy, ulysses_size):
        assert problems == [], problems


def cache_case(world_size: int, strategy: str, ulysses_size: int | None, cache_dir: str) -> float:
    """Runs on every rank: inductor-compiled attention with an on-disk cache shared across worlds; max error."""
    import os

    import torch._dynamo

    extra = {} if ulysses_size is None else {"ulysses_size": ulysses_size}
    group = mp_pool.group(world_size, **extra)

    def step(q, k, v, ids):
        return context_parallel_attention(q, k, v, group, strategy=strategy, causal=True, document_ids=ids)

    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    try:
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, dynamic=False, backend="inductor")
        seq_len = 8 * world_size  # the same local length (8) in every world: only the cp size differs
        eager_out, _ = _run_counted(step, group, seq_len, 0)
        comp_out, _ = _run_counted(compiled, group, seq_len, 0)
    finally:
        if old is None:
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old
        torch._dynamo.reset()
    return max((a - b).abs().max().item() for a, b in zip(eager_out, comp_out, strict=True))


@pytest.mark.parametrize(("strategy", "sizes"), [("ulysses", [(2, None), (4, None)]), ("hybrid", [(2, 2), (4, 4)])])
def test_a_graph_cached_for_one_cp_size_is_never_served_to_another(strategy, sizes, tmp_path):
    # The fake output shapes of Ulysses and hybrid depend on the cp (or Ulysses) size, and the local
    # shapes are equal in both worlds: a cache keyed without the size would hand the first world's
    # graph to the second (a shape assertion at run time). fp64, inductor around the op: ~1e-12.
    for world_size, ulysses_size in sizes:
        errors = mp_pool.run_on_ranks(world_size, cache_case, world_size, strategy, ulysses_size, str(tmp_path))
        assert max(errors) <= 1e-12, (world_size, errors)


REPO = Path(__file__).resolve().parents[1]
JOB = [
    "--seq-len",
    "32",
    "--batch-size",
    "2",
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
    "3",
    "--warmup",
    "1",
    "--eval-samples",
    "2",
    "--log-every",
    "1",
    "--dtype",
    "float64",
    "--packed",
    "2",
    "--window",
    "6",
]


def test_training_job_with_compile_reproduces_the_eager_losses(tmp_path):
    # fp64, documents and a window: the compiled job takes the same steps as the eager one, up to the
    # rounding of inductor's fused code around the attention.
    eager = torchrun_job_losses(tmp_path / "eager.json", JOB, timeout=600)
    compiled = torchrun_job_losses(tmp_path / "compiled.json", [*JOB, "--compile"], timeout=600)
    assert compiled == pytest.approx(eager, rel=1e-10, abs=0)


def document_zigzag_case() -> str:
    """Runs on every rank: a DocumentZigzag group under compile; returns the error's text."""
    from cp_dtensor import DocumentZigzag, ring_attention

    ids = torch.tensor([[0] * 6 + [1] * 10])
    group = mp_pool.group(2).with_layout(DocumentZigzag.from_document_ids(ids))
    q = torch.randn(1, 2, 8, 8)
    step = torch.compile(lambda q: ring_attention(q, q, q, group, causal=True), fullgraph=True, backend="eager")
    try:
        step(q)
    except Exception as e:  # torch._dynamo reports the ValueError raised while tracing
        return str(e)
    return "no error"


def score_mod_case() -> str:
    """Runs on every rank: a score_mod under compile; returns the error's text."""
    from cp_dtensor import ring_attention

    group = mp_pool.group(2)
    q = torch.randn(1, 2, 8, 8)

    def step(q):
        return ring_attention(q, q, q, group, causal=True, score_mod=lambda s, b, h, i, j: s + (j - i))

    try:
        torch.compile(step, fullgraph=True, backend="eager")(q)
    except Exception as e:  # torch._dynamo reports the ValueError raised while tracing
        return str(e)
    return "no error"


def test_a_score_function_under_compile_is_refused_by_name():
    for message in mp_pool.run_on_ranks(2, score_mod_case):
        assert "does not take score_mod" in message and "eagerly" in message, message


def test_a_document_zigzag_layout_under_compile_names_the_fix():
    for message in mp_pool.run_on_ranks(2, document_zigzag_case):
        assert "needs a named layout" in message and "DocumentZigzag" in message, message
