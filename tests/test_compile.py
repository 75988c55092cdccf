"""torch.compile(fullgraph=True) of context-parallel attention: same numbers as eager, no recompilation.

Every strategy runs as one ``cp_dtensor::attention`` node under compile (Note [Attention as a custom
op] in :mod:`cp_dtensor.ops`). One compiled function per strategy holds four calls (fp64 and fp32,
causal and documents + window), so each world compiles one graph per strategy: compile time, not
attention, is what these tests spend.
"""

from __future__ import annotations

import mp_pool
import pytest
import torch

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

    def step(*tensors):  # (q, k, v) fp64, (q, k, v) fp32, document ids: causal, then documents + window
        ids = tensors[-1]
        outs = []
        for i in range(2):
            q, k, v = tensors[3 * i : 3 * i + 3]
            outs.append(context_parallel_attention(q, k, v, group, strategy=strategy, causal=True))
            outs.append(context_parallel_attention(q, k, v, group, strategy=strategy, document_ids=ids, window=(5, 0)))
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
                outs = fn(*tensors, ids)
                loss = sum((o * douts[i // 2]).sum() for i, o in enumerate(outs))
                loss.backward()
                results[name] = [o.detach() for o in outs] + [t.grad for t in tensors]
            errors.append(
                [
                    (a.dtype, (a - b).abs().max().item())
                    for a, b in zip(results["eager"], results["compiled"], strict=True)
                ]
            )
    return errors


@pytest.mark.parametrize(
    ("strategy", "world_size", "ulysses_size"),
    [("ring", 2, None), ("ulysses", 2, None), ("allgather", 2, None), ("hybrid", 4, 2)],
)
def test_compiled_attention_equals_eager_without_recompiling(strategy, world_size, ulysses_size):
    for rank_errors in mp_pool.run_on_ranks(world_size, attend_case, world_size, strategy, ulysses_size, timeout=300):
        for step_errors in rank_errors:
            for dtype, error in step_errors:
                assert error <= TOLERANCE[dtype], (dtype, error)
