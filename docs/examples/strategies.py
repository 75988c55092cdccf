"""The four ways to split attention, on the same inputs, on 4 processes (CPU, gloo).

One group serves all four: ``init_context_parallel_group(4, ulysses_size=2)`` makes the
cp axis a 2 x 2 (ring, ulysses) mesh, which hybrid needs and the others simply see as 4
cp ranks. Each strategy runs forward and backward under ``count_comm()``; rank 0 prints
the largest error against full attention in fp64 and the bytes each rank sent, next to
the communication model. Run it:

    torchrun --standalone --nproc_per_node=4 docs/examples/strategies.py
"""

import torch
import torch.distributed as dist

from cp_dtensor import (
    context_parallel_attention,
    count_comm,
    init_context_parallel_group,
)
from cp_dtensor.estimate.comm_model import comm_bytes
from cp_dtensor.reference import full_attention

# batch, query heads, K/V heads (GQA), sequence, head dim
B, H, H_KV, L, D = 1, 4, 2, 64, 16


def main() -> None:
    # mesh (dp, ring, ulysses) = (1, 2, 2)
    cp_group = init_context_parallel_group(cp_size=4, ulysses_size=2)
    torch.manual_seed(0)  # the same global tensors on every rank
    q, dout = (torch.randn(B, H, L, D, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, H_KV, L, D, dtype=torch.float64) for _ in range(2))

    # The oracle: full attention on the whole sequence, and its gradients.
    q_ref, k_ref, v_ref = (x.clone().requires_grad_() for x in (q, k, v))
    out_ref = full_attention(q_ref, k_ref, v_ref, causal=True)
    out_ref.backward(dout)
    expected = [out_ref.detach(), q_ref.grad, k_ref.grad, v_ref.grad]

    rows = []
    for strategy in ("ring", "ulysses", "allgather", "hybrid"):
        q_l, k_l, v_l = (
            cp_group.partition_sequence(x, seq_dim=2).requires_grad_()
            for x in (q, k, v)
        )
        with count_comm() as fwd:
            out_l = context_parallel_attention(
                q_l, k_l, v_l, cp_group, strategy=strategy, causal=True
            )
        with count_comm() as bwd:
            out_l.backward(cp_group.partition_sequence(dout, seq_dim=2))

        # Back to the whole sequence on every rank, to compare with the oracle.
        local = (out_l.detach(), q_l.grad, k_l.grad, v_l.grad)
        got = [cp_group.gather_sequence(t, seq_dim=2) for t in local]
        error = max((a - b).abs().max().item() for a, b in zip(got, expected))
        assert error < 1e-10, f"{strategy}: error {error}"  # fp64: summation order

        model = comm_bytes(
            strategy,
            batch=B,
            seq_len=L,
            heads=H,
            kv_heads=H_KV,
            head_dim=D,
            world_size=cp_group.size,
            dtype=q.dtype,
            ulysses_size=cp_group.ulysses_size,
        )
        sent = (dict(fwd.bytes), dict(bwd.bytes))
        matches = sent == (model.forward, model.backward)
        assert matches, f"{strategy}: sent {sent}, model {model}"
        rows.append((strategy, error, fwd.total_bytes, bwd.total_bytes, matches))

    if cp_group.rank == 0:
        u = cp_group.ulysses_size
        print(f"P={cp_group.size} (hybrid: {cp_group.size // u} x {u}), ", end="")
        print(f"B={B} H={H} H_kv={H_KV} L={L} D={D}, fp64, causal")
        print("bytes sent per rank:")
        header = ("strategy", "max error", "forward", "backward")
        print("{:<10} {:>10} {:>8} {:>9}  = model".format(*header))
        for strategy, error, fwd_bytes, bwd_bytes, matches in rows:
            same = "yes" if matches else "no"
            print(f"{strategy:<10} {error:10.1e} {fwd_bytes:8d} {bwd_bytes:9d}  {same}")
    dist.barrier()  # every rank done sending before gloo tears down (or it can abort)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
