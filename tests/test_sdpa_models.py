"""A plain PyTorch model calling ``F.scaled_dot_product_attention`` runs under ``context_parallel_sdpa``.

The oracle is the same model on one process over the whole global batch, with the mask SDPA would
need there (documents and window as a dense ``(L, L)`` boolean, fine at this size). Loss and every
parameter's gradient (summed over dp x cp) agree to 1e-10 in fp64: only the summation order differs.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from mp_pool import group, run_on_ranks
from torch import nn

TOL = 1e-10  # fp64; only the summation order differs
SEQ_LEN, VOCAB, HEADS, KV_HEADS, DIM = 32, 53, 4, 2, 32


class TinyLM(nn.Module):
    """Token + learned absolute position embeddings, two attention blocks with GQA, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(VOCAB, DIM), nn.Embedding(SEQ_LEN, DIM)
        head_dim = DIM // HEADS
        self.qkv = nn.ModuleList(nn.Linear(DIM, (HEADS + 2 * KV_HEADS) * head_dim) for _ in range(2))
        self.out = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(2))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids_BS, pos_BS, attn_mask=None):
        x_BSE = self.embed(ids_BS) + self.pos(pos_BS)
        batch, seq, _ = x_BSE.shape
        for qkv, out in zip(self.qkv, self.out):
            q, k, v = (
                qkv(x_BSE)
                .view(batch, seq, HEADS + 2 * KV_HEADS, -1)
                .transpose(1, 2)
                .split([HEADS, KV_HEADS, KV_HEADS], dim=1)
            )
            causal = attn_mask is None
            y_BHSD = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, enable_gqa=True)
            x_BSE = x_BSE + out(y_BHSD.transpose(1, 2).reshape(batch, seq, DIM))
        return self.head(x_BSE)


def global_batch(rows: int, packed: bool):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (rows, SEQ_LEN), generator=gen)
    if not packed:
        return ids, None
    lengths = [[10, 13, 9], [4, 28]][:rows]
    return ids, torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])


def dense_mask(pos, window):
    """``(B, 1, L, L)`` visibility for the one-process oracle: causal, same document, in the window."""
    from cp_dtensor.integrations import document_ids_from_position_ids

    i, j = torch.arange(SEQ_LEN)[:, None], torch.arange(SEQ_LEN)[None, :]
    vis = (j <= i) & (j >= i - (window[0] if window else SEQ_LEN))
    docs = document_ids_from_position_ids(pos)
    return (vis & (docs[:, :, None] == docs[:, None, :]))[:, None]


def compare_task(cp_size, dp_size, packed, window, strategies):
    from cp_dtensor.integrations import causal_lm_loss, context_parallel_sdpa, shard_batch

    torch.manual_seed(0)
    ref = TinyLM().double()
    ids, pos = global_batch(dp_size, packed)
    full_pos = torch.arange(SEQ_LEN).expand(dp_size, SEQ_LEN) if pos is None else pos
    mask = dense_mask(full_pos, window) if packed or window else None
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    targets[:, :-1].masked_fill_(full_pos[:, 1:] == 0, -100)
    ref_loss = F.cross_entropy(ref(ids, full_pos, mask).flatten(0, 1), targets.flatten())
    ref_loss.backward()
    errors = {}
    for strategy in strategies:
        g = group(cp_size, dp_size=dp_size, **({"ulysses_size": 2} if strategy == "hybrid" else {}))
        model = TinyLM().double()
        model.load_state_dict(ref.state_dict())
        row = g.dp_mesh.get_local_rank()
        batch = shard_batch(ids[row : row + 1], g, position_ids=None if pos is None else pos[row : row + 1])
        with context_parallel_sdpa(g, strategy=strategy, document_ids=batch.document_ids, window=window):
            loss = causal_lm_loss(model(batch.input_ids, batch.position_ids), batch).loss
        loss.backward()
        grad_err = 0.0
        for p, p_ref in zip(model.parameters(), ref.parameters()):
            dist.all_reduce(p.grad)  # sum over dp x cp, as apply_ddp does
            grad_err = max(grad_err, (p.grad - p_ref.grad).abs().max().item())
        errors[strategy] = ((loss.detach() - ref_loss.detach()).abs().item(), grad_err)
    return errors


CASES = [(4, 1, ["ring", "ulysses", "allgather", "hybrid"]), (2, 2, ["ring", "ulysses", "allgather"])]


@pytest.mark.parametrize(
    "packed,window", [(False, None), (True, None), (True, (6, 0))], ids=["plain", "packed", "window"]
)
@pytest.mark.parametrize("cp_size,dp_size,strategies", CASES, ids=["cp4", "dp2xcp2"])
def test_matches_one_process(cp_size, dp_size, strategies, packed, window):
    for errors in run_on_ranks(4, compare_task, cp_size, dp_size, packed, window, strategies):
        for strategy, (loss_err, grad_err) in errors.items():
            assert loss_err < TOL and grad_err < TOL, (strategy, loss_err, grad_err)


def rejects_task():
    from cp_dtensor.integrations import context_parallel_sdpa

    q = torch.randn(1, 4, 8, 8)
    k = torch.randn(1, 2, 8, 8)
    calls = [
        dict(attn_mask=torch.ones(8, 8, dtype=torch.bool), enable_gqa=True),
        dict(dropout_p=0.1, enable_gqa=True),
        dict(),  # 4 query heads, 2 K/V heads, no enable_gqa
    ]
    messages = []
    for kwargs in calls:
        try:
            with context_parallel_sdpa(group(4)):
                F.scaled_dot_product_attention(q, k, k, **kwargs)
        except ValueError as err:
            messages.append(str(err))
    return messages


def test_unsupported_arguments_raise():
    messages = run_on_ranks(4, rejects_task)[0]
    assert [("attn_mask" in m, "dropout_p" in m, "enable_gqa" in m) for m in messages] == [
        (True, False, False),
        (False, True, False),
        (False, False, True),
    ], messages


def batch_forms_task():
    """``cu_seqlens`` and restarting ``position_ids`` describe the same packing; targets stay in their document."""
    from cp_dtensor.integrations import shard_batch

    g = group(4)
    ids, pos = global_batch(1, packed=True)  # documents of 10, 13 and 9 tokens
    by_pos = shard_batch(ids, g, position_ids=pos)
    by_cu = shard_batch(ids, g, cu_seqlens=torch.tensor([0, 10, 23, 32]))
    full = g.gather_sequence(by_cu.shift_labels, seq_dim=1)[0]
    same = all(
        torch.equal(getattr(by_pos, f), getattr(by_cu, f)) for f in ("input_ids", "position_ids", "shift_labels")
    )
    return same and torch.equal(by_pos.document_ids, by_cu.document_ids), full[[9, 22, 31]].tolist(), full[8].item()


def test_cu_seqlens_and_position_ids_agree():
    for same, ends, inside in run_on_ranks(4, batch_forms_task):
        ids, _ = global_batch(1, packed=True)
        assert same and ends == [-100, -100, -100] and inside == ids[0, 9].item()
