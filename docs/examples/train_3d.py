"""3-D parallelism on one mesh: dp 2 x cp 2 x tp 2 on 8 CPU processes, a tiny model.

    torchrun --standalone --nproc-per-node 8 docs/examples/train_3d.py

Every rank takes three AdamW steps on its share of the same global batches: its dp
rank's sequences, its cp rank's tokens of them, its tp rank's heads. Rank 0 prints where
each rank sits on the mesh, which query heads it holds, and the loss of each step (the
same on every rank).
"""

import torch
import torch.distributed as dist

from cp_dtensor import (
    apply_ddp,
    init_context_parallel_group,
    parallelize_for_tp,
    shift_labels,
)
from cp_dtensor.training import ModelConfig, TransformerWithCP


def main() -> None:
    # 8 ranks: dp = 8 / (cp 2 * tp 2) = 2
    cp_group = init_context_parallel_group(cp_size=2, tp_size=2, device_type="cpu")
    config = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)  # the same whole model on every rank, then split
    model = TransformerWithCP(config, cp_group=cp_group)
    model = parallelize_for_tp(model, cp_group)  # heads over tp
    model = apply_ddp(model, cp_group)  # gradients summed over dp x cp, never over tp
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    dp, dp_rank = cp_group.dp_mesh.size(), cp_group.dp_mesh.get_local_rank()
    batch, seq_len = 4, 32  # global: 4 sequences of 32 tokens per step
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(3):
        shape = (batch, seq_len)
        ids = torch.randint(
            0, config.vocab_size, shape, generator=gen
        )  # same everywhere
        labels = shift_labels(ids)  # on the whole sequence, before splitting
        mine = slice(dp_rank * batch // dp, (dp_rank + 1) * batch // dp)
        ids_local, labels_local = (
            cp_group.partition_sequence(t[mine], seq_dim=1) for t in (ids, labels)
        )
        loss = model(ids_local, labels_local)  # the global mean over all 4 x 32 tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    q_proj = model.layers[0].attn.q_proj.weight  # a DTensor, Shard(0) on the tp mesh
    heads_here = q_proj.to_local().shape[0] // (config.hidden_size // config.num_heads)
    tp_rank = cp_group.tp_mesh.get_local_rank()
    first = tp_rank * heads_here
    heads = f"{first}..{first + heads_here - 1}"
    row = (dist.get_rank(), dp_rank, cp_group.rank, tp_rank, heads, losses)
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    assert all(r[-1] == losses for r in rows), "every rank reports the global loss"
    if dist.get_rank() == 0:
        print("rank  dp  cp  tp  query heads")
        for rank, d, c, t, h, _ in rows:
            print(f"{rank:>4} {d:>3} {c:>3} {t:>3}  {h}")
        print("loss per step:", " ".join(f"{x:.4f}" for x in losses))
    dist.barrier()  # every rank done sending before gloo tears down (else it can abort)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
