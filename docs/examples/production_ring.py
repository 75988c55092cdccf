"""Your first context-parallel job: causal ring attention on 4 processes, checked.

Every rank builds the same global q, k, v (seeded), keeps its zigzag shard, and runs
``ring_attention`` forward and backward. Rank 0 gathers the output and the gradients
back into sequence order and compares them with fp64 full attention on the whole
sequence. Run it on a laptop (CPU, gloo; 4 processes on one machine):

    torchrun --standalone --nproc-per-node 4 docs/examples/production_ring.py

On a machine with 4 GPUs the same command runs on NCCL, one GPU per process.
"""

import torch
import torch.distributed as dist

from cp_dtensor import count_comm, init_context_parallel_group, ring_attention
from cp_dtensor.reference import full_attention

B, H, L, D = 1, 4, 256, 32  # batch, heads, tokens in the WHOLE sequence, head dim


def main() -> None:
    cp_group = init_context_parallel_group(cp_size=4)  # mesh ("dp", "cp") = (1, 4)
    device = "cuda" if cp_group.device_type == "cuda" else "cpu"
    torch.manual_seed(0)  # the same global tensors on every rank
    q, k, v, dout = (torch.randn(B, H, L, D, dtype=torch.float64) for _ in range(4))

    # This rank's shard: L / P = 64 tokens, two runs of 32 under zigzag.
    q_l, k_l, v_l = (
        cp_group.partition_sequence(x, seq_dim=2).to(device).requires_grad_()
        for x in (q, k, v)
    )
    where = (
        f"cp rank {cp_group.rank} of {cp_group.size}: runs {cp_group.runs(L)} "
        f"(start, length); q_local {tuple(q_l.shape)}"
    )
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, where)  # rank 0 prints them in rank order

    with count_comm() as comm:
        out_l = ring_attention(q_l, k_l, v_l, cp_group, causal=True)
        out_l.backward(cp_group.partition_sequence(dout, seq_dim=2).to(device))

    # Back to sequence order on every rank (an all-gather), to compare with one device.
    got = [
        cp_group.gather_sequence(x.detach(), seq_dim=2).cpu()
        for x in (out_l, q_l.grad, k_l.grad, v_l.grad)
    ]
    if dist.get_rank() == 0:
        print("\n".join(lines))
        q_r, k_r, v_r = (x.clone().requires_grad_() for x in (q, k, v))
        out_r = full_attention(q_r, k_r, v_r, causal=True)
        out_r.backward(dout)
        want = (out_r, q_r.grad, k_r.grad, v_r.grad)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            err = (a - b.detach()).abs().max().item()
            print(f"{name}: max |ring - full attention| = {err:.1e}")
            assert err < 1e-10, name  # fp64: only the order of the additions differs
        transfers = sum(comm.calls.values())
        print(f"rank 0 sent {comm.total_bytes:,} bytes in {transfers} transfers")
        print(f"  {dict(comm.calls)}")
    dist.barrier()  # every rank done sending before gloo tears down (else it can abort)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
