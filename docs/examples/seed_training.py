"""The seed's "Complete Training Example", runnable: CP x DP with TransformerWithCP on LongSequenceDataset.

The seed ran it on 8 GPUs (4-way CP x 2-way DP) over 1M-token sequences. Here the same code runs on
4 CPU processes, 2-way CP x 2-way DP, with 256-token sequences and the default (small) model, so a
laptop finishes in seconds:

    torchrun --standalone --nproc-per-node 4 docs/examples/seed_training.py

and, for comparison, on one process over the same global batches: ``python
docs/examples/seed_training.py --cp-size 1``. ``--save FILE`` makes rank 0 write the losses and the
final parameters; the tests check that both runs agree.

What differs from the seed, and why (one line each):

* ``dist.init_process_group(backend='nccl')`` is left to ``init_context_parallel_group``: it picks
  NCCL when GPUs are present and gloo on CPU, where NCCL does not exist.
* ``dataloader`` is never defined in the seed: here each dp replica reads its own rows of every
  global batch (a ``DistributedSampler`` over the dp axis, not over all ranks: cp ranks share rows).
* ``model(local_seq)`` also runs as written (next-token labels of every token, made by an
  all-gather), but most tokens are random filler; the dataset's ``labels`` score the recall answers.
* "gradients automatically synced" is not automatic: ``apply_ddp`` sums them over dp AND cp.
* ``optimizer`` is never defined in the seed: AdamW.
"""

import argparse

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from cp_dtensor import LongSequenceDataset, TransformerWithCP, apply_ddp, init_context_parallel_group

SEQ_LEN, GLOBAL_BATCH = 256, 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cp-size", type=int, default=2, help="context-parallel ranks (the rest are dp)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--save", help="rank 0 writes {'losses', 'params'} to this file")
    args = parser.parse_args()

    # 4 processes total: 2-way CP, 2-way DP (gloo on CPU, NCCL on GPUs)
    cp_group = init_context_parallel_group(cp_size=args.cp_size)
    dp_mesh = cp_group.dp_mesh

    # Model with CP attention; gradients summed over dp x cp
    torch.manual_seed(0)  # the same initial weights on every rank
    model = apply_ddp(TransformerWithCP(cp_group=cp_group), cp_group)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    # Dataset: long sequences (each dp replica reads its own rows of every global batch)
    dataset = LongSequenceDataset(seq_len=SEQ_LEN)
    sampler = DistributedSampler(dataset, num_replicas=dp_mesh.size(), rank=dp_mesh.get_local_rank(), shuffle=False)
    dataloader = DataLoader(dataset, batch_size=GLOBAL_BATCH // dp_mesh.size(), sampler=sampler)

    losses = []
    for step, batch in enumerate(dataloader):
        # Partition sequences across CP group: each rank gets seq_len / cp_size tokens
        local_seq = cp_group.partition_sequence(batch["input_ids"], seq_dim=1)
        local_labels = cp_group.partition_sequence(batch["labels"], seq_dim=1)  # shifted on the full sequence

        # Forward: ring attention computes full attention; the loss is the global-batch mean
        loss = model(local_seq, local_labels)

        # Backward: DDP sums the gradients over every dp and cp rank
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

        losses.append(loss.item())
        if dist.get_rank() == 0:
            print(
                f"step {step + 1}: loss {loss.item():.6f} (local_seq {tuple(local_seq.shape)} on each of "
                f"{dist.get_world_size()} ranks = dp {dp_mesh.size()} x cp {cp_group.size})",
                flush=True,
            )
        if step + 1 == args.steps:
            break

    if args.save and dist.get_rank() == 0:
        params = {name: p.detach().clone() for name, p in model.module.named_parameters()}
        torch.save({"losses": losses, "params": params}, args.save)
    dist.barrier()  # every rank done sending before gloo tears down (it can abort at exit otherwise)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
