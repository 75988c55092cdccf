"""Context parallelism in a plain PyTorch model that calls SDPA, on 4 CPU processes.

    torchrun --standalone --nproc-per-node 4 docs/examples/sdpa_model.py

The model's code is ordinary single-device code that calls
``F.scaled_dot_product_attention``. Only its inputs change (this rank's shard, GLOBAL
positions) and its SDPA calls run inside ``context_parallel_sdpa``. Every rank also runs
the same model on the whole sequence in one process and checks that the loss and the
gathered logits agree.

Shape suffixes: B batch, S sequence, E model width, H heads, D head dim.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cp_dtensor import init_context_parallel_group
from cp_dtensor.integrations import causal_lm_loss, context_parallel_sdpa, shard_batch

SEQ_LEN, VOCAB, DIM, HEADS = 64, 97, 64, 4


class TinyLM(nn.Module):
    """A one-block causal language model: nothing in it knows about CP."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(VOCAB, DIM), nn.Embedding(SEQ_LEN, DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out, self.head = nn.Linear(DIM, DIM), nn.Linear(DIM, VOCAB)

    def forward(self, ids_BS: torch.Tensor, pos_BS: torch.Tensor) -> torch.Tensor:
        # Positions are global: pos_BS, not arange(S).
        x_BSE = self.embed(ids_BS) + self.pos(pos_BS)
        batch, seq, _ = x_BSE.shape
        qkv = self.qkv(x_BSE).view(batch, seq, 3 * HEADS, -1).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=1)  # each (B, H, S, D)
        y_BHSD = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x_BSE = x_BSE + self.out(y_BHSD.transpose(1, 2).reshape(batch, seq, DIM))
        return self.head(x_BSE)


def main() -> None:
    cp_group = init_context_parallel_group(cp_size=4)
    torch.manual_seed(0)  # the same weights and the same sequence on every rank
    model = TinyLM().double()
    input_ids = torch.randint(0, VOCAB, (1, SEQ_LEN))

    # Context parallel: shard the ids, the global positions and the labels (shifted on
    # the whole sequence first).
    batch = shard_batch(input_ids, cp_group)
    with context_parallel_sdpa(cp_group, strategy="ring"):
        logits_local = model(batch.input_ids, batch.position_ids)  # (1, S / 4, VOCAB)
    loss = causal_lm_loss(logits_local, batch).loss  # the global token mean, every rank
    # Gradients: this rank's share; sum them over dp x cp (apply_ddp) to train.
    loss.backward()

    # One process on the whole sequence, for comparison.
    logits = model(input_ids, torch.arange(SEQ_LEN)[None])
    expected = F.cross_entropy(logits[0, :-1], input_ids[0, 1:])
    # For evaluation: the whole sequence's logits, in order.
    gathered = cp_group.gather_sequence(logits_local.detach(), seq_dim=1)
    # fp64: the two differ by summation order only
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(gathered, logits.detach(), rtol=0, atol=1e-10)
    if dist.get_rank() == 0:
        print(f"loss with cp=4:   {loss.item():.12f}")
        print(f"loss, 1 process:  {expected.item():.12f}")
    dist.barrier()  # every rank done sending before gloo tears down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
