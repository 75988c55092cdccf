"""The seed's "Basic Setup", runnable: 4-way sequence parallelism with the seed's exact layer.

The seed's code with two changes: the import path is ``cp_dtensor``, and ``x_local`` (which the seed
uses without making it) is made here: a full input, identical on every rank, partitioned with
``cp_group.partition_sequence``. The layer is the seed's, full size (hidden 4096, 32 heads); the
sequence is short so that a laptop runs it in seconds:

    torchrun --standalone --nproc-per-node 4 docs/examples/seed_basic_setup.py

``--save FILE`` makes rank 0 write the input and the gathered output, which the tests compare with
the same layer (same seed, so the same weights) run on one process over the whole sequence.
"""

import argparse

import torch
import torch.distributed as dist

from cp_dtensor import ContextParallelAttention, init_context_parallel_group

SEQ_LEN, HIDDEN = 64, 4096


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--save", help="rank 0 writes {'x', 'output'} (whole sequences) to this file")
    args = parser.parse_args()

    # Initialize CP group (4-way sequence parallelism)
    cp_group = init_context_parallel_group(cp_size=4)

    # Use in attention layer
    torch.manual_seed(0)  # the same weights on every rank (they are replicated)
    attention = ContextParallelAttention(
        hidden_size=4096,
        num_heads=32,
        cp_group=cp_group,
        causal=True,  # For autoregressive models
    )

    # Input: local sequence shard (batch, seq_len_local, hidden_size)
    x = torch.randn(1, SEQ_LEN, HIDDEN, generator=torch.Generator().manual_seed(1))  # the same on every rank
    x_local = cp_group.partition_sequence(x, seq_dim=1)
    with torch.no_grad():
        output = attention(x_local)  # Computes full attention via ring communication

    print(f"rank {cp_group.rank}: x_local {tuple(x_local.shape)} -> output {tuple(output.shape)}", flush=True)
    assert output.shape == (1, SEQ_LEN // 4, HIDDEN)
    full_output = cp_group.gather_sequence(output, seq_dim=1)  # (1, SEQ_LEN, HIDDEN), in sequence order
    if args.save and dist.get_rank() == 0:
        torch.save({"x": x, "output": full_output}, args.save)
    dist.barrier()  # every rank done sending before gloo tears down (it can abort at exit otherwise)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
