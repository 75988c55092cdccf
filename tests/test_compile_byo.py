"""torch.compile(fullgraph=True) of bring-your-own models: same numbers as eager, no recompilation.

A plain model calling ``F.scaled_dot_product_attention`` under
:class:`~cp_dtensor.integrations.sdpa.context_parallel_sdpa` (the mode outside the compiled model,
and inside the compiled function), and a Hugging Face Llama with ``attn_implementation="cp_ring"``.
Each case compiles one graph and runs it twice (the second time on new data, which must not
recompile); eager runs the same model with the same weights on the same shard. fp64, cp 2 (zigzag).
Tolerance 1e-12: inside the attention operator compiled and eager run the same kernels; only the
code around it (inductor's fused elementwise ops) may round differently. The Llama compiles with
``backend="aot_eager"`` (see ``llama_case``).
"""

from __future__ import annotations

import copy

import mp_pool
import pytest
import torch
import torch.nn.functional as F
from torch import nn

TOL = 1e-12
L, E, H, H_KV = 16, 16, 4, 2  # global sequence length, embedding, query heads, K/V heads


class PlainAttention(nn.Module):
    """One causal GQA self-attention block written against ``F.scaled_dot_product_attention``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(E, (H + 2 * H_KV) * E // H), nn.Linear(E, E)

    def forward(self, x_BSE: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x_BSE.shape
        q, k, v = self.qkv(x_BSE).view(batch, seq, H + 2 * H_KV, -1).transpose(1, 2).split([H, H_KV, H_KV], dim=1)
        y_BHSD = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return x_BSE + self.out(torch.tanh(y_BHSD).transpose(1, 2).reshape(batch, seq, E))


def _run_twice(eager_step, compiled_step, params, make_input) -> list[float]:
    """Eager and compiled steps on two batches; per batch the largest |difference| of output, input and weight grads."""
    import torch._dynamo

    torch._dynamo.reset()
    errors = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(2):  # the second step: new data, same shapes, must not recompile
            results = []
            for step in (eager_step, compiled_step):
                for p in params:
                    p.grad = None
                x, dout = make_input(seed)
                out = step(x)
                (out * dout).sum().backward()
                results.append([out.detach(), x.grad] + [p.grad for p in params])
            errors.append(max((a - b).abs().max().item() for a, b in zip(*results, strict=True)))
    return errors


def plain_case(placement: str) -> list[float]:
    """Runs on every rank: ``PlainAttention`` eager vs compiled (the mode outside or inside the
    compile) on two batches, then eager vs one process on a third."""
    from cp_dtensor.integrations.sdpa import context_parallel_sdpa

    group = mp_pool.group(2)
    torch.manual_seed(0)
    model = PlainAttention().double()

    def make_input(seed):
        g = torch.Generator().manual_seed(seed)
        x, dout = (torch.randn(1, L, E, generator=g, dtype=torch.float64) for _ in range(2))
        return group.partition_sequence(x, seq_dim=1).requires_grad_(), group.partition_sequence(dout, seq_dim=1)

    def eager(x):
        with context_parallel_sdpa(group):
            return model(x)

    if placement == "mode outside":
        compiled_model = torch.compile(model, fullgraph=True)

        def compiled(x):
            with context_parallel_sdpa(group):
                return compiled_model(x)
    else:
        compiled = torch.compile(eager, fullgraph=True)
    errors = _run_twice(eager, compiled, list(model.parameters()), make_input)
    # Eager itself against one process on the whole sequence (plain SDPA), so that an error shared by
    # eager and compiled cannot pass; fp64, only the summation order differs.
    x = torch.randn(1, L, E, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        whole = group.partition_sequence(model(x), seq_dim=1)
        return errors + [(eager(group.partition_sequence(x, seq_dim=1)) - whole).abs().max().item()]


@pytest.mark.parametrize("placement", ["mode outside", "mode inside"])
def test_plain_sdpa_model_compiles_fullgraph_and_matches_eager(placement):
    for rank_errors in mp_pool.run_on_ranks(2, plain_case, placement, timeout=300):
        assert max(rank_errors) <= TOL, rank_errors


def llama_case() -> list[float]:
    """Runs on every rank: a tiny random Llama with ``cp_ring`` attention, eager vs compiled logits and grads."""
    import torch._dynamo
    import transformers

    from cp_dtensor.integrations import shard_batch
    from cp_dtensor.integrations.transformers import register

    register()
    group = mp_pool.group(2)
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=E,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=H,
        num_key_value_heads=H_KV,
        max_position_embeddings=L,
    )
    torch.manual_seed(0)
    eager = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="cp_ring").double()
    twin = copy.deepcopy(eager)  # same weights; its own gradients
    # aot_eager: dynamo's full graph and AOTAutograd's backward, with eager kernels. Llama computes
    # RoPE's angles in fp32 by design, so inductor differs from eager at fp32 resolution, with or
    # without context parallelism; the eager kernels keep this comparison at 1e-12.
    compiled = torch.compile(twin, fullgraph=True, dynamic=False, backend="aot_eager")
    torch._dynamo.reset()
    errors = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(2):  # the second step: new tokens, same shapes, must not recompile
            g = torch.Generator().manual_seed(seed)
            batch = shard_batch(torch.randint(0, 32, (1, L), generator=g), group)
            dlogits = torch.randn(1, L // 2, 32, generator=g, dtype=torch.float64)
            results = []
            for model, params in ((eager, eager.parameters()), (compiled, twin.parameters())):
                params = list(params)
                for p in params:
                    p.grad = None
                logits = model(**batch.model_inputs()).logits
                (logits * dlogits).sum().backward()
                results.append([logits.detach()] + [p.grad for p in params])
            errors.append(max((a - b).abs().max().item() for a, b in zip(*results, strict=True)))
    return errors


def test_hf_llama_compiles_fullgraph_and_matches_eager():
    pytest.importorskip("transformers")
    for rank_errors in mp_pool.run_on_ranks(2, llama_case, timeout=300):
        assert max(rank_errors) <= TOL, rank_errors
