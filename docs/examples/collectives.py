"""The collectives of the glossary, on real processes: each rank starts with its own
small tensor, and every rank prints what it ends with (gathered to rank 0, so that the
lines come in rank order).

Run it (CPU, gloo; 4 processes):

    torchrun --standalone --nproc_per_node=4 docs/examples/collectives.py
"""

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = torch.arange(world) + 10 * rank  # rank 0: [0 1 2 3], rank 1: [10 ... 13]

    summed = mine.clone()
    dist.all_reduce(summed)  # every rank: the sum over ranks

    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)  # every rank: every rank's tensor
    gathered = torch.cat(gathered)

    piece = torch.empty(1, dtype=mine.dtype)
    dist.reduce_scatter_single(piece, mine)  # rank r: element r of the sum

    swapped = torch.empty_like(mine)
    dist.all_to_all_single(swapped, mine)  # rank r: element r of every rank's tensor

    # the ring's step: send to rank + 1, receive from rank - 1
    received = torch.empty_like(mine)
    ops = [
        dist.P2POp(dist.isend, mine, (rank + 1) % world),
        dist.P2POp(dist.irecv, received, (rank - 1) % world),
    ]
    for work in dist.batch_isend_irecv(ops):
        work.wait()

    line = (
        f"rank {rank}: mine {mine.tolist()}  all_reduce {summed.tolist()}\n"
        f"        all_gather {gathered.tolist()}\n"
        f"        reduce_scatter {piece.tolist()}  all_to_all {swapped.tolist()}"
        f"  from rank {(rank - 1) % world}: {received.tolist()}"
    )
    lines = [None] * world
    dist.all_gather_object(lines, line)
    if rank == 0:
        print("\n".join(lines))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
