"""Profile ring attention on real processes and print the ring's phases.

Run it (CPU, gloo; 2 processes on one machine):

    torchrun --standalone --nproc_per_node=2 docs/examples/profile_ring.py

Rank 0 prints the profiler's rows for the ring's labels (``cp_dtensor.ring.*``): the
per-block kernels, the merges, and the time spent waiting for the next K/V block.
"""

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from cp_dtensor import count_comm, init_context_parallel_group, ring_attention


def main() -> None:
    cp_group = init_context_parallel_group(cp_size=2)
    torch.manual_seed(0)  # the same global tensors on every rank
    q, k, v = (torch.randn(1, 4, 2048, 64) for _ in range(3))
    q_l, k_l, v_l = (
        cp_group.partition_sequence(t, seq_dim=2).requires_grad_() for t in (q, k, v)
    )

    with profile(activities=[ProfilerActivity.CPU]) as prof, count_comm() as comm:
        out = ring_attention(q_l, k_l, v_l, cp_group, causal=True)
        out.sum().backward()

    if cp_group.rank == 0:
        events = [e for e in prof.key_averages() if e.key.startswith("cp_dtensor.")]
        print(f"{'label':40s} {'calls':>6s} {'total ms':>10s}")
        for e in sorted(events, key=lambda e: e.key):
            print(f"{e.key:40s} {e.count:6d} {e.cpu_time_total / 1e3:10.1f}")
        print(f"sent by rank 0: {dict(comm.calls)}, {comm.total_bytes:,} bytes")
        wanted = ("attn_block", "merge", "comm_wait")
        assert {f"cp_dtensor.ring.{w}" for w in wanted} <= {e.key for e in events}
    dist.barrier()  # every rank done sending before gloo tears down (else it can abort)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
