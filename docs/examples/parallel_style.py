"""Context and tensor parallelism in one parallelize_module plan, on 4 CPU processes.

    torchrun --standalone --nproc-per-node 4 docs/examples/parallel_style.py

One plan makes a model context-parallel over a "cp" axis of 2 ranks (the ContextParallel
style on each attention module) and tensor-parallel over a "tp" axis of 2 (PyTorch's
ColwiseParallel and RowwiseParallel on the projections), for a plain PyTorch model and
for a Hugging Face Llama built from a config (nothing is downloaded). The Llama also
runs the registry path, attn_implementation="cp_ring", with the same TP styles. Every
loss is checked against the same model on one process, on the whole sequence.

Shape suffixes: B batch, S sequence, E model width, H heads, D head dim.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from torch import nn
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from cp_dtensor import ContextParallel, init_context_parallel_group
from cp_dtensor.integrations import causal_lm_loss, shard_batch
from cp_dtensor.integrations.transformers import register

SEQ_LEN, VOCAB, DIM, HEADS = 64, 97, 64, 4


class Attention(nn.Module):
    """Single-device code: the heads come from the projections' widths."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.v_proj, self.o_proj = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)

    def forward(self, x_BSE: torch.Tensor) -> torch.Tensor:
        b, s, _ = x_BSE.shape
        q, k, v = (  # each (B, H, S, D): H / 2 heads per rank under TP
            proj(x_BSE).view(b, s, -1, DIM // HEADS).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        y_BHSD = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y_BHSD.transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(DIM), Attention()
        self.norm2, self.up = nn.LayerNorm(DIM), nn.Linear(DIM, 128)
        self.down = nn.Linear(128, DIM)

    def forward(self, x_BSE: torch.Tensor) -> torch.Tensor:
        x_BSE = x_BSE + self.self_attn(self.norm1(x_BSE))
        return x_BSE + self.down(F.gelu(self.up(self.norm2(x_BSE))))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(VOCAB, DIM), nn.Embedding(SEQ_LEN, DIM)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids_BS: torch.Tensor, pos_BS: torch.Tensor) -> torch.Tensor:
        x_BSE = self.embed(ids_BS) + self.pos(pos_BS)  # GLOBAL positions
        for layer in self.layers:
            x_BSE = layer(x_BSE)
        return self.head(x_BSE)


def tinylm_plan(cp_group) -> dict:
    return {
        "layers.*.self_attn": ContextParallel(cp_group, strategy="ring"),
        "layers.*.self_attn.q_proj": ColwiseParallel(),
        "layers.*.self_attn.k_proj": ColwiseParallel(),
        "layers.*.self_attn.v_proj": ColwiseParallel(),
        "layers.*.self_attn.o_proj": RowwiseParallel(),
        "layers.*.up": ColwiseParallel(),
        "layers.*.down": RowwiseParallel(),
    }


def llama_plan(cp_group=None) -> dict:
    """TP styles, and the CP style unless the model's attention is "cp_ring" already."""
    plan = {
        "model.layers.*.self_attn.q_proj": ColwiseParallel(),
        "model.layers.*.self_attn.k_proj": ColwiseParallel(),
        "model.layers.*.self_attn.v_proj": ColwiseParallel(),
        "model.layers.*.self_attn.o_proj": RowwiseParallel(),
        "model.layers.*.mlp.gate_proj": ColwiseParallel(),
        "model.layers.*.mlp.up_proj": ColwiseParallel(),
        "model.layers.*.mlp.down_proj": RowwiseParallel(),
    }
    if cp_group is not None:
        plan["model.layers.*.self_attn"] = ContextParallel(cp_group, strategy="ring")
    return plan


def llama(attn_implementation: str) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=DIM,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=SEQ_LEN,
    )
    torch.manual_seed(0)  # the same weights on every rank and for every path
    return transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation=attn_implementation
    ).double()


def main() -> None:
    cp_group = init_context_parallel_group(
        2, tp_size=2
    )  # ("dp", "cp", "tp") = (1, 2, 2)
    register()  # the registry path's attn_implementation names: "cp_ring", ...
    torch.manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (1, SEQ_LEN))
    batch = shard_batch(input_ids, cp_group)  # this cp rank's tokens, GLOBAL positions

    torch.manual_seed(0)
    plain, one_process = TinyLM().double(), TinyLM().double()
    one_process.load_state_dict(plain.state_dict())
    # The TP styles need the 1-D tp mesh; ContextParallel uses its group, not the mesh.
    parallelize_module(plain, cp_group.tp_mesh, tinylm_plan(cp_group))
    runs = {
        "plain model, one plan": (
            plain(batch.input_ids, batch.position_ids),
            one_process(input_ids, torch.arange(SEQ_LEN)[None]),
        )
    }

    for name, attention, plan in (
        ("llama, one plan", "sdpa", llama_plan(cp_group)),
        ('llama, "cp_ring" + TP', "cp_ring", llama_plan()),
    ):
        model = llama(attention)
        parallelize_module(model, cp_group.tp_mesh, plan)
        logits = model(**batch.model_inputs()).logits  # cp_group= travels in the call
        runs[name] = (logits, llama("sdpa")(input_ids=input_ids).logits)

    for name, (logits_local, logits) in runs.items():
        loss = causal_lm_loss(logits_local, batch).loss  # the global token mean
        loss.backward()  # this rank's share of every gradient: sum them over dp x cp
        expected = F.cross_entropy(logits[0, :-1], input_ids[0, 1:])
        # fp64: the sharded and one-process sums differ only in order
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-10)
        if dist.get_rank() == 0:
            got, want = loss.item(), expected.item()
            print(f"{name + ':':23} loss {got:.12f}, one process {want:.12f}")
    dist.barrier()  # every rank done sending before gloo tears down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
