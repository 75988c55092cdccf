"""Mask-aware dispatch on real ranks: who sends what to whom, and the bytes it saves.

Every rank builds the same packed row (seeded), keeps its zigzag shard, and runs
``dispatch_attention`` with both schedules; rank 0 compares the output and gradients
with fp64 full attention under the dense mask, and prints how many K/V rows each rank
sent to each other rank. Then, on 512-token rows, the bytes each strategy moves
(forward and backward, all ranks) against the K/V rows other ranks' queries need,
counted three times (in, in again for the backward, gradient home). Run it (CPU,
gloo; 4 processes):

    torchrun --standalone --nproc_per_node=4 docs/examples/dispatch_packed.py
"""

import torch
import torch.distributed as dist

from cp_dtensor import (
    context_parallel_attention,
    count_comm,
    document_ids_from_cu_seqlens,
    init_context_parallel_group,
)
from cp_dtensor.positions.dispatch import routes
from cp_dtensor.positions.masks import MaskSpec
from cp_dtensor.reference import full_attention, make_mask

B, H, H_KV, D, P = 1, 2, 1, 8, 4


def run(group, strategy, q, k, v, dout, **kwargs):
    """This rank's output and gradients, gathered whole, and the bytes it sent."""
    shards = [group.partition_sequence(x, seq_dim=2) for x in (q, k, v)]
    shards = [x.requires_grad_() for x in shards]
    with count_comm() as comm:
        out = context_parallel_attention(*shards, group, strategy=strategy, **kwargs)
        out.backward(group.partition_sequence(dout, seq_dim=2))
    local = (out.detach(), *(s.grad for s in shards))
    return [group.gather_sequence(x, seq_dim=2) for x in local], comm.total_bytes


def oracle(q, k, v, dout, dense):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want = full_attention(*leaves, mask=dense)
    return [want.detach(), *torch.autograd.grad(want, leaves, dout)]


def inputs(length: int):
    torch.manual_seed(0)  # the same global tensors on every rank
    q, dout = (torch.randn(B, H, length, D, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, H_KV, length, D, dtype=torch.float64) for _ in range(2))
    return q, k, v, dout


def needed_rows(group, dense, length: int) -> int:
    """K/V rows held by other ranks that some local query sees, summed over ranks."""
    total = 0
    for r in range(P):
        mine = torch.cat([torch.arange(s, s + n) for s, n in group.runs(length, r)])
        seen = dense.reshape(-1, length, length)[:, mine].any(1).any(0)
        seen[mine] = False
        total += int(seen.sum())
    return total


def picture(group) -> None:
    length = 64
    q, k, v, dout = inputs(length)
    ids = document_ids_from_cu_seqlens(torch.tensor([0, 5, 27, 30, 47, length]))[None]
    dense = make_mask(B, length, causal=True, document_ids=ids).dense(length)
    want = oracle(q, k, v, dout, dense)
    for schedule in ("pairwise", "alltoall"):
        mask = {"document_ids": ids, "schedule": schedule}
        got, _ = run(group, "dispatch", q, k, v, dout, causal=True, **mask)
        for g, w in zip(got, want):  # fp64: only the order of the sums differs
            torch.testing.assert_close(g, w, rtol=0, atol=1e-10)
    if dist.get_rank() == 0:
        print("documents of 5 | 22 | 3 | 17 | 17 tokens, zigzag, 16 tokens per rank:")
        print("both schedules match fp64 full attention")
        print("K/V rows sent (row: sender, column: receiver; a ring sends 16 to each)")
        mask = MaskSpec(causal=True, document_ids=ids)
        shards = [group.runs(length, r) for r in range(P)]
        print("      " + "".join(f"  to {d}" for d in range(P)))
        for r in range(P):
            sent = [len(rows) for rows in routes(mask, shards, r).send_rows]
            cells = [f"{n:6}" if d != r else "     -" for d, n in enumerate(sent)]
            print(f"rank {r}" + "".join(cells))


def table(group) -> None:
    length, gen = 512, torch.Generator().manual_seed(512)

    def docs(count: int):  # ``count`` documents of random lengths filling the row
        cuts = torch.randperm(length - 1, generator=gen)[: count - 1].sort().values + 1
        cu_seqlens = torch.cat([torch.tensor([0]), cuts, torch.tensor([length])])
        return document_ids_from_cu_seqlens(cu_seqlens)[None]

    cases = {
        "causal, 16 packed documents": {"document_ids": docs(16)},
        "causal, 64 packed documents": {"document_ids": docs(64)},
        "causal, window 24": {"window": (24, 0)},
        "plain causal": {},
    }
    q, k, v, dout = inputs(length)
    row_bytes = 2 * B * H_KV * D * 8  # K and V of one token, fp64
    lines = []
    for name, mask in cases.items():
        dense = make_mask(B, length, causal=True, **mask).dense(length)
        needed = 3 * needed_rows(group, dense, length) * row_bytes
        ratios = []
        for strategy in ("ring", "allgather", "dispatch"):
            _, sent = run(group, strategy, q, k, v, dout, causal=True, **mask)
            total = [0] * P
            dist.all_gather_object(total, sent)
            ratios.append(sum(total) / needed)
        lines.append(f"{name:28}" + "".join(f"{x:10.2f}x" for x in ratios))
    if dist.get_rank() == 0:
        print(f"\nbytes moved / 3 x needed, P={P}, L={length}")
        print(f"{'case':28}{'ring':>11}{'allgather':>11}{'dispatch':>11}")
        print("\n".join(lines))


def main() -> None:
    group = init_context_parallel_group(P, layout="zigzag", device_type="cpu")
    picture(group)
    table(group)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
