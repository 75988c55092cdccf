"""TransformerWithCP, the loss across shards and the dp x cp gradient sync vs one process on the global batch."""

from __future__ import annotations

import mp_pool
import pytest
import torch
import torch.distributed as dist
from helpers import unshard

from cp_dtensor import DocumentZigzag, apply_ddp, shift_labels
from cp_dtensor.training import ModelConfig, TransformerWithCP

CONFIG = ModelConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48)
SEQ_LEN, GLOBAL_BATCH = 16, 4


def make_batch(seed: int) -> dict[str, torch.Tensor]:
    """A global batch with next-token labels on a random half of the positions.

    The mask leaves ranks with different numbers of supervised tokens, so a mean of per-rank means
    would differ from the true mean; and full-sequence shifting puts the label of each shard's last
    token on another shard.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CONFIG.vocab_size, (GLOBAL_BATCH, SEQ_LEN), generator=gen)
    mask = torch.rand(GLOBAL_BATCH, SEQ_LEN, generator=gen) < 0.5
    return {"input_ids": ids, "labels": shift_labels(ids, mask)}


def _model(group, seed: int) -> TransformerWithCP:
    torch.manual_seed(seed)  # the same initial weights in every process
    return TransformerWithCP(CONFIG, cp_group=group).double()


def _my_rows(group, batch: dict) -> dict[str, torch.Tensor]:
    """This rank's share of the global batch: its dp rank's rows, its cp rank's shard of them."""
    dp, dp_rank = group.dp_mesh.size(), group.dp_mesh.get_local_rank()
    rows = slice(dp_rank * GLOBAL_BATCH // dp, (dp_rank + 1) * GLOBAL_BATCH // dp)
    return {k: group.partition_sequence(v[rows], seq_dim=1) for k, v in batch.items()}


def grads_case(cp_size: int, dp_size: int, layout: str, batch: dict) -> dict:
    """Runs on every rank: the loss with given labels and with default next-token labels, and grads."""
    group = mp_pool.group(cp_size, layout=layout, dp_size=dp_size)
    model = _model(group, seed=0)
    mine = _my_rows(group, batch)
    loss = model(mine["input_ids"], mine["labels"])
    loss.backward()
    default_loss = model(mine["input_ids"])  # labels made from the shards (all-gather + global shift)
    return {
        "loss": loss.item(),
        "default_loss": default_loss.item(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
    }


def step_case(cp_size: int, dp_size: int, batch: dict) -> dict:
    """Runs on every rank: one AdamW step on this rank's share of the batch.

    Sharded runs wrap the model with ``apply_ddp``; the one-process oracle is the bare model.
    """
    group = mp_pool.group(cp_size, dp_size=dp_size)
    model = _model(group, seed=1)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    ddp = apply_ddp(model, group) if cp_size * dp_size > 1 else model
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.1)
    mine = _my_rows(group, batch)
    loss = ddp(mine["input_ids"], mine["labels"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    return {
        "loss": loss.item(),
        "initial": initial,
        "grads": grads,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


@pytest.mark.parametrize(
    "cp_size,layout", [(2, "zigzag"), (4, "contiguous"), (4, "zigzag"), (2, DocumentZigzag((12, 4)))]
)  # segments of 3 and 1 tokens a piece
def test_loss_and_grads_match_one_process(cp_size, layout):
    batch = make_batch(seed=cp_size)
    sharded = mp_pool.run_on_ranks(cp_size, grads_case, cp_size, 1, layout, batch)
    (single,) = mp_pool.run_on_ranks(1, grads_case, 1, 1, "zigzag", batch)
    for r in sharded:  # every rank reports the global loss, not its own part
        # fp64: the sum over tokens is split into P partial sums, rounding ~1e-16 relative.
        assert r["loss"] == pytest.approx(single["loss"], rel=1e-12, abs=0)
        assert r["default_loss"] == pytest.approx(single["default_loss"], rel=1e-12, abs=0)
    for name, expected in single["grads"].items():
        got = sum(r["grads"][name] for r in sharded)  # each rank's share; DDP would sum them
        # fp64; only the order of sums (ring blocks, token shares) differs.
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=name)


def test_dp2_cp2_step_equals_one_process_step():
    batch = make_batch(seed=11)
    ranks = mp_pool.run_on_ranks(4, step_case, 2, 2, batch)
    (single,) = mp_pool.run_on_ranks(1, step_case, 1, 1, batch)
    for r in ranks:
        assert r["loss"] == pytest.approx(single["loss"], rel=1e-12, abs=0)  # fp64 partial sums, as above
    for name, expected in single["params"].items():
        for r in ranks[1:]:  # the all-reduce hands every replica the same bits: no drift between ranks
            assert torch.equal(r["params"][name], ranks[0]["params"][name]), name
        # The synced gradient is the one-process gradient (Adam alone would hide a wrong scale, e.g. a
        # mean instead of a sum); fp64, only the summation order differs.
        torch.testing.assert_close(ranks[0]["grads"][name], single["grads"][name], rtol=0, atol=1e-12, msg=name)
        # fp64 gradients differ from one process's in summation order (~1e-16 relative); Adam's first
        # step divides by |g|, so an element is off by at most lr * 1e-16 / |g|: far below 1e-11.
        torch.testing.assert_close(ranks[0]["params"][name], expected, rtol=0, atol=1e-11, msg=name)
    moved = min((p - single["initial"][n]).abs().max().item() for n, p in single["params"].items())
    assert moved > 1e-3, "the step must change every parameter, or the comparison proves nothing"


# ---- the Production page's examples (docs), with the import path cp_dtensor ----------------------------


def seed_attention_example() -> torch.Tensor:
    from cp_dtensor import ContextParallelAttention, init_context_parallel_group

    # Initialize CP group (4-way sequence parallelism)
    cp_group = init_context_parallel_group(cp_size=4, timeout=mp_pool.GROUP_TIMEOUT_S)  # (test) short timeout

    # Use in attention layer
    torch.manual_seed(1)  # (test) the weights one process rebuilds
    attention = ContextParallelAttention(
        hidden_size=4096,
        num_heads=32,
        cp_group=cp_group,
        causal=True,  # For autoregressive models
    )

    # Input: local sequence shard (batch, seq_len_local, hidden_size)
    torch.manual_seed(0)
    x_local = cp_group.partition_sequence(torch.randn(1, 64, 4096), seq_dim=1)
    with torch.no_grad():
        output = attention(x_local)  # Computes full attention via ring communication
    return output


def seed_attention_on_one_process() -> torch.Tensor:
    """Runs in a one-rank world: the example's layer, with the same seeds, on the whole sequence."""
    from cp_dtensor import ContextParallelAttention

    torch.manual_seed(1)  # the example's weights
    attention = ContextParallelAttention(hidden_size=4096, num_heads=32, cp_group=mp_pool.group(1), causal=True)
    torch.manual_seed(0)
    x = torch.randn(1, 64, 4096)
    with torch.no_grad():
        return attention(x)


def seed_training_example() -> tuple:
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from cp_dtensor import apply_ddp, init_context_parallel_group
    from cp_dtensor.training import LongSequenceDataset, TransformerWithCP

    # 4 ranks: 2-way CP, 2-way DP (the example's 8 GPUs: cp_size=4)
    cp_group = init_context_parallel_group(cp_size=2, timeout=mp_pool.GROUP_TIMEOUT_S)  # (test) short timeout

    # Model with CP attention; gradients summed over dp AND cp
    model = apply_ddp(TransformerWithCP(cp_group=cp_group), cp_group)
    initial = {n: p.detach().clone() for n, p in model.module.named_parameters()}  # (test) rank 0's, broadcast
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    # Dataset: long sequences; each dp replica reads its own samples
    dataset = LongSequenceDataset(seq_len=256)
    sampler = DistributedSampler(dataset, cp_group.dp_mesh.size(), cp_group.dp_mesh.get_local_rank(), shuffle=False)
    dataloader = DataLoader(dataset, batch_size=2, sampler=sampler)

    losses = []
    for step, batch in enumerate(dataloader):
        # Each rank gets seq_len / 2 = 128 tokens
        local_seq = cp_group.partition_sequence(batch["input_ids"], seq_dim=1)

        # Forward: ring attention computes full attention
        loss = model(local_seq)

        # Backward: standard (gradients synced by apply_ddp)
        loss.backward()
        if step == 0:  # (test) the synced gradient, to compare with one process on the global batch
            first_grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step == 1:
            break
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    every = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(every, checksum)
    return losses, [c.item() for c in every], initial, first_grads


def one_process_first_step(initial: dict, input_ids: torch.Tensor) -> tuple[float, dict]:
    """Runs in a one-rank world: the seed's model from ``initial`` weights on the whole global batch."""
    from cp_dtensor.training import TransformerWithCP

    model = TransformerWithCP(cp_group=mp_pool.group(1))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(initial[n])
    loss = model(input_ids)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def test_seed_attention_example_matches_one_process():
    results = mp_pool.run_on_ranks(4, seed_attention_example)
    (expected,) = mp_pool.run_on_ranks(1, seed_attention_on_one_process)
    # Each rank returns its shard of the output; put them back in zigzag order.
    got = unshard(results, 4, "zigzag", seq_dim=1)
    assert got.shape == (1, 64, 4096)
    # fp32: the ring merges 4 key blocks by log-sum-exp instead of one softmax: only the order of sums
    # of 4096-wide products differs (see helpers.FLOOR's fp32 reason), ~1e-7 relative per value.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_seed_training_example_sums_gradients_over_dp_and_cp():
    """The synced gradient of the first step equals one process's gradient on the whole global batch (a
    mean instead of a sum over the 4 ranks would be 4x too small), and the replicas stay identical."""
    from cp_dtensor.training import LongSequenceDataset

    results = mp_pool.run_on_ranks(4, seed_training_example)
    losses, checksums, initial, first_grads = results[0]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert len(set(checksums)) == 1, "replicas drifted apart"
    # The loss is the mean over the GLOBAL batch, so every dp and cp rank reports the same value.
    assert all(r[0] == losses for r in results)
    dataset = LongSequenceDataset(seq_len=256)
    global_batch = torch.stack([dataset[i]["input_ids"] for i in range(4)])  # step 0 of both dp replicas
    (single_loss, single_grads) = mp_pool.run_on_ranks(1, one_process_first_step, initial, global_batch)[0]
    # fp32: partial sums per shard and per replica, then all-reduced: summation order only.
    assert losses[0] == pytest.approx(single_loss, rel=1e-5)
    for name, expected in single_grads.items():
        scale = expected.abs().max().item()
        torch.testing.assert_close(first_grads[name], expected, rtol=1e-4, atol=1e-5 * scale, msg=name)


# ---- labels at packed-document boundaries --------------------------------------------------------


def document_labels_case(cp_size: int, layout, ids: torch.Tensor, docs: torch.Tensor) -> dict:
    """Runs on every rank: default labels from the shards, with document ids as a shard and whole."""
    from cp_dtensor.nn.loss import labels_from_local_ids

    group = mp_pool.group(cp_size, layout=layout)
    ids_local, docs_local = (group.partition_sequence(t, seq_dim=1) for t in (ids, docs))
    model = _model(group, seed=0)
    return {
        "from_shard": labels_from_local_ids(ids_local, group, document_ids=docs_local),
        "from_global": labels_from_local_ids(ids_local, group, document_ids=docs),
        "default_loss": model(ids_local, document_ids=docs).item(),
        "explicit_loss": model(
            ids_local, group.partition_sequence(shift_labels(ids, document_ids=docs), seq_dim=1), document_ids=docs
        ).item(),
    }


@pytest.mark.parametrize(("cp_size", "layout"), [(2, "zigzag"), (4, "zigzag"), (2, DocumentZigzag((4, 8, 4)))])
def test_default_labels_stop_at_document_boundaries(cp_size, layout):
    """The model's default labels on ranks equal one process's shift_labels with the document ids."""
    from cp_dtensor.positions.layout import shard_positions

    gen = torch.Generator().manual_seed(cp_size)
    ids = torch.randint(0, CONFIG.vocab_size, (2, SEQ_LEN), generator=gen)
    docs = torch.tensor([[0] * 4 + [1] * 8 + [2] * 3 + [-1]] * 2)
    expected = shift_labels(ids, document_ids=docs)
    assert (expected[:, [3, 11, 14, 15]] == -100).all() and (expected[:, [0, 4, 12]] != -100).all()
    results = mp_pool.run_on_ranks(cp_size, document_labels_case, cp_size, layout, ids, docs)
    for rank, r in enumerate(results):
        mine = expected[:, shard_positions(SEQ_LEN, cp_size, rank, layout)]
        assert torch.equal(r["from_shard"], mine) and torch.equal(r["from_global"], mine), f"rank {rank}"
        # The same labels, so the same loss to the last bit (same computation on the same shards).
        assert r["default_loss"] == r["explicit_loss"], f"rank {rank}"
