"""Packed documents and a sliding window on real ranks: the ring against the oracle.

Every rank builds the same global sequence (seeded), keeps its zigzag shard of q, k, v
and of the document ids, and runs ``ring_attention`` with ``document_ids=`` (then the
same documents, padded, under a per-document zigzag, and then a causal window). Rank 0
gathers the output and the gradients and compares them with fp64 full attention under
the same mask written out densely. Run it (CPU, gloo; 4 processes on one machine):

    torchrun --standalone --nproc_per_node=4 docs/examples/packed_ring.py
"""

import torch
import torch.distributed as dist

from cp_dtensor import (
    DocumentZigzag,
    count_comm,
    document_ids_from_cu_seqlens,
    init_context_parallel_group,
    ring_attention,
)
from cp_dtensor.reference import full_attention, make_mask

B, H, L, D = 1, 2, 64, 8


def check(group, q, k, v, dout, **mask) -> dict:
    """Run the ring on this rank's shards, compare with the oracle; return the sends."""
    shards = [group.partition_sequence(x, seq_dim=2) for x in (q, k, v)]
    shards = [x.requires_grad_() for x in shards]
    with count_comm() as comm:
        out = ring_attention(*shards, group, causal=True, **mask)
        out.backward(group.partition_sequence(dout, seq_dim=2))
    local = (out.detach(), *(s.grad for s in shards))
    got = [group.gather_sequence(x, seq_dim=2) for x in local]
    ids = mask.get("document_ids")
    if ids is not None and ids.shape[1] != L:  # a shard: the oracle needs the whole row
        ids = group.gather_sequence(ids, seq_dim=1)
    window = mask.get("window")
    dense = make_mask(B, L, causal=True, window=window, document_ids=ids).dense(L)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want = full_attention(*leaves, mask=dense)
    want = [want.detach(), *torch.autograd.grad(want, leaves, dout)]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        # fp64: the results differ by summation order only
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10, msg=name)
    return dict(comm.calls)


def main() -> None:
    group = init_context_parallel_group(4, layout="zigzag", device_type="cpu")
    torch.manual_seed(0)  # the same global tensors on every rank
    q, dout = (torch.randn(B, H, L, D, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, H, L, D, dtype=torch.float64) for _ in range(2))

    # Five documents of any length: shorter than a zigzag chunk (8 tokens), longer
    # than a shard (16).
    cu_seqlens = torch.tensor([0, 5, 27, 30, 47, L])
    doc_ids = document_ids_from_cu_seqlens(cu_seqlens)[None]  # (B, L): 0,0,0,0,0,1,..
    # This rank's ids; the ring all-gathers them once.
    local_ids = group.partition_sequence(doc_ids, seq_dim=1)
    packed_sends = check(group, q, k, v, dout, document_ids=local_ids)

    # The same kind of row placed by a zigzag inside every document: lengths must be
    # multiples of 2P = 8, so each document is padded with id -1 (padding sees nothing
    # and is seen by nothing): 8 + 24 + 8 + 24 = 64 tokens.
    padded = [[i] * n + [-1] * (-n % 8) for i, n in enumerate([5, 22, 3, 17])]
    padded_ids = torch.tensor(sum(padded, []))[None]
    # The same process groups, another placement of the tokens.
    per_doc = group.with_layout(DocumentZigzag.from_document_ids(padded_ids))
    local_ids = per_doc.partition_sequence(padded_ids, seq_dim=1)
    check(per_doc, q, k, v, dout, document_ids=local_ids)
    runs = per_doc.runs(L)  # this rank's pieces: (start, length)

    window_sends = {}
    for layout in ("zigzag", "contiguous"):
        group = init_context_parallel_group(4, layout=layout, device_type="cpu")
        # Each query sees itself and the 3 tokens before it.
        window_sends[layout] = check(group, q, k, v, dout, window=(3, 0))

    if dist.get_rank() == 0:
        print("packed documents: output and gradients match fp64 full attention")
        print(f"  sends per rank: {packed_sends}")
        print("per-document zigzag: match; rank 0 holds (start, length)")
        print(f"  {runs}")
        for layout, sends in window_sends.items():
            print(f"window (3, 0), {layout}: match; sends per rank: {sends}")
    dist.barrier()  # every rank done sending before gloo tears down (or it can abort)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
