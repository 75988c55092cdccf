"""Sinks, ALiBi and a prefix-LM mask on real ranks, every strategy against the oracle.

Every rank builds the same global sequence (seeded) and its zigzag shard of q, k, v.
Each strategy runs with attention sinks (one learned logit per head, with a gradient),
an ALiBi ``score_mod`` and a prefix-LM ``mask_mod``, both on GLOBAL positions; rank 0
compares the gathered output and gradients with fp64 full attention of the whole
sequence, and sums the ranks' shares of the sinks' gradient. Run it (CPU, gloo; 4
processes on one machine):

    torchrun --standalone --nproc_per_node=4 docs/examples/score_functions.py
"""

import torch
import torch.distributed as dist

from cp_dtensor import context_parallel_attention, init_context_parallel_group
from cp_dtensor.reference import full_attention

B, H, L, D = 1, 4, 64, 8
PREFIX = 12  # the first 12 tokens (an instruction, say) see each other both ways
SLOPES = torch.tensor(
    [2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float64
)


def alibi(score, b, h, q_idx, kv_idx):
    """A penalty growing with the distance to the key; one slope per head."""
    return score + SLOPES[h] * (kv_idx - q_idx)


def prefix_lm(b, h, q_idx, kv_idx):
    """Causal, except that the prefix sees itself in full."""
    return (kv_idx <= q_idx) | (kv_idx < PREFIX)


def main() -> None:
    group = init_context_parallel_group(4, ulysses_size=2, device_type="cpu")
    torch.manual_seed(0)  # the same global tensors on every rank
    q, k, v, dout = (torch.randn(B, H, L, D, dtype=torch.float64) for _ in range(4))
    sinks = torch.tensor([-2.0, 0.5, 1.0, 3.0], dtype=torch.float64)

    # The oracle: one process, the whole sequence, the functions on positions 0..L-1.
    leaves = [x.clone().requires_grad_() for x in (q, k, v, sinks)]
    pos = torch.arange(L)
    visible = prefix_lm(None, None, pos[:, None], pos[None, :])  # (L, L)
    want = full_attention(*leaves[:3], mask=visible, sinks=leaves[3], score_mod=alibi)
    want = [want.detach(), *torch.autograd.grad(want, leaves, dout)]

    for strategy in ("ring", "allgather", "ulysses", "hybrid"):
        shards = [
            group.partition_sequence(x, seq_dim=2).requires_grad_() for x in (q, k, v)
        ]
        my_sinks = sinks.clone().requires_grad_()  # a parameter every rank holds
        out = context_parallel_attention(
            *shards,
            group,
            strategy=strategy,
            sinks=my_sinks,
            score_mod=alibi,
            mask_mod=prefix_lm,
        )
        out.backward(group.partition_sequence(dout, seq_dim=2))
        got = [
            group.gather_sequence(x, seq_dim=2)
            for x in (out.detach(), *(s.grad for s in shards))
        ]
        dist.all_reduce(
            my_sinks.grad
        )  # each rank's share; DDP/FSDP sum it over the ranks too
        got.append(my_sinks.grad)
        for name, g, w in zip(("out", "dq", "dk", "dv", "dsinks"), got, want):
            # fp64: the results differ by summation order only
            torch.testing.assert_close(g, w, rtol=0, atol=1e-10, msg=name)
        if dist.get_rank() == 0:
            print(
                f"{strategy}: output and gradients (sinks' included) match the oracle"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
