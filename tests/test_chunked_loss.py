"""The chunked LM-head loss equals the full-logits loss and gradients, on one process and across dp x cp ranks.

Tolerance 1e-12 in float64: the chunked path does the full path's arithmetic tile by tile, so only the
summation order of the weight gradient (and of the loss) differs, ~1e-16 relative.
"""

from __future__ import annotations

import mp_pool
import pytest
import torch
import torch.nn.functional as F

from cp_dtensor import chunked_linear_cross_entropy, shift_labels
from cp_dtensor.training import ModelConfig, TransformerWithCP

TOL = dict(rtol=1e-12, atol=1e-12)
CONFIG = ModelConfig(vocab_size=37, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=32)
SEQ_LEN, GLOBAL_BATCH = 24, 4


def _head_inputs(seed: int, n: int = 2, s: int = 10, e: int = 8, v: int = 11):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, s, e, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(v, e, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(v, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, v, (n, s), generator=gen)
    labels[torch.rand(n, s, generator=gen) < 0.3] = -100
    return h, w, b, labels


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 20, 64])
def test_chunked_head_equals_full_logits(chunk_size):
    h, w, b, labels = _head_inputs(seed=chunk_size)
    logits = F.linear(h, w, b)
    full = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    full_correct = ((logits.argmax(-1) == labels) & (labels != -100)).sum()
    full_grads = torch.autograd.grad(full * 0.37, (h, w, b))

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss_sum, num_valid, num_correct = chunked_linear_cross_entropy(h, w, labels, bias=b, chunk_size=chunk_size)
    grads = torch.autograd.grad(loss_sum * 0.37, (h, w, b))

    torch.testing.assert_close(loss_sum, full, **TOL)
    assert num_valid.item() == (labels != -100).sum().item() and num_correct.item() == full_correct.item()
    for got, want in zip(grads, full_grads):
        torch.testing.assert_close(got, want, **TOL)
    assert max(saved) < labels.numel() * w.shape[0], "a (B, S, V)-sized tensor was kept for the backward"


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5])
def test_bad_chunk_size_is_a_value_error(chunk_size):
    h, w, _, labels = _head_inputs(seed=0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_linear_cross_entropy(h, w, labels, chunk_size=chunk_size)


def _packed_batch(seed: int) -> dict[str, torch.Tensor]:
    """Ids, three packed documents per row (document boundaries end labels), and a random half of targets masked."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CONFIG.vocab_size, (GLOBAL_BATCH, SEQ_LEN), generator=gen)
    cuts = torch.sort(torch.randint(1, SEQ_LEN, (GLOBAL_BATCH, 2), generator=gen), dim=1).values
    docs = (torch.arange(SEQ_LEN) >= cuts[:, :1]).long() + (torch.arange(SEQ_LEN) >= cuts[:, 1:]).long()
    mask = torch.rand(GLOBAL_BATCH, SEQ_LEN, generator=gen) < 0.5
    return {"input_ids": ids, "labels": shift_labels(ids, mask, document_ids=docs), "document_ids": docs}


def chunked_vs_full_case(cp_size: int, dp_size: int, chunk_size: int, batch: dict) -> dict:
    """Runs on every rank: loss, counts and gradients of the same model with and without the chunked loss."""
    from dataclasses import replace

    group = mp_pool.group(cp_size, dp_size=dp_size)
    dp, dp_rank = group.dp_mesh.size(), group.dp_mesh.get_local_rank()
    rows = slice(dp_rank * GLOBAL_BATCH // dp, (dp_rank + 1) * GLOBAL_BATCH // dp)
    ids, labels = (group.partition_sequence(batch[k][rows], seq_dim=1) for k in ("input_ids", "labels"))
    results = {}
    for name, config in (("full", CONFIG), ("chunked", replace(CONFIG, loss_chunk_size=chunk_size))):
        torch.manual_seed(0)
        model = TransformerWithCP(config, cp_group=group).double()
        out = model(ids, labels, return_sharded_loss=True, document_ids=batch["document_ids"][rows])
        out.loss.backward()
        results[name] = (
            out.loss.item(),
            out.num_tokens,
            out.num_correct,
            {n: p.grad.clone() for n, p in model.named_parameters()},
        )
    return results


@pytest.mark.parametrize(("cp_size", "dp_size", "chunk_size"), [(2, 2, 5), (4, 1, 4)])
def test_model_chunked_loss_equals_full_across_ranks(cp_size, dp_size, chunk_size):
    batch = _packed_batch(seed=cp_size)
    for rank in mp_pool.run_on_ranks(cp_size * dp_size, chunked_vs_full_case, cp_size, dp_size, chunk_size, batch):
        (loss, n, c, grads), (loss_c, n_c, c_c, grads_c) = rank["full"], rank["chunked"]
        assert (n, c) == (n_c, c_c) and n > 0
        assert abs(loss - loss_c) <= 1e-12
        for name, g in grads.items():
            torch.testing.assert_close(grads_c[name], g, **TOL, msg=name)


def bring_your_own_model_case(position_ids: torch.Tensor, seed: int) -> tuple:
    """Runs on every rank: causal_lm_loss of the head's logits vs chunked_causal_lm_loss, value and gradients."""
    from cp_dtensor.integrations import causal_lm_loss, chunked_causal_lm_loss, shard_batch

    group = mp_pool.group(2, dp_size=1)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 13, position_ids.shape, generator=gen)
    batch = shard_batch(ids, group, position_ids=position_ids)
    head = torch.nn.Linear(8, 13, dtype=torch.float64)
    torch.nn.init.normal_(head.weight, generator=gen), torch.nn.init.normal_(head.bias, generator=gen)
    hidden_global = torch.randn(*ids.shape, 8, dtype=torch.float64, generator=gen)
    hidden = group.partition_sequence(hidden_global, seq_dim=1).requires_grad_()
    out = []
    for loss in (
        lambda: causal_lm_loss(head(hidden), batch),
        lambda: chunked_causal_lm_loss(hidden, head, batch, chunk_size=3),
    ):
        result = loss()
        grads = torch.autograd.grad(result.loss, (hidden, head.weight, head.bias))
        out.append((result.loss.item(), result.num_tokens, grads))
    return out


