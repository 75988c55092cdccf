"""3-D parallelism on one mesh: dp 2 x cp 2 x tp 2 on 8 CPU processes (gloo), a tiny TransformerWithCP.

    torchrun --standalone --nproc-per-node 8 docs/examples/train_3d.py

Every rank takes three AdamW steps on its share of the same global batches: its dp rank's
sequences, its cp rank's tokens of them, its tp rank's heads. Rank 0 prints where each rank sits on
the mesh, which heads it holds, and the loss of each step (the same on every rank).
"""

import torch
import torch.distributed as dist

from cp_dtensor import (
    ModelConfig,
    TransformerWithCP,
    apply_ddp,
    init_context_parallel_group,
    parallelize_for_tp,
    shift_labels,
)


def main() -> None:
    cp_group = init_context_parallel_group(cp_size=2, tp_size=2, device_type="cpu")  # dp = 8 / (2 * 2)
    config = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    torch.manual_seed(0)  # the same whole model on every rank, then split
    model = parallelize_for_tp(TransformerWithCP(config, cp_group=cp_group), cp_group)  # heads over tp
    model = apply_ddp(model, cp_group)  # gradients summed over dp x cp, never over tp
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    dp, dp_rank = cp_group.dp_mesh.size(), cp_group.dp_mesh.get_local_rank()
    batch, seq_len = 4, 32  # global: 4 sequences of 32 tokens per step
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(3):
        ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=gen)  # same on every rank
        labels = shift_labels(ids)  # on the whole sequence, before splitting
        mine = slice(dp_rank * batch // dp, (dp_rank + 1) * batch // dp)
        ids_local, labels_local = (cp_group.partition_sequence(t[mine], seq_dim=1) for t in (ids, labels))
        loss = model(ids_local, labels_local)  # the global mean over all 4 x 32 tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    q_proj = model.layers[0].attn.q_proj.weight  # a DTensor, Shard(0) on the tp mesh
    head_dim = config.hidden_size // config.num_heads
    first_head = cp_group.tp_mesh.get_local_rank() * q_proj.to_local().shape[0] // head_dim
    heads = f"{first_head}..{first_head + q_proj.to_local().shape[0] // head_dim - 1}"
    row = (dist.get_rank(), dp_rank, cp_group.rank, cp_group.tp_mesh.get_local_rank(), heads, losses)
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    assert all(r[-1] == losses for r in rows), "every rank reports the global loss"
    if dist.get_rank() == 0:
        print("rank  dp  cp  tp  query heads")
        for rank, d, c, t, h, _ in rows:
            print(f"{rank:>4} {d:>3} {c:>3} {t:>3}  {h}")
        print("loss per step:", " ".join(f"{x:.4f}" for x in losses))
    dist.barrier()  # every rank done sending before gloo tears down (it can abort at exit otherwise)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
