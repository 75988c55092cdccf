"""A complete training loop under CP x DP: TransformerWithCP on LongSequenceDataset.

4 CPU processes, 2-way CP x 2-way DP, 256-token sequences and a small model, so a
laptop finishes in seconds:

    torchrun --standalone --nproc-per-node 4 docs/examples/training_loop.py

and, for comparison, on one process over the same global batches: ``python
docs/examples/training_loop.py --cp-size 1``. ``--save FILE`` makes rank 0 write the
losses and the final parameters; the tests check that both runs agree.

* ``init_context_parallel_group`` starts the process group: NCCL when GPUs are present,
  gloo on CPU.
* Each dp replica reads its own rows of every global batch: a ``DistributedSampler``
  over the dp axis, not over all ranks (the cp ranks of a replica share its rows).
* The dataset's ``labels`` are shifted on the whole sequence, then partitioned like the
  ids.
* ``apply_ddp`` sums the gradients over dp AND cp.
"""

import argparse

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from cp_dtensor import apply_ddp, init_context_parallel_group
from cp_dtensor.training import LongSequenceDataset, ModelConfig, TransformerWithCP

SEQ_LEN, GLOBAL_BATCH = 256, 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--cp-size", type=int, default=2, help="cp ranks (the rest: dp)"
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--save", help="rank 0 writes {'losses', 'params'} to this file"
    )
    args = parser.parse_args()

    # 4 processes: 2-way CP x 2-way DP (gloo on CPU, NCCL on GPUs)
    cp_group = init_context_parallel_group(cp_size=args.cp_size)
    dp_mesh = cp_group.dp_mesh

    # Key-value recall over long sequences: 8 pairs, queried at the end
    dataset = LongSequenceDataset(
        seq_len=SEQ_LEN, num_pairs=8, num_keys=8, num_values=8
    )

    # The model with CP attention; gradients summed over dp x cp
    config = ModelConfig(
        vocab_size=dataset.vocab_size, hidden_size=128, num_layers=2, num_heads=8
    )
    torch.manual_seed(0)  # the same initial weights on every rank
    model = apply_ddp(TransformerWithCP(config, cp_group=cp_group), cp_group)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    # Each dp replica reads its own rows of every global batch
    sampler = DistributedSampler(
        dataset,
        num_replicas=dp_mesh.size(),
        rank=dp_mesh.get_local_rank(),
        shuffle=False,
    )
    dataloader = DataLoader(
        dataset, batch_size=GLOBAL_BATCH // dp_mesh.size(), sampler=sampler
    )

    losses = []
    for step, batch in enumerate(dataloader):
        # Each rank keeps seq_len / cp_size tokens of every sequence
        local_seq = cp_group.partition_sequence(batch["input_ids"], seq_dim=1)
        local_labels = cp_group.partition_sequence(batch["labels"], seq_dim=1)

        # Forward: the ring gives full attention; the loss is the global-batch mean
        loss = model(local_seq, local_labels)

        # Backward: DDP sums the gradients over every dp and cp rank
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

        losses.append(loss.item())
        if dist.get_rank() == 0:
            print(
                f"step {step + 1}: loss {loss.item():.4f} (local_seq "
                f"{tuple(local_seq.shape)} on each of {dist.get_world_size()} ranks "
                f"= dp {dp_mesh.size()} x cp {cp_group.size})",
                flush=True,
            )
        if step + 1 == args.steps:
            break

    if args.save and dist.get_rank() == 0:
        params = {n: p.detach().clone() for n, p in model.module.named_parameters()}
        torch.save({"losses": losses, "params": params}, args.save)
    dist.barrier()  # every rank done sending before gloo tears down (else it can abort)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