def test_bring_your_own_model_chunked_loss_equals_causal_lm_loss():
    position_ids = torch.cat([torch.arange(5), torch.arange(7), torch.arange(4)]).unsqueeze(0).repeat(2, 1)  # 3 docs
    for (loss, n, grads), (loss_c, n_c, grads_c) in mp_pool.run_on_ranks(2, bring_your_own_model_case, position_ids, 0):
        assert n == n_c == 2 * (16 - 3) and abs(loss - loss_c) <= 1e-12
        for got, want in zip(grads_c, grads):
            torch.testing.assert_close(got, want, **TOL)


def tensor_parallel_case(batch: dict) -> dict:
    """Runs on every rank of cp 2 x tp 2: whole gradients with and without the chunked loss."""
    from dataclasses import replace

    from torch.distributed.tensor import DTensor

    from cp_dtensor import apply_ddp, parallelize_for_tp

    group = mp_pool.group(2, dp_size=1, tp_size=2)
    ids, labels = (group.partition_sequence(batch[k], seq_dim=1) for k in ("input_ids", "labels"))
    results = {}
    for name, config in (("full", CONFIG), ("chunked", replace(CONFIG, loss_chunk_size=7))):
        torch.manual_seed(0)
        model = parallelize_for_tp(TransformerWithCP(config, cp_group=group).double(), group)
        loss = apply_ddp(model, group)(ids, labels)
        loss.backward()
        whole = {
            n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for n, p in model.named_parameters()
        }
        results[name] = (loss.item(), whole)
    return results


def test_chunked_loss_under_tensor_parallelism_equals_full():
    batch = _packed_batch(seed=7)
    for rank in mp_pool.run_on_ranks(4, tensor_parallel_case, batch):
        (loss, grads), (loss_c, grads_c) = rank["full"], rank["chunked"]
        assert abs(loss - loss_c) <= 1e-12
        for name, g in grads.items():
            torch.testing.assert_close(grads_c[name], g, **TOL, msg=name)
