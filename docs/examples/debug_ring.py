"""Debugging a context-parallel layer on 4 processes: the partition, the ring, the
profiler.

Run it (CPU, gloo):

    torchrun --standalone --nproc-per-node 4 docs/examples/debug_ring.py

* Each rank checks its shard's shape and that the shards fit back together.
* ``RingAttentionCommunicator.ring_forward`` starts every rotation; this wraps it to
  print each one on rank 0 (a ``breakpoint()`` there stops in the same place).
* The profiler shows the ring's own labels (``cp_dtensor.ring.*``); for the whole table,
  ``prof.key_averages().table(sort_by="cpu_time_total")`` (on GPUs:
  ``cuda_time_total``).
"""

import torch
import torch.distributed as dist

from cp_dtensor import (
    ContextParallelAttention,
    RingAttentionCommunicator,
    count_comm,
    init_context_parallel_group,
)

BATCH, SEQ_LEN, HIDDEN = 2, 64, 32


def main() -> None:
    cp_group = init_context_parallel_group(cp_size=4)
    torch.manual_seed(0)  # the same sequence and weights on every rank
    full_seq = torch.randn(BATCH, SEQ_LEN, HIDDEN)

    # Check the partition: each rank holds (batch, seq_len / cp_size, hidden)
    local_seq = cp_group.partition_sequence(full_seq, seq_dim=1)
    line = (
        f"rank {cp_group.rank}: {tuple(local_seq.shape)}, runs {cp_group.runs(SEQ_LEN)}"
    )
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, line)
    if dist.get_rank() == 0:
        print("\n".join(lines), flush=True)
    assert local_seq.shape == (BATCH, SEQ_LEN // cp_group.size, HIDDEN)
    assert torch.equal(cp_group.gather_sequence(local_seq, seq_dim=1), full_seq)

    # Watch the ring: print every rotation where a breakpoint would stop
    original = RingAttentionCommunicator.ring_forward

    def watched(self, tensors, offset=1):
        if dist.get_rank() == 0:
            shapes = [tuple(t.shape) for t in tensors]
            print(
                f"ring_forward: rank 0 sends {shapes} to {self._peer(offset)}, "
                f"receives from {self._peer(-offset)}",
                flush=True,
            )
        return original(self, tensors, offset)

    attention = ContextParallelAttention(
        hidden_size=HIDDEN, num_heads=4, cp_group=cp_group, causal=True
    )
    RingAttentionCommunicator.ring_forward = watched
    try:
        with count_comm() as comm:
            output = attention(local_seq)
    finally:
        RingAttentionCommunicator.ring_forward = original
    assert comm.calls["ring_send"] == cp_group.size - 1  # P - 1 K/V rotations forward

    # Profile: the ring's waits for a block are labelled cp_dtensor.ring.comm_wait
    with torch.profiler.profile() as prof:
        output = attention(local_seq)
    if dist.get_rank() == 0:
        events = [e for e in prof.key_averages() if e.key.startswith("cp_dtensor.")]
        print(f"{'label':32s} {'calls':>5s} {'total ms':>9s}")
        for e in sorted(events, key=lambda e: e.key):
            print(f"{e.key:32s} {e.count:5d} {e.cpu_time_total / 1e3:9.1f}")
        assert any(e.key == "cp_dtensor.ring.comm_wait" for e in events)
    assert output.shape == local_seq.shape
    dist.barrier()  # every rank done sending before gloo tears down (else it can abort)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
