"""ContextParallel in ``parallelize_module`` plans, alone and beside TP styles (and FSDP2 after), vs one process.

Three models, each made context-parallel by one plan entry on its attention modules: a plain PyTorch
transformer whose attention calls ``F.scaled_dot_product_attention`` (``"sdpa"``), the same transformer
with :class:`~cp_dtensor.ContextParallelAttention` blocks (``"cpa"``), and a Hugging Face Llama built
from a tiny config (``"llama"``). The oracle is one process on the whole global batch in fp64: the plain
transformer with a dense mask for packed documents (for ``"sdpa"`` and ``"cpa"``: same weights), and
the Llama with transformers' own ``sdpa`` attention. Loss and every parameter's gradient (summed over
dp x cp, gathered over tp) agree to 1e-10: fp64 throughout, only the order of the sums differs.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from mp_pool import group, run_on_ranks
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

pytest.importorskip("transformers")

TOL = 1e-10  # fp64; the sharded and one-process sums differ only in order
SEQ_LEN, VOCAB, HIDDEN, HEADS, KV_HEADS, FFN = 32, 61, 32, 4, 2, 48
HEAD_DIM = HIDDEN // HEADS
LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=FFN,
    num_hidden_layers=2,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=64,
    attention_dropout=0.0,
)

# ---- the models ----------------------------------------------------------------------------------------


class SdpaAttention(nn.Module):
    """GQA attention calling SDPA; head counts come from the projections' widths, so TP styles split them."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

    def forward(self, x_BSE: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x_BSE.shape
        q, k, v = (p(x_BSE).view(b, s, -1, HEAD_DIM).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        causal = attn_mask is None
        y_BHSD = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, enable_gqa=True)
        return self.o_proj(y_BHSD.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(HIDDEN, FFN, bias=False), nn.Linear(HIDDEN, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(HIDDEN), nn.RMSNorm(HIDDEN)
        self.self_attn, self.mlp = attention, MLP()

    def forward(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        x = x + self.self_attn(self.attn_norm(x), **attn_kwargs)  # keywords pass down, as transformers does
        return x + self.mlp(self.mlp_norm(x))


class PlainLM(nn.Module):
    """Learned absolute positions (given GLOBAL), two blocks, a head; ``"cpa"`` swaps in ContextParallelAttention."""

    def __init__(self, attention: str = "sdpa", cp_group=None) -> None:
        super().__init__()
        from cp_dtensor import ContextParallelAttention

        def make() -> nn.Module:
            if attention == "sdpa":
                return SdpaAttention()
            return ContextParallelAttention(HIDDEN, HEADS, cp_group, num_kv_heads=KV_HEADS, rope=False)

        self.embed, self.pos = nn.Embedding(VOCAB, HIDDEN), nn.Embedding(SEQ_LEN, HIDDEN)
        self.layers = nn.ModuleList(Block(make()) for _ in range(2))
        self.norm, self.lm_head = nn.RMSNorm(HIDDEN), nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        x = self.embed(input_ids) + self.pos(position_ids)
        for layer in self.layers:
            x = layer(x, **attn_kwargs)
        return self.lm_head(self.norm(x))


def llama(attn_implementation: str = "sdpa") -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(**LLAMA)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).double()


def build(name: str, cp_group=None) -> nn.Module:
    """A fresh model with the reference weights (seed 0, then copied from the reference model)."""
    torch.manual_seed(0)
    if name == "llama":
        return llama()
    return PlainLM(name, cp_group).double()


def plan(name: str, style, tp: bool) -> dict:
    """One plan: the CP style on every attention module, with TP: q/k/v and gate/up colwise, o/down rowwise."""
    prefix = "model.layers.*" if name == "llama" else "layers.*"
    entries = {f"{prefix}.self_attn": style}
    if tp:
        for sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            entries[f"{prefix}.{sub}"] = ColwiseParallel()
        for sub in ("self_attn.o_proj", "mlp.down_proj"):
            entries[f"{prefix}.{sub}"] = RowwiseParallel()
    return entries


# ---- the batch and the oracle ----------------------------------------------------------------------------


def global_batch(rows: int, packed: bool):
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (rows, SEQ_LEN), generator=gen)
    if not packed:
        return ids, None
    lengths = [[11, 9, 12], [5, 20, 7]][:rows]
    return ids, torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])


