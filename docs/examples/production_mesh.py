"""The ("dp", "cp") DeviceMesh, its sub-meshes, and a sequence as a DTensor, on 4
processes.

``init_context_parallel_group(cp_size=2)`` on 4 ranks makes a 2 x 2 mesh: 2
data-parallel replicas, each splitting its sequences over 2 context-parallel ranks. Each
rank says where it sits; then a sequence is placed ``Shard(1)`` on the cp sub-mesh with
``distribute_sequence``, the same DTensor as torch's ``distribute_tensor``: its logical
tensor is the sequence in natural order, while the local shard the strategies compute on
(``partition_sequence``) holds the zigzag chunks. Finally ``ContextParallelAttention``
takes the DTensor and returns one placed the same way. Run it (CPU, gloo):

    torchrun --standalone --nproc-per-node 4 docs/examples/production_mesh.py

"""

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from cp_dtensor import ContextParallelAttention, init_context_parallel_group

L, E = 16, 8  # tokens per sequence, hidden size


def main() -> None:
    # world 4 -> mesh ("dp", "cp") = (2, 2)
    cp_group = init_context_parallel_group(cp_size=2, timeout=60)
    mesh, rank = cp_group.mesh, dist.get_rank()
    where = (
        f"rank {rank}: (dp, cp) = {tuple(mesh.get_coordinate())}, "
        f"cp ring = ranks {cp_group.cp_mesh.mesh.tolist()}, "
        f"dp group = ranks {cp_group.dp_mesh.mesh.tolist()}"
    )
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, where)  # rank 0 prints them in rank order
    if rank == 0:
        print(mesh)
        print("rank grid (rows: dp, columns: cp) =", mesh.mesh.tolist())
        print("\n".join(lines))

    # Each dp replica has its own sequence; the cp ranks of a replica share it.
    dp_rank = cp_group.dp_mesh.get_local_rank()
    x = (torch.arange(L, dtype=torch.float32) + 100 * dp_rank).reshape(
        1, L, 1
    )  # (B, L, E)
    x_dt = cp_group.distribute_sequence(x, seq_dim=1)
    assert isinstance(x_dt, DTensor) and tuple(x_dt.placements) == (Shard(1),)
    assert x_dt.device_mesh == cp_group.cp_mesh and x_dt.shape == x.shape

    # A DTensor means natural order: rank r holds the r-th contiguous chunk.
    same = distribute_tensor(x, cp_group.cp_mesh, [Shard(1)])
    assert torch.equal(x_dt.to_local(), same.to_local())
    logical = x_dt.full_tensor()  # an all-gather over the cp axis only
    assert torch.equal(logical, x)
    # The strategies compute on this rank's zigzag chunks: the fast path's local shard.
    x_local = cp_group.partition_sequence(x, seq_dim=1)
    assert torch.equal(x_local.flatten(), x.flatten()[cp_group.position_ids(L)])
    in_order = cp_group.gather_sequence(x_local, seq_dim=1)  # natural order again
    assert torch.equal(in_order, x)
    if rank == 0:
        local, whole = tuple(x_dt.to_local().shape), tuple(x_dt.shape)
        print(f"placements {x_dt.placements}; local {local}, global {whole}")
        print("x                      :", x.flatten().int().tolist())
        print("x_dt.full_tensor()     :", logical.flatten().int().tolist())
        print("x_dt.to_local()        :", x_dt.to_local().flatten().int().tolist())
        print("partition_sequence(x)  :", x_local.flatten().int().tolist())
        print("gather_sequence(local) :", in_order.flatten().int().tolist())

    # The layer takes the DTensor and returns one, placed the same way (it moves the
    # chunks into the zigzag layout and back: one all-to-all each way).
    torch.manual_seed(0)  # the same weights on every rank
    attention = ContextParallelAttention(
        hidden_size=E, num_heads=2, cp_group=cp_group, causal=True
    )
    h = torch.randn(1, L, E, generator=torch.Generator().manual_seed(dp_rank))
    out_dt = attention(cp_group.distribute_sequence(h, seq_dim=1))
    out_local = attention(cp_group.partition_sequence(h, seq_dim=1))
    assert isinstance(out_dt, DTensor) and tuple(out_dt.placements) == (Shard(1),)
    in_order = cp_group.gather_sequence(out_local, seq_dim=1)
    # The same computation on the same tokens: the same bits.
    torch.testing.assert_close(out_dt.full_tensor(), in_order, rtol=0, atol=0)
    if rank == 0:
        print(
            f"attention(DTensor) -> DTensor {tuple(out_dt.shape)} "
            f"placed {out_dt.placements}"
        )
    dist.barrier()  # every rank done sending before gloo tears down (else it can abort)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
