"""The seed's "Debugging" snippets, runnable on 4 processes: the partition check, the ring, the profiler.

Run it (CPU, gloo):

    torchrun --standalone --nproc-per-node 4 docs/examples/seed_debugging.py

What differs from the seed, and why (one line each):

* "GPU {rank}" is printed as "rank {rank}": on CPU the ranks are processes, not GPUs.
* "Set breakpoint in RingAttentionCommunicator.ring_forward()": a breakpoint stops a test, so this
  wraps the same method to print every rotation it starts (the breakpoint works the same way, e.g.
  ``breakpoint()`` in it on rank 0).
* ``sort_by="cuda_time_total"`` sorts by GPU time; on CPU it runs but sorts by a column that is
  not there (the rows come out unsorted), so this sorts by ``cpu_time_total``.
"""

import torch
import torch.distributed as dist

from cp_dtensor import ContextParallelAttention, RingAttentionCommunicator, count_comm, init_context_parallel_group

BATCH, SEQ_LEN, HIDDEN = 2, 64, 32


def main() -> None:
    cp_group = init_context_parallel_group(cp_size=4)
    torch.manual_seed(0)  # the same sequence and weights on every rank
    full_seq = torch.randn(BATCH, SEQ_LEN, HIDDEN)

    # Check Sequence Partitioning: verify each rank has the correct shard
    local_seq = cp_group.partition_sequence(full_seq, seq_dim=1)
    print(
        f"rank {cp_group.rank}: seq shape {local_seq.shape}, positions {cp_group.runs(SEQ_LEN)} (start, length)",
        flush=True,
    )
    assert local_seq.shape == (BATCH, SEQ_LEN // cp_group.size, HIDDEN)  # should be (batch, seq_len/cp_size, hidden)
    assert torch.equal(cp_group.gather_sequence(local_seq, seq_dim=1), full_seq)  # and they fit back together

    # Verify Ring Communication: watch every rotation where a breakpoint would stop
    original = RingAttentionCommunicator.ring_forward

    def watched(self, tensors, offset=1):
        if dist.get_rank() == 0:
            print(
                f"  ring_forward on rank 0: send {[tuple(t.shape) for t in tensors]} to rank "
                f"{self._peer(offset)}, receive from rank {self._peer(-offset)}",
                flush=True,
            )
        return original(self, tensors, offset)

    attention = ContextParallelAttention(hidden_size=HIDDEN, num_heads=4, cp_group=cp_group, causal=True)
    RingAttentionCommunicator.ring_forward = watched
    try:
        with count_comm() as comm:
            output = attention(local_seq)
    finally:
        RingAttentionCommunicator.ring_forward = original
    assert comm.calls["ring_send"] == cp_group.size - 1  # P - 1 K/V rotations in one forward

    # Profile Communication Overhead
    with torch.profiler.profile() as prof:
        output = attention(local_seq)
    if dist.get_rank() == 0:
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))
        # Look for send/recv/wait operations: the ring's waits are labelled cp_dtensor.ring.comm_wait
        assert any(e.key == "cp_dtensor.ring.comm_wait" for e in prof.key_averages())
    assert output.shape == local_seq.shape
    dist.barrier()  # every rank done sending before gloo tears down (it can abort at exit otherwise)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
