"""DeviceMesh and DTensor on 4 processes: a 2 x 2 mesh ("dp", "cp"), a sequence
sharded over "cp", and the collective each change of placement runs (CommDebugMode).

Run it (CPU, gloo; 4 processes):

    torchrun --standalone --nproc_per_node=4 docs/examples/dtensor_basics.py
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.debug import CommDebugMode


def main() -> None:
    # starts the gloo process group too
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    rank = dist.get_rank()
    cp_mesh = mesh["cp"]  # the 1-D sub-mesh: this rank and the other rank of its row

    x = torch.arange(8.0).reshape(1, 8)  # (batch, seq): the same on every rank
    piece = x.chunk(2, dim=1)[cp_mesh.get_local_rank()]
    x_dt = DTensor.from_local(piece, cp_mesh, [Shard(1)])
    with CommDebugMode() as comm:
        whole = x_dt.redistribute(cp_mesh, [Replicate()])  # every rank: all 8 tokens
    gathered = {op.__name__: n for op, n in comm.get_comm_counts().items()}

    # a sum not yet taken: each cp rank holds one summand
    ones = DTensor.from_local(torch.ones(2), cp_mesh, [Partial()])
    with CommDebugMode() as comm:
        total = ones.redistribute(cp_mesh, [Replicate()])
    reduced = {op.__name__: n for op, n in comm.get_comm_counts().items()}

    line = (
        f"rank {rank}: (dp, cp) = {mesh.get_coordinate()}, "
        f"cp ranks {cp_mesh.mesh.tolist()}, local {x_dt.to_local().tolist()[0]}"
    )
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, line)
    if rank == 0:
        print(mesh)
        print("\n".join(lines))
        print(f"x_dt: global shape {tuple(x_dt.shape)}, placements {x_dt.placements}")
        print(f"Shard(1) -> Replicate(): {whole.to_local().tolist()[0]}")
        print(f"  ran {gathered}")
        print(f"Partial() -> Replicate(): {total.to_local().tolist()}")
        print(f"  ran {reduced}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
