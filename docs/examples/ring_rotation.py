"""The ring's communication alone, on real processes: pass K/V blocks around P ranks.

Each rank starts with its own K/V block, then P - 1 times sends the block it holds to
rank + 1 while receiving rank - 1's. Run it (CPU, gloo; 4 processes on one machine):

    torchrun --standalone --nproc_per_node=4 docs/examples/ring_rotation.py

Rank 0 prints which rank's block every rank held at every step.
"""

import torch
import torch.distributed as dist


def rotate(block: torch.Tensor) -> torch.Tensor:
    """Send ``block`` to the next rank; return the block received from the previous."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    received = torch.empty_like(block)
    # Both in flight at once, so no rank waits for another to start. On gloo these
    # are two lone calls (batch_isend_irecv has been reported to hang there); on NCCL
    # the pair would have to be one batch_isend_irecv group, or a ring of 2 can
    # deadlock.
    requests = [
        dist.irecv(received, (rank - 1) % world_size),
        dist.isend(block, (rank + 1) % world_size),
    ]
    for request in requests:
        request.wait()
    return received


def main() -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    S_local, D = 4, 8
    # (K and V, S_local, D), filled with the owner's rank
    kv = torch.full((2, S_local, D), float(rank))
    held = []
    for step in range(world_size):
        source = int(kv[0, 0, 0])  # whose block this is
        assert source == (rank - step) % world_size
        held.append(source)
        # Here a real ring would attend its queries to kv and merge (out, lse),
        # while the next block is already on its way.
        if step < world_size - 1:  # P - 1 sends: the last block is not passed on
            kv = rotate(kv)
    table = [None] * world_size
    dist.all_gather_object(table, held)
    if rank == 0:
        print("block held (its owner's rank):")
        print("        " + "  ".join(f"step {s}" for s in range(world_size)))
        for r, row in enumerate(table):
            print(f"rank {r}  " + "  ".join(f"{src:6d}" for src in row))
    # Every rank done sending before gloo tears down (it can abort at exit otherwise).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
