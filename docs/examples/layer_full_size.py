"""A full-size attention layer (hidden 4096, 32 heads) split over 4 processes.

A full input, identical on every rank, is cut with ``cp_group.partition_sequence``; each
rank runs ``ContextParallelAttention`` on its shard, and the ring gives every query
every key. The sequence is short so that a laptop runs it in seconds:

    torchrun --standalone --nproc-per-node 4 docs/examples/layer_full_size.py

``--save FILE`` makes rank 0 write the input and the gathered output, which the tests
compare with the same layer (same seed, so the same weights) run on one process.
"""

import argparse

import torch
import torch.distributed as dist

from cp_dtensor import ContextParallelAttention, init_context_parallel_group

SEQ_LEN, HIDDEN = 64, 4096


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--save", help="rank 0 writes {'x', 'output'} to this file")
    args = parser.parse_args()

    cp_group = init_context_parallel_group(cp_size=4)  # 4-way context parallelism

    torch.manual_seed(0)  # the same weights on every rank (they are replicated)
    attention = ContextParallelAttention(
        hidden_size=4096,
        num_heads=32,
        cp_group=cp_group,
        causal=True,  # for autoregressive models
    )

    # The same input on every rank; each keeps its shard (batch, seq_local, hidden).
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, SEQ_LEN, HIDDEN, generator=gen)
    x_local = cp_group.partition_sequence(x, seq_dim=1)
    with torch.no_grad():
        output = attention(x_local)  # full attention, via the ring

    shapes = f"x_local {tuple(x_local.shape)} -> output {tuple(output.shape)}"
    line = f"rank {cp_group.rank}: {shapes}"
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, line)
    if dist.get_rank() == 0:
        print("\n".join(lines))
    assert output.shape == (1, SEQ_LEN // 4, HIDDEN)
    full_output = cp_group.gather_sequence(output, seq_dim=1)  # (1, SEQ_LEN, HIDDEN)
    if args.save and dist.get_rank() == 0:
        torch.save({"x": x, "output": full_output}, args.save)
    dist.barrier()  # every rank done sending before gloo tears down (else it can abort)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
