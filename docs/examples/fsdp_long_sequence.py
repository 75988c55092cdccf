"""The setup for models that do not fit, on 4 CPU processes: FSDP2 over dp x cp,
checkpointed blocks, a chunked loss.

    torchrun --standalone --nproc-per-node 4 docs/examples/fsdp_long_sequence.py

Two data-parallel replicas of two context-parallel ranks each (dp 2 x cp 2). Every
decoder block recomputes its activations in the backward
(``activation_checkpointing="full"``), the loss never holds the whole ``(B, S, V)``
logits (``loss_chunk_size``), and FSDP2 shards parameters, gradients and AdamW's state
over all four ranks. The same step with none of the three (DDP, the plain model) on the
same ranks must give the same loss and the same updated weights (fp64: only the order of
sums differs): the options change what a rank holds, not what it computes.
"""

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from cp_dtensor import apply_ddp, apply_fsdp, init_context_parallel_group, shift_labels
from cp_dtensor.training import ModelConfig, TransformerWithCP

BATCH, SEQ_LEN = 2, 64  # the global batch: one sequence per dp replica
PLAIN = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4)
# recompute every block; the loss takes 16 tokens of logits at a time
LONG = dict(activation_checkpointing="full", loss_chunk_size=16)


def step(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """One forward, backward and AdamW step; returns the global-batch mean loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(ids, labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def main() -> None:
    cp_group = init_context_parallel_group(cp_size=2)  # 4 ranks: ("dp", "cp") = (2, 2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, PLAIN["vocab_size"], (BATCH, SEQ_LEN), generator=gen)
    labels = shift_labels(ids)  # on the whole sequence, before sharding

    # this replica's sequence, then this rank's shard of it
    row = cp_group.dp_mesh.get_local_rank()
    ids_l, labels_l = (
        cp_group.partition_sequence(t[row : row + 1], seq_dim=1) for t in (ids, labels)
    )

    torch.manual_seed(0)  # the same initial weights on every rank, and in both models
    model = apply_fsdp(
        TransformerWithCP(ModelConfig(**PLAIN, **LONG), cp_group=cp_group).double(),
        cp_group,
    )
    loss = step(model, ids_l, labels_l)

    torch.manual_seed(0)
    plain = TransformerWithCP(ModelConfig(**PLAIN), cp_group=cp_group).double()
    loss_plain = step(apply_ddp(plain, cp_group), ids_l, labels_l)

    # FSDP holds a shard: gather the whole tensor
    def whole(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if isinstance(t, DTensor) else t

    sharded = dict(model.named_parameters())
    error = max(
        max(
            (whole(sharded[n].grad) - p.grad).abs().max().item(),
            (whole(sharded[n]) - p).abs().max().item(),
        )
        for n, p in plain.named_parameters()
    )
    assert abs(loss - loss_plain) < 1e-10 and error < 1e-10, (loss, loss_plain, error)
    if dist.get_rank() == 0:
        print(
            f"loss {loss:.6f} = plain DDP {loss_plain:.6f}; "
            f"largest gradient or weight difference {error:.1e}"
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
