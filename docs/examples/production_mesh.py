"""The ("dp", "cp") DeviceMesh, its sub-meshes, and a sequence as a DTensor, on 4 real processes.

``init_context_parallel_group(cp_size=2)`` on 4 ranks makes a 2 x 2 mesh: 2 data-parallel replicas,
each splitting its sequences over 2 context-parallel ranks. Each rank prints where it sits; then a
sequence is placed ``Shard(1)`` on the cp sub-mesh with ``distribute_sequence``, the same DTensor as
torch's ``distribute_tensor``: its logical tensor is the sequence in natural order, while the local
shard the strategies compute on (``partition_sequence``) holds the zigzag chunks. Finally
``ContextParallelAttention`` takes the DTensor and returns one placed the same way, whose
``full_tensor()`` is the layer's output in natural order. Run it (CPU, gloo):

    torchrun --standalone --nproc-per-node 4 docs/examples/production_mesh.py
"""

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from cp_dtensor import ContextParallelAttention, init_context_parallel_group

L, E = 16, 8  # tokens per sequence, hidden size


def main() -> None:
    cp_group = init_context_parallel_group(cp_size=2, timeout=60)  # world 4 -> mesh ("dp", "cp") = (2, 2)
    mesh, rank = cp_group.mesh, dist.get_rank()
    if rank == 0:
        print(f"{mesh}\n  rank grid (rows: dp, columns: cp) = {mesh.mesh.tolist()}", flush=True)
    dist.barrier()
    print(
        f"rank {rank}: coordinate (dp, cp) = {tuple(mesh.get_coordinate())}, my cp ring = ranks "
        f"{cp_group.cp_mesh.mesh.tolist()}, my dp group = ranks {cp_group.dp_mesh.mesh.tolist()}",
        flush=True,
    )
    dist.barrier()

    # Each dp replica has its own sequence; the cp ranks of a replica share it.
    dp_rank = cp_group.dp_mesh.get_local_rank()
    x = (torch.arange(L, dtype=torch.float32) + 100 * dp_rank).reshape(1, L, 1)  # (batch, seq, hidden)
    x_dt = cp_group.distribute_sequence(x, seq_dim=1)
    assert isinstance(x_dt, DTensor) and tuple(x_dt.placements) == (Shard(1),)
    assert x_dt.device_mesh == cp_group.cp_mesh and x_dt.shape == x.shape  # global shape, local data

    # A DTensor means natural order: rank r holds the r-th contiguous chunk, full_tensor() is x.
    same = distribute_tensor(x, cp_group.cp_mesh, [Shard(1)])
    assert torch.equal(x_dt.to_local(), same.to_local())
    logical = x_dt.full_tensor()  # an all-gather over the cp axis only
    assert torch.equal(logical, x)
    # The strategies compute on this rank's zigzag chunks: the local shard of the fast path.
    x_local = cp_group.partition_sequence(x, seq_dim=1)
    assert torch.equal(x_local.flatten(), x.flatten()[cp_group.position_ids(L)])
    in_order = cp_group.gather_sequence(x_local, seq_dim=1)  # natural order again (collective too)
    assert torch.equal(in_order, x)
    if rank == 0:
        print(
            f"placements {x_dt.placements} on the cp mesh; local {tuple(x_dt.to_local().shape)}, "
            f"global {tuple(x_dt.shape)}"
        )
        print("x                      :", x.flatten().int().tolist())
        print("x_dt.full_tensor()     :", logical.flatten().int().tolist())
        print("x_dt.to_local()        :", x_dt.to_local().flatten().int().tolist())
        print("partition_sequence(x)  :", x_local.flatten().int().tolist())
        print("gather_sequence(local) :", in_order.flatten().int().tolist())

    # The attention layer takes the DTensor and returns one, placed the same way (it moves the
    # chunks into the zigzag layout and back: one all-to-all each way, see docs/failure-modes.md).
    torch.manual_seed(0)  # the same weights on every rank
    attention = ContextParallelAttention(hidden_size=E, num_heads=2, cp_group=cp_group, causal=True)
    h = torch.randn(1, L, E, generator=torch.Generator().manual_seed(dp_rank))
    out_dt = attention(cp_group.distribute_sequence(h, seq_dim=1))
    out_local = attention(cp_group.partition_sequence(h, seq_dim=1))
    assert isinstance(out_dt, DTensor) and tuple(out_dt.placements) == (Shard(1),)
    in_order = cp_group.gather_sequence(out_local, seq_dim=1)
    torch.testing.assert_close(out_dt.full_tensor(), in_order, rtol=0, atol=0)  # same computation, same bits
    if rank == 0:
        print(f"attention(DTensor) -> DTensor {tuple(out_dt.shape)} placed {out_dt.placements}")
    dist.barrier()  # every rank done sending before gloo tears down (it can abort at exit otherwise)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