def dense_mask(pos):
    """``(B, 1, L, L)``: causal and inside the document (documents start where positions restart)."""
    from cp_dtensor.integrations import document_ids_from_position_ids

    docs = document_ids_from_position_ids(pos)
    causal = torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool).tril()
    return (causal & (docs[:, :, None] == docs[:, None, :]))[:, None]


def reference(name: str, ids, pos):
    """One process, the whole batch: loss and gradients (the plain transformer for "sdpa" and "cpa")."""
    model = build("llama" if name == "llama" else "sdpa")
    full_pos = torch.arange(SEQ_LEN).expand_as(ids) if pos is None else pos
    if name == "llama":
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    else:
        logits = model(ids, full_pos, attn_mask=None if pos is None else dense_mask(pos))
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    targets[:, :-1].masked_fill_(full_pos[:, 1:] == 0, -100)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    loss.backward()
    return model, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def whole_grads(model: nn.Module, g, fsdp: bool) -> dict[str, torch.Tensor]:
    """Every gradient summed over dp x cp (FSDP2 did it already) and gathered over tp."""
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad
        if not fsdp:
            local = (grad.to_local() if isinstance(grad, DTensor) else grad).clone()
            dist.all_reduce(local, group=g.replica_group)  # as apply_ddp does
            grad = DTensor.from_local(local, grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else local
        grads[name] = grad.full_tensor() if isinstance(grad, DTensor) else grad
    return grads


def call(name: str, model: nn.Module, batch) -> torch.Tensor:
    """This rank's logits; the batch's group and documents travel as keyword arguments."""
    if name == "llama":
        return model(**batch.model_inputs()).logits
    return model(batch.input_ids, batch.position_ids, cp_group=batch.cp_group, cp_document_ids=batch.document_ids)


def compare_task(cp_size: int, dp_size: int, tp_size: int, packed: bool, runs: list) -> dict:
    """For each ``(model, strategy, fsdp)``: the largest loss and gradient errors against one process."""
    from cp_dtensor import ContextParallel, apply_fsdp
    from cp_dtensor.integrations import causal_lm_loss, shard_batch

    g = group(cp_size, dp_size=dp_size, **({"tp_size": tp_size} if tp_size > 1 else {}))
    ids, pos = global_batch(dp_size, packed)
    # Packed batches are cut in another layout than the style's group: only the call's cp_group knows it.
    batch_group = g.with_layout("contiguous") if packed else g
    row = g.dp_mesh.get_local_rank()
    batch = shard_batch(ids[row : row + 1], batch_group, position_ids=None if pos is None else pos[row : row + 1])
    errors, oracles = {}, {}
    for name, strategy, fsdp in runs:
        if name not in oracles:
            oracles[name] = reference(name, ids, pos)
        ref_model, ref_loss, ref_grads = oracles[name]
        model = build(name, g.with_layout("contiguous"))  # the style's group, not this one, must count
        model.load_state_dict(ref_model.state_dict())
        mesh = g.tp_mesh if tp_size > 1 else g.mesh
        parallelize_module(model, mesh, plan(name, ContextParallel(g, strategy=strategy), tp=tp_size > 1))
        if fsdp:
            apply_fsdp(model, g)
        loss = causal_lm_loss(call(name, model, batch), batch).loss
        loss.backward()
        grads = whole_grads(model, g, fsdp)
        grad_err = max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
        errors[(name, strategy, fsdp)] = ((loss.detach() - ref_loss).abs().item(), grad_err)
    return errors


def check(results: list[dict]) -> None:
    for errors in results:
        for run, (loss_err, grad_err) in errors.items():
            assert loss_err < TOL and grad_err < TOL, (run, loss_err, grad_err)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_cp_alone_equals_one_process(packed):
    runs = [(name, strategy, False) for name in ("sdpa", "cpa", "llama") for strategy in ("ring", "allgather")]
    check(run_on_ranks(4, compare_task, 4, 1, 1, packed, runs))


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_cp_and_tp_in_one_plan_equal_one_process(packed):
    """dp 1 x cp 2 x tp 2; FSDP2 over dp x cp after the plan in the all-gather runs."""
    runs = [(name, s, fsdp) for name in ("sdpa", "cpa", "llama") for s, fsdp in (("ring", False), ("allgather", True))]
    check(run_on_ranks(4, compare_task, 2, 1, 2, packed, runs))


def test_dp_cp_tp_on_8_ranks_equals_one_process():
    """dp 2 x cp 2 x tp 2, packed documents, FSDP2 after the plan."""
    check(run_on_ranks(8, compare_task, 2, 2, 2, True, [("sdpa", "ring", True), ("llama", "ring", True)]))


# ---- natural-order DTensors in and out ---------------------------------------------------------------------


def dtensor_task(kind: str) -> dict:
    """One attention module, ``sequence_dtensors=True``: DTensor x and document ids in, a DTensor out."""
    from cp_dtensor import ContextParallel, ContextParallelAttention

    g = group(4)
    torch.manual_seed(1)
    ref = SdpaAttention().double()
    gen = torch.Generator().manual_seed(2)
    x, dout = (torch.randn(1, SEQ_LEN, HIDDEN, generator=gen, dtype=torch.float64) for _ in range(2))
    _, pos = global_batch(1, packed=True)
    x_ref = x.clone().requires_grad_()
    ref(x_ref, attn_mask=dense_mask(pos)).backward(dout)
    if kind == "sdpa":
        module = SdpaAttention().double()
    else:
        module = ContextParallelAttention(HIDDEN, HEADS, g, num_kv_heads=KV_HEADS, rope=False).double()
    module.load_state_dict(ref.state_dict())
    parallelize_module(module, g.cp_mesh, ContextParallel(g, strategy="ulysses", sequence_dtensors=True))
    from cp_dtensor.integrations import document_ids_from_position_ids

    x_dt = g.distribute_sequence(x).requires_grad_()
    out = module(x_dt, cp_document_ids=g.distribute_sequence(document_ids_from_position_ids(pos)))
    out.backward(g.distribute_sequence(dout))
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    for grad in grads.values():
        dist.all_reduce(grad)
    return {
        "placed": isinstance(out, DTensor) and tuple(out.placements) == (Shard(1),) and out.device_mesh == g.cp_mesh,
        "out_err": (out.full_tensor() - ref(x, attn_mask=dense_mask(pos))).abs().max().item(),
        "dx_err": (x_dt.grad.full_tensor() - x_ref.grad).abs().max().item(),
        "grad_err": max((grads[n] - p.grad).abs().max().item() for n, p in ref.named_parameters()),
    }


@pytest.mark.parametrize("kind", ["sdpa", "cpa"])
def test_natural_order_dtensors_in_and_out(kind):
    for r in run_on_ranks(4, dtensor_task, kind):
        assert r["placed"], "the output must be a Shard(1) DTensor on the cp mesh"
        assert max(r["out_err"], r["dx_err"], r["grad_err"]) < TOL, r


# ---- what the style leaves alone -----------------------------------------------------------------------


def untouched_task() -> dict:
    """Models without the style, before and after another instance is parallelized, run and made to fail."""
    from cp_dtensor import ContextParallel
    from cp_dtensor.integrations import shard_batch

    g = group(4)
    ids, _ = global_batch(1, packed=False)
    full_pos = torch.arange(SEQ_LEN)[None]
    bystanders = {"sdpa": build("sdpa"), "llama": llama()}
    before = {n: (m(ids, full_pos) if n == "sdpa" else m(input_ids=ids).logits).detach() for n, m in bystanders.items()}
    parallel = {"sdpa": build("sdpa"), "llama": llama()}
    batch = shard_batch(ids, g)
    failures = []
    for name, model in parallel.items():
        parallelize_module(model, g.mesh, plan(name, ContextParallel(g), tp=False))
        call(name, model, batch).sum().backward()
        try:  # fails inside forward, with the SDPA mode entered (sdpa) or in the pre-hook (llama)
            if name == "sdpa":
                model(batch.input_ids, batch.position_ids, attn_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))
            else:
                padding = torch.ones_like(batch.input_ids)
                padding[:, 0] = 0  # this rank's first token is padding
                model(**batch.model_inputs(), attention_mask=padding)
        except ValueError as err:
            failures.append(str(err))
    after = {n: (m(ids, full_pos) if n == "sdpa" else m(input_ids=ids).logits).detach() for n, m in bystanders.items()}
    q, k, v = torch.randn(3, 1, 2, 8, 4, dtype=torch.float64).unbind(0)
    by_hand = torch.softmax(q @ k.transpose(-1, -2) / 2, dim=-1) @ v  # what SDPA computes with no mode on
    return {
        "same": all(torch.equal(before[n], after[n]) for n in before),
        "no_hooks": not any(m._forward_pre_hooks or m._forward_hooks for b in bystanders.values() for m in b.modules()),
        "configs": (bystanders["llama"].config._attn_implementation, parallel["llama"].config._attn_implementation),
        "attention_config": parallel["llama"].model.layers[0].self_attn.config._attn_implementation,
        "failures": failures,
        "sdpa_plain": (F.scaled_dot_product_attention(q, k, v) - by_hand).abs().max().item(),
    }


