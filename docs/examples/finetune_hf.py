"""Fine-tune a Hugging Face model with 2-way CP x 2-way DP on 4 CPU processes.

    torchrun --standalone --nproc-per-node 4 docs/examples/finetune_hf.py --steps 3

The model is built from a config with random weights (nothing is downloaded); any causal
LM that routes attention through transformers' ``AttentionInterface`` works the same way
(``--model llama``, ``qwen2`` or ``mistral``; ``--strategy ring``, ``ulysses`` or
``allgather``). The data are the library's long-sequence recall task, packed
``--documents`` per sequence: each document attends only to itself, its positions
restart at 0, and the loss is the mean over every answer of the global batch.
"""

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers

from cp_dtensor import apply_ddp, init_context_parallel_group
from cp_dtensor.integrations import causal_lm_loss, shard_batch
from cp_dtensor.integrations.transformers import register
from cp_dtensor.training import LongSequenceDataset

CONFIGS = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "mistral": transformers.MistralConfig,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=CONFIGS, default="llama")
    parser.add_argument(
        "--strategy", choices=["ring", "ulysses", "allgather"], default="ring"
    )
    parser.add_argument(
        "--cp-size",
        type=int,
        default=2,
        help="context-parallel ranks (the rest are dp)",
    )
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument(
        "--documents", type=int, default=2, help="documents packed per sequence"
    )
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    cp_group = init_context_parallel_group(cp_size=args.cp_size)
    dp_rank, dp_size = cp_group.dp_mesh.get_local_rank(), cp_group.dp_mesh.size()
    dataset = LongSequenceDataset(seq_len=args.seq_len, num_documents=args.documents)

    # A small model from a config: random weights, the same on every rank (seeded).
    # attn_implementation="cp_ring", "cp_ulysses", "cp_allgather" or "cp_hybrid"
    register()
    config = CONFIGS[args.model](
        vocab_size=dataset.vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.seq_len,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation=f"cp_{args.strategy}"
    )
    ddp_model = apply_ddp(model, cp_group)  # gradients summed over dp AND cp
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    for step in range(args.steps):
        # Each dp rank its own sequence; the cp ranks of a dp rank share it.
        item = dataset[step * dp_size + dp_rank]
        lengths = torch.bincount(item["document_ids"])
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0))  # [0, l_0, l_0 + l_1, ...]
        # The labels of this dataset are already next-token targets.
        batch = shard_batch(
            item["input_ids"][None],
            cp_group,
            shift_labels=item["labels"][None],
            cu_seqlens=cu_seqlens,
        )
        logits = ddp_model(**batch.model_inputs()).logits  # (1, L / cp_size, vocab)
        loss = causal_lm_loss(logits, batch)
        loss.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if dist.get_rank() == 0 and (step % 50 == 0 or step == args.steps - 1):
            # The loss of the whole global batch, the same on every rank.
            print(f"step {step + 1}: loss {loss.loss.item():.3f}", end=", ")
            print(f"answer accuracy {loss.accuracy:.2f}")

    dist.barrier()  # every rank done sending before gloo tears down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