def test_model_without_the_style_is_untouched():
    for r in run_on_ranks(4, untouched_task):
        assert r["same"] and r["no_hooks"], r
        assert r["configs"] == ("sdpa", "sdpa") and r["attention_config"] == "cp_ring", r
        assert "attn_mask" in r["failures"][0] and "hides a token from itself" in r["failures"][1], r["failures"]
        assert r["sdpa_plain"] < 1e-12, "a failed forward left the SDPA mode on"


# ---- mistakes ---------------------------------------------------------------------------------------------


class NoAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _attend(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class HelperAttention(nn.Module):
    """Calls SDPA through a method and a function, or not at all when ``skip`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.skip = False

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return q if self.skip else self.attend(q)

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        return _attend(q, q, q)


def errors_task() -> list[str]:
    """Each mistake's ValueError message, in order (a mistake that does not raise shows as 'no error')."""
    from cp_dtensor import ContextParallel
    from cp_dtensor.integrations import shard_batch

    g = group(4)
    x = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    helper = parallelize_module(HelperAttention(), g.mesh, ContextParallel(g))  # found two calls deep
    model = llama()
    mistakes = {
        "no sdpa": lambda: parallelize_module(NoAttention(), g.mesh, ContextParallel(g)),
        "twice": lambda: parallelize_module(helper, g.mesh, ContextParallel(g)),
        "other mesh": lambda: parallelize_module(HelperAttention(), group(2).cp_mesh, ContextParallel(g)),
        "strategy": lambda: ContextParallel(g, strategy="rign"),
        "not a group": lambda: ContextParallel(g.mesh),
        "hf window": lambda: parallelize_module(model, g.mesh, plan("llama", ContextParallel(g, window=(4, 0)), False)),
        "keyword": lambda: helper(x, cp_document_id=None),
        "call group": lambda: helper(x, cp_group=group(2)),
        "dtensor": lambda: helper(DTensor.from_local(x, g.cp_mesh, [Shard(2)])),
        "no dtensor": lambda: parallelize_module(HelperAttention(), g.mesh, ContextParallel(g, sequence_dtensors=True))(
            x
        ),
    }
    messages = []
    for run in mistakes.values():
        try:
            run()
            messages.append("no error")
        except ValueError as err:
            messages.append(str(err))
    helper.skip = True
    try:
        helper(x)
        messages.append("no error")
    except ValueError as err:
        messages.append(str(err))
    batch = shard_batch(torch.zeros(1, SEQ_LEN, dtype=torch.long), g)
    parallelize_module(model, g.mesh, plan("llama", ContextParallel(g), False))
    model(**batch.model_inputs())  # the plan above was refused whole: this one applies
    return messages


def test_mistakes_raise_value_error_naming_the_fix():
    expected = [
        "calls no SDPA (looked 2 calls deep)",
        "context-parallel already",
        "not its group's mesh",
        "Invalid strategy",
        "takes the ContextParallelGroup",
        "transformers modules pass their own sliding_window",
        "unknown keyword(s) ['cp_document_id']",
        "on the style's cp mesh",
        "sequence_dtensors=True) for natural-order DTensors",
        "got no DTensor on the cp mesh",
        "made no F.scaled_dot_product_attention call",
    ]
    messages = run_on_ranks(4, errors_task)[0]
    assert len(messages) == len(expected), messages
    for message, phrase in zip(messages, expected):
        assert phrase in message, (phrase, message)


def test_attention_modules_are_found_and_their_callers_refused():
    from cp_dtensor.integrations.parallel_style import attention_kind

    model = llama()
    assert attention_kind(model.model.layers[0].self_attn) == "transformers"
    assert attention_kind(SdpaAttention()) == "sdpa"
    with pytest.raises(ValueError, match="calls no SDPA"):
        attention_kind(model.model.layers[0])  # the decoder layer calls its attention module, not SDPA
