"""How much memory one rank needs to train the Llama-style decoder with context parallelism.

:func:`estimate_context_parallel_memory_savings` compares one rank's peak
memory without context parallelism (``P = 1``) and with it (``P = cp_size``), and finds the longest
sequence that fits a memory budget. The numbers come from an inventory of what the model really
keeps, checked against measured peaks (``docs/memory.md``, ``bench.memory_measure``).

Note [What one rank holds]
--------------------------
Notation: ``L`` sequence length, ``P`` cp size, ``B`` batch (sequences per dp replica),
``S = L / P`` local tokens, ``T = B * S``, ``E`` hidden size, ``H``/``H_kv`` query/K-V heads, ``D``
head dim, ``Eq = H * D``, ``Ekv = H_kv * D``, ``F`` FFN width, ``V`` vocab, ``N`` layers, ``b`` bytes
per element of the training dtype, ``a = 4`` (the fp32 accumulators of the ring and the fp32
log-sum-exp). ``n`` is the number of parameters.

* **Static** (independent of ``L`` and ``P``): weights ``n m``, gradients ``n m`` (kept between steps,
  as with gradient accumulation or DDP buckets), optimizer state ``k n m`` (AdamW ``k = 2``, SGD with
  momentum ``k = 1``, none ``k = 0``), with ``m = b`` unless the master state is kept wider
  (``master_dtype``: mixed precision, ``m = 4`` with bf16 compute). ``param_sharding="ddp"`` adds
  DDP's gradient buckets ``n m`` (what :func:`cp_dtensor.parallel.grad_sync.apply_ddp` builds by default); ``"fsdp"``
  (:func:`cp_dtensor.parallel.fsdp.apply_fsdp`) divides each by ``dp_size * cp_size`` (FSDP's padding
  of uneven shards is ignored) and adds the weights it has gathered whole (``b`` bytes each) at the peak: the root's
  (embedding, final norm, LM head), which stay gathered from forward to the end of backward, and
  one decoder block's (the one the backward is about to need, prefetched).
* **Activations saved for backward**, per layer: ``T * saved_per_token + S * 2 D 4`` bytes (the
  second term is the fp32 RoPE cos/sin table, shared by the batch). :func:`saved_per_token` lists
  every saved tensor; with ``attention="flash"`` all of them are linear in ``T``, so activations
  shrink exactly ``P``-fold. With activation checkpointing (``"full"``) a layer keeps only its input
  ``T E b``; with ``"selective"`` it keeps its attention half and the MLP's input ``T E b`` (the MLP
  is recomputed; Note [Activation checkpointing under CP] in :mod:`cp_dtensor.training.model`); either
  way the layer being recomputed holds its full inventory.
* **Transients** at the moments where one rank's memory peaks (the estimate is the largest of them,
  see :func:`phase_bytes`): the loss (``V``-wide logits and their gradient; with ``loss_chunk_size``
  ``C`` only one tile's logits and their gradient ``2 C V a``, plus the fp32 weight-gradient
  accumulator ``V E a`` and the hidden gradient ``T E b``: Note [Chunked LM-head loss] in
  :mod:`cp_dtensor.nn.chunked_loss`), the final RMSNorm's fp32 backward, the backward of the last
  layer's MLP, and the ring attention's forward and backward workspace (fp32 accumulators, the K/V
  block arriving while the current one is used, the fp32 ``dK``/``dV`` that travel with it). The
  estimate assumes the model's defaults: causal attention, the zigzag layout and the CPU or CUDA
  flash kernels.

Note [Naive attention and the square root]
------------------------------------------
``attention="naive"`` means attention that materialises scores and lets autograd save them: under
ring attention a rank computes one ``S x S`` block of scores per step, and over the ``P`` steps
autograd keeps every step's probabilities, a ``S x L`` stripe (``B H S L`` elements) per layer, plus
the ``P - 1`` visiting K/V blocks. Per rank that is ``O(L^2 / P)``: with ``P`` ranks the longest
sequence grows only ``sqrt(P)``-fold (``L^2 / P = L_1^2`` gives ``L = sqrt(P) L_1``). The often
quoted ``O((L/P)^2)`` would give ``P``-fold: it counts one block, which is right for the
transient of a kernel that recomputes scores in backward, not for what naive autograd keeps. With
fused (flash) kernels no score matrix outlives a kernel call, per-rank memory is linear in
``L / P`` and the longest sequence grows about ``P``-fold (less the static part).

Units: ``_gb`` values are GiB (``2**30`` bytes), the unit ``torch.cuda.max_memory_allocated() /
2**30`` reports; an "80 GB" H100 offers about 79 GiB.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from cp_dtensor.arguments import check_positive_int

__all__ = [
    "ACTIVATION_CHECKPOINTING",
    "ATTENTIONS",
    "DTYPE_BYTES",
    "OPTIMIZER_STATES",
    "PARAM_SHARDINGS",
    "ModelDims",
    "RankMemory",
    "estimate_rank_memory",
    "estimate_context_parallel_memory_savings",
    "max_seq_len",
    "saved_per_token",
    "phase_bytes",
]

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ATTENTIONS = ("flash", "naive")
OPTIMIZER_STATES = {"adamw": 2, "sgd": 1, "none": 0}
PARAM_SHARDINGS = ("replicated", "ddp", "fsdp")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
"""Modes of ``activation_checkpointing`` (``False`` means ``"none"``, ``True`` means ``"full"``)."""
_ACC = 4  # bytes of the fp32 accumulators (ring output, dQ/dK/dV, log-sum-exp)
_IDS = 8  # bytes of an int64 token id (the embedding saves the ids)


def _options(values) -> str:
    return ", ".join(map(repr, values))


def _check_choice(name: str, value: object, options) -> None:
    if value not in options:
        raise ValueError(f"Invalid {name} {value!r}. Must be one of: {_options(options)}.")


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a Llama-style decoder (embedding, ``N`` x [RMSNorm, attention, RMSNorm, SwiGLU], head).

    Attributes:
        hidden_size: ``E``.
        num_layers: ``N``.
        num_heads: ``H`` query heads.
        num_kv_heads: ``H_kv`` key/value heads (GQA); divides ``H``.
        ffn_hidden_size: ``F``, width of the SwiGLU MLP.
        vocab_size: ``V``.
        tie_embeddings: The head reuses the embedding matrix.
        explicit_head_dim: ``D`` when it is not ``E / H`` (a model that says so, or one tp rank's share
            of the heads); ``None``: ``E / H``.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    vocab_size: int
    tie_embeddings: bool = False
    explicit_head_dim: int | None = None

    @property
    def head_dim(self) -> int:
        """``D = E / H`` unless ``explicit_head_dim`` says otherwise."""
        return self.explicit_head_dim or self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        """``Eq = H * D``."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """``Ekv = H_kv * D``."""
        return self.num_kv_heads * self.head_dim

    def layer_params(self) -> int:
        """Parameters of one decoder layer: two RMSNorm weights, q/k/v/o and gate/up/down."""
        e, f = self.hidden_size, self.ffn_hidden_size
        return 2 * e + e * (2 * self.q_dim + 2 * self.kv_dim) + 3 * e * f

    def num_params(self) -> int:
        """``n``: embedding, layers, final RMSNorm and (untied) head."""
        embed = self.vocab_size * self.hidden_size
        return embed * (1 if self.tie_embeddings else 2) + self.num_layers * self.layer_params() + self.hidden_size


def default_ffn_hidden_size(hidden_size: int) -> int:
    """The SwiGLU width of :class:`cp_dtensor.training.model.ModelConfig`: ``8E/3`` rounded up to a multiple of 32."""
    return -(-(8 * hidden_size // 3) // 32) * 32


def saved_per_token(dims: ModelDims, dtype_bytes: int) -> dict[str, int]:
    """Bytes per local token that one decoder layer saves for backward (flash attention).

    Every entry is one tensor that autograd keeps alive from the forward to the backward of the
    layer (verified with ``torch.autograd.graph.saved_tensors_hooks``; views of one storage are
    counted once). The RoPE cos/sin tables are per position, not per token: see
    :func:`estimate_rank_memory`.

    Args:
        dims: Model sizes.
        dtype_bytes: ``b``.

    Returns:
        ``{tensor name: bytes per token}``, in forward order; entries of the attention half come
        first, then ``"mlp_norm.*"`` and ``"mlp.*"`` (freed first in backward).
    """
    b, e, f, a = dtype_bytes, dims.hidden_size, dims.ffn_hidden_size, _ACC
    eq, ekv, h = dims.q_dim, dims.kv_dim, dims.num_heads
    norm = max(b, a)  # torch's rms_norm computes in fp32: it saves the upcast input, rstd and x * rstd
    return {
        "attn_norm.input": e * norm,
        "attn_norm.rstd": norm,
        "attn_norm.normed": e * norm,
        "qkv_proj.input": e * b,
        "ring.q": eq * b,
        "ring.k": ekv * b,
        "ring.v": ekv * b,
        "ring.out": eq * b,
        "ring.lse": h * a,
        "o_proj.input": eq * b,
        "mlp_norm.input": e * norm,
        "mlp_norm.rstd": norm,
        "mlp_norm.normed": e * norm,
        "mlp.gate_up_input": e * b,
        "mlp.gate": f * b,
        "mlp.silu_gate": f * b,
        "mlp.up": f * b,
        "mlp.down_input": f * b,
    }


@dataclass(frozen=True)
class RankMemory:
    """One rank's estimated peak, in bytes, split into what is alive at that moment.

    Attributes:
        components: Bytes alive at the peak by component (``weights``, ``grads``,
            ``optimizer_state``, ``activations``, ``attention_workspace``, ``ring_buffers``,
            ``logits``, ``norm_workspace``, ``mlp_workspace``); they sum to ``total``.
        total: Peak bytes.
        peak_phase: The moment of the peak (see :func:`phase_bytes`).
        activations_per_layer: Bytes one layer saves for backward.
        local_tokens: ``T = B * L / P``.
    """

    components: dict[str, float]
    total: float
    peak_phase: str
    activations_per_layer: float
    local_tokens: int


# Scratch of the CPU flash kernels per call and thread: a 256 x 512 fp32 score tile (and its gradient in
# backward) plus row statistics. CUDA kernels keep their tiles on chip.
_KERNEL_SCRATCH_FWD = (256 * 512 + 256 * 64 + 2 * 256) * _ACC
_KERNEL_SCRATCH_BWD = 2 * 256 * 512 * _ACC


def _attention_workspace(dims: ModelDims, t: int, s: int, p: int, b: int, attention: str, batch: int):
    """Transients of one ring attention call beyond its inputs, as ``{"forward"|"backward": (workspace, ring)}``.

    Flash, per :mod:`cp_dtensor.attention.ring` (zigzag layout, causal), each the largest over the ring's steps:

    * forward, every step: the fp32 output accumulator ``T Eq a`` and log-sum-exp ``T H a``, the K/V
      block in use ``2 T Ekv b`` (contiguous copies at step 0), the block output ``T Eq b`` and the
      kernel scratch; later steps add the merge's temporaries ``2 T Eq a`` (``+ T Eq a`` to upcast a
      16-bit block). Ring: the next K/V block ``2 T Ekv b`` while the current one is used (``P > 1``).
    * backward, every step: the output gradient as it arrives and its contiguous copy ``2 T Eq b``,
      the residual gradient ``T E b``, the fp32 ``dQ`` ``T Eq a``, the K/V block ``2 T Ekv b``,
      ``dK``/``dV`` accumulators ``2 T Ekv a``, the kernel's ``dq, dk, dv`` and an internal copy
      (``4 T Eq b`` on the diagonal step, ``3 T Eq b`` on the half blocks of later steps; K/V are
      expanded to ``H`` heads first under GQA, ``+ 2 T Eq b``) and its scratch. Python references
      keep the previous step's ``dq, dk, dv`` alive during the next call (``T (Eq + 2 Ekv) b`` after
      the diagonal step, ``T max(Eq + Ekv, Eq/2 + 2 Ekv) b`` after a half step) and, from step 2,
      the ``dK``/``dV`` accumulators that arrived at the previous step ``2 T Ekv a``. Ring: the next K/V
      block (steps before the last) and, after step 0, the accumulators of the previous block being
      sent and of the next one arriving, ``4 T Ekv a``.
    """
    eq, ekv, a = dims.q_dim, dims.kv_dim, _ACC
    expand = 2 * eq * b if ekv < eq else 0
    upcast = eq * a if b < a else 0
    fwd_common = t * (eq * a + dims.num_heads * a + 2 * ekv * b + eq * b + expand) + _KERNEL_SCRATCH_FWD
    bwd_common = t * (2 * eq * b + dims.hidden_size * b + eq * a + 2 * ekv * b + 2 * ekv * a + expand)
    bwd_common += _KERNEL_SCRATCH_BWD
    next_kv = 2 * ekv * b * t
    # (workspace, ring buffers) at step 0, then at step 1 and at steps >= 2
    fwd_steps = [(fwd_common + t * upcast, next_kv if p > 1 else 0)]
    bwd_steps = [(bwd_common + t * 4 * eq * b, next_kv if p > 1 else 0)]
    if p > 1:
        fwd_steps.append((fwd_common + t * (2 * eq * a + upcast), next_kv if p > 2 else 0))
        # step 1: step 0's dq, dk, dv are still referenced until the next kernel call replaces them
        previous = t * (eq + 2 * ekv) * b
        bwd_steps.append((bwd_common + t * 3 * eq * b + previous, (next_kv if p > 2 else 0) + t * 4 * ekv * a))
    if p > 2:  # steps >= 2: the previous (half-block) outputs and the accumulators that arrived last step
        previous = t * max(eq + ekv, eq / 2 + 2 * ekv) * b + t * 2 * ekv * a
        bwd_steps.append((bwd_common + t * 3 * eq * b + previous, next_kv + t * 4 * ekv * a))
    if attention == "naive":  # one step's S x S block per head: its scores; in backward, their two gradients
        block = batch * dims.num_heads * s * s * b
        fwd_steps = [(ws + block, ring) for ws, ring in fwd_steps]
        bwd_steps = [(ws + 2 * block, ring) for ws, ring in bwd_steps]
    return {"forward": max(fwd_steps, key=sum), "backward": max(bwd_steps, key=sum)}


@dataclass(frozen=True)
class _LayerBytes:
    full: float  # A: everything a layer saves for backward
    attention_half: float  # what is still saved when the backward reaches the layer's attention
    before_attention: float  # alive when the ring forward starts: norm, projections input, q, k, v
    input: float  # the layer input, all that a checkpointed layer keeps

    def kept(self, activation_checkpointing: bool | str) -> float:
        """What a layer keeps from its forward to its backward under ``activation_checkpointing``."""
        mode = _ac_mode(activation_checkpointing)
        return {"none": self.full, "full": self.input, "selective": self.attention_half + self.input}[mode]


def _ac_mode(activation_checkpointing: bool | str) -> str:
    if isinstance(activation_checkpointing, bool):
        return "full" if activation_checkpointing else "none"
    return activation_checkpointing


def _layer_bytes(dims: ModelDims, seq_len: int, batch_size: int, cp_size: int, b: int, attention: str) -> _LayerBytes:
    s = seq_len // cp_size
    t = batch_size * s
    per_token = saved_per_token(dims, b)
    rope = s * 2 * dims.head_dim * _ACC  # fp32 cos and sin (S, D), saved by the q and k rotations
    naive = 0
    if attention == "naive":  # every step's probabilities (B, H, S, L) and the P - 1 visiting K/V blocks
        naive = batch_size * dims.num_heads * s * seq_len * b + (cp_size - 1) * t * 2 * dims.kv_dim * b
    attn_names = [name for name in per_token if not name.startswith("mlp")]
    pre_names = attn_names[: attn_names.index("ring.v") + 1]
    return _LayerBytes(
        full=t * sum(per_token.values()) + rope + naive,
        attention_half=t * sum(per_token[n] for n in attn_names) + rope + naive,
        before_attention=t * sum(per_token[n] for n in pre_names) + rope,
        input=t * dims.hidden_size * b,
    )


def phase_bytes(
    dims: ModelDims,
    *,
    seq_len: int,
    batch_size: int,
    cp_size: int,
    dtype_bytes: int,
    attention: str = "flash",
    activation_checkpointing: bool | str = False,
    loss_chunk_size: int | None = None,
    mlp_tile_size: int | None = None,
) -> dict[str, dict[str, float]]:
    """Bytes other than weights, gradients and optimizer state at each moment where a rank can peak.

    With ``A`` a layer's full inventory (:func:`saved_per_token` times ``T``, plus the RoPE tables
    ``2 S D a``) and ``R`` what a layer keeps between its forward and its backward (``A``, or its input
    ``T E b`` under checkpointing), the candidates are (last layer, where the most is alive):

    * ``"attention forward"``: ``(N-1) R`` + the layer's tensors up to ``q, k, v`` + the ring forward
      workspace (see :func:`_attention_workspace`).
    * ``"loss"``: ``N R`` + the final norm's saved tensors and the ids ``T ((2E + 1) 4 + E b + 8)`` + the
      fp32 log-softmax output and, in backward, its two gradients: ``3 T V a``; chunked (tiles of ``C``
      tokens): ``2 min(C, T) V a + V E a + T E b`` (one tile's logits and their gradient, the
      weight-gradient accumulator, the hidden gradient).
    * ``"final norm backward"``: ``N R`` + ``6 T E a``: the final RMSNorm differentiates in fp32; its
      upcast input, the gradient arriving through ``x * rstd`` and the mean-of-squares branch's
      gradient and temporaries are alive together (the peak of bf16 models with small vocabularies).
    * ``"mlp backward"``: ``(N-1) R + A - T F b`` (the down projection's input is freed) + the residual
      gradient ``T E b`` + the gradients of the down projection's input, of ``silu(gate)`` and of
      ``up`` ``3 T F b``, made while ``gate``, ``silu(gate)`` and ``up`` are still saved.
    * ``"attention backward"``: ``(N-1) R`` + the attention half of ``A`` less the output
      projection's input + the ring backward workspace and what is in flight.

    With the sequence-tiled MLP (``mlp_tile_size`` ``c``, Note [Sequence-tiled MLP] in
    :mod:`cp_dtensor.nn.tiled_mlp`) a layer keeps its attention half and the MLP's input (``A`` is
    replaced by that, as under ``"selective"``), and ``"mlp backward"`` holds the arriving gradient and
    the input gradient being written ``2 T E b``, one tile's recompute and gradients
    ``min(c, T) (m_saved + 2 F b)`` (``m_saved``: the MLP half's entries of :func:`saved_per_token`),
    and the weight gradients summed over the tiles with the current tile's ``2 (E + 3 E F) b``.

    Args:
        dims: Model sizes.
        seq_len: ``L``.
        batch_size: ``B``.
        cp_size: ``P``.
        dtype_bytes: ``b``.
        attention: ``"flash"`` or ``"naive"`` (see Note [Naive attention and the square root]).
        activation_checkpointing: ``"none"``, ``"full"`` (keep only each layer's input between forward
            and backward) or ``"selective"`` (keep the attention half and the MLP's input); ``False`` and
            ``True`` mean ``"none"`` and ``"full"``.
        loss_chunk_size: Tokens per tile of the chunked LM-head loss; ``None``: whole logits.
        mlp_tile_size: Tokens per tile of the sequence-tiled MLP; ``None``: untiled.

    Returns:
        ``{phase: {component: bytes}}``, components ``activations``, ``attention_workspace``,
        ``ring_buffers``, ``logits``, ``norm_workspace``, ``mlp_workspace``.
    """
    b, e, f, v = dtype_bytes, dims.hidden_size, dims.ffn_hidden_size, dims.vocab_size
    s = seq_len // cp_size
    t = batch_size * s
    layer = _layer_bytes(dims, seq_len, batch_size, cp_size, b, attention)
    kept = layer.kept(activation_checkpointing)
    own, mlp_work = layer.full - t * f * b, t * (e + 3 * f) * b  # the layer in its MLP backward, untiled
    if mlp_tile_size is not None:
        kept = min(kept, layer.attention_half + layer.input)  # the MLP keeps only its input
        own = layer.attention_half + layer.input
        tile = min(mlp_tile_size, t)
        mlp_saved = sum(v for k, v in saved_per_token(dims, b).items() if k.startswith("mlp"))
        mlp_work = 2 * t * e * b + tile * (mlp_saved + 2 * f * b) + 2 * (e + 3 * e * f) * b
    if loss_chunk_size is None:
        logits = 3 * t * v * _ACC
    else:
        logits = 2 * min(loss_chunk_size, t) * v * _ACC + v * e * _ACC + t * e * b
    earlier = (dims.num_layers - 1) * kept
    work = _attention_workspace(dims, t, s, cp_size, b, attention, batch_size)
    (fwd_ws, fwd_ring), (bwd_ws, bwd_ring) = work["forward"], work["backward"]
    names = ("activations", "attention_workspace", "ring_buffers", "logits", "norm_workspace", "mlp_workspace")
    zero = dict.fromkeys(names, 0.0)
    return {
        "attention forward": {
            **zero,
            "activations": earlier + layer.before_attention,
            "attention_workspace": fwd_ws,
            "ring_buffers": fwd_ring,
        },
        "loss": {
            **zero,
            "activations": dims.num_layers * kept + t * ((2 * e + 1) * max(b, _ACC) + e * b + _IDS),
            "logits": logits,
        },
        "final norm backward": {**zero, "activations": dims.num_layers * kept, "norm_workspace": 6 * t * e * _ACC},
        "mlp backward": {**zero, "activations": earlier + own, "mlp_workspace": mlp_work},
        "attention backward": {
            **zero,
            "activations": earlier + layer.attention_half - t * dims.q_dim * b,
            "attention_workspace": bwd_ws,
            "ring_buffers": bwd_ring,
        },
    }


def _static_bytes(dims: ModelDims, b: int, optimizer: str, param_sharding: str, num_shards: int, m: int) -> dict:
    """Weights, gradients and optimizer state: ``m`` bytes per element kept, ``b`` per element computed with.

    ``m == b`` unless master state is kept in a wider dtype (``master_dtype``): then the stored
    weights, their gradients and the optimizer's moments are ``m`` bytes each, and under FSDP the
    weights gathered for compute are ``b`` bytes (FSDP2's ``MixedPrecisionPolicy(param_dtype=...)``).
    """
    n = dims.num_params()
    gathered, buckets = 0, 0
    if param_sharding == "fsdp":  # sharded over dp x cp; gathered: the root's weights and one block's
        root = n - dims.num_layers * dims.layer_params()
        n, gathered = n / num_shards, (root + dims.layer_params()) * b
    if param_sharding == "ddp":  # DDP's gradient buckets, a second copy (gradient_as_bucket_view=False)
        buckets = n * m
    return {
        "weights": n * m + gathered,
        "grads": n * m + buckets,
        "optimizer_state": OPTIMIZER_STATES[optimizer] * n * m,
    }


def estimate_rank_memory(
    dims: ModelDims,
    *,
    seq_len: int,
    batch_size: int,
    cp_size: int,
    dtype: str = "bf16",
    attention: str = "flash",
    activation_checkpointing: bool | str = False,
    include_weights: bool = True,
    optimizer: str = "adamw",
    param_sharding: str = "replicated",
    dp_size: int = 1,
    loss_chunk_size: int | None = None,
    master_dtype: str | None = None,
    mlp_tile_size: int | None = None,
) -> RankMemory:
    """One rank's peak memory in one training step (forward and backward) of the decoder ``dims``.

    Arguments are not validated here; :func:`estimate_context_parallel_memory_savings` does that.

    Args:
        dims: Model sizes.
        seq_len: ``L``, the global sequence length (a multiple of ``P``).
        batch_size: ``B``, sequences per dp replica.
        cp_size: ``P``.
        dtype: Parameter and activation dtype, a key of :data:`DTYPE_BYTES`.
        attention: ``"flash"`` or ``"naive"``.
        activation_checkpointing: A mode of :data:`ACTIVATION_CHECKPOINTING` (or a bool, see
            :func:`phase_bytes`).
        include_weights: Count weights, gradients and optimizer state.
        optimizer: A key of :data:`OPTIMIZER_STATES`.
        param_sharding: ``"replicated"``, ``"ddp"`` (plus gradient buckets) or ``"fsdp"`` (sharded over
            ``dp_size * cp_size``).
        dp_size: Data-parallel replicas (changes only the static part, under ``"fsdp"``).
        loss_chunk_size: Tokens per tile of the chunked LM-head loss; ``None``: whole logits.
        master_dtype: Dtype (a key of :data:`DTYPE_BYTES`) of the stored weights, gradients and
            optimizer state when it differs from the compute ``dtype`` (mixed precision with fp32
            master state); ``None``: ``dtype``.
        mlp_tile_size: Tokens per tile of the sequence-tiled MLP; ``None``: untiled.

    Returns:
        The :class:`RankMemory` at the largest of the phases of :func:`phase_bytes`.
    """
    b = DTYPE_BYTES[dtype]
    phases = phase_bytes(
        dims,
        seq_len=seq_len,
        batch_size=batch_size,
        cp_size=cp_size,
        dtype_bytes=b,
        attention=attention,
        activation_checkpointing=activation_checkpointing,
        loss_chunk_size=loss_chunk_size,
        mlp_tile_size=mlp_tile_size,
    )
    phase, transient = max(phases.items(), key=lambda item: sum(item[1].values()))
    m = DTYPE_BYTES[master_dtype or dtype]
    static = _static_bytes(dims, b, optimizer, param_sharding, dp_size * cp_size, m)
    if not include_weights:
        static = dict.fromkeys(static, 0.0)
    components = {name: float(value) for name, value in {**static, **transient}.items()}
    layer = _layer_bytes(dims, seq_len, batch_size, cp_size, b, attention)
    return RankMemory(components, sum(components.values()), phase, layer.full, batch_size * (seq_len // cp_size))


def max_seq_len(budget_bytes: float, dims: ModelDims, *, cp_size: int, multiple: int | None = None, **kwargs) -> int:
    """The longest sequence whose per-rank peak fits ``budget_bytes``, found by bisection.

    The peak is not a closed form (a maximum over phases, quadratic in ``L`` for naive attention), so
    this searches numerically: it doubles ``L`` until the estimate exceeds the budget, then bisects.
    The estimate is non-decreasing in ``L``, so the search is exact on the grid of ``multiple``.

    Args:
        budget_bytes: Memory per rank.
        dims: Model sizes.
        cp_size: ``P``.
        multiple: Grid of admissible lengths; default ``2 P`` (the zigzag layout's chunks).
        **kwargs: The other arguments of :func:`estimate_rank_memory`.

    Returns:
        The longest admissible ``L``, or 0 when even ``L = multiple`` does not fit.
    """
    multiple = multiple or 2 * cp_size

    def fits(num_multiples: int) -> bool:
        est = estimate_rank_memory(dims, seq_len=num_multiples * multiple, cp_size=cp_size, **kwargs)
        return est.total <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):  # memory grows at least linearly in L, so this ends
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * multiple


def _resolve_dims(hidden_size, num_layers, num_heads, num_kv_heads, ffn_hidden_size, vocab_size, tie_embeddings):
    check_positive_int("hidden_size", hidden_size)
    check_positive_int("num_layers", num_layers)
    if num_heads is None:
        if hidden_size % 128:
            raise ValueError(
                f"num_heads=None means head_dim 128, which needs hidden_size divisible by 128; got hidden_size="
                f"{hidden_size}. Pass num_heads (a divisor of {hidden_size})."
            )
        num_heads = hidden_size // 128
    check_positive_int("num_heads", num_heads)
    if hidden_size % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}.")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    check_positive_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads} (GQA/MQA).")
    ffn = default_ffn_hidden_size(hidden_size) if ffn_hidden_size is None else ffn_hidden_size
    check_positive_int("ffn_hidden_size", ffn)
    vocab = 32_000 if vocab_size is None else vocab_size
    check_positive_int("vocab_size", vocab)
    if not isinstance(tie_embeddings, bool):
        raise ValueError(f"tie_embeddings must be a bool, got {tie_embeddings!r}.")
    return ModelDims(hidden_size, num_layers, num_heads, num_kv_heads, ffn, vocab, tie_embeddings)


def _check_options(
    dtype, attention, optimizer, param_sharding, activation_checkpointing, include_weights, memory_budget_gb
) -> None:
    _check_choice("dtype", dtype, DTYPE_BYTES)
    _check_choice("attention", attention, ATTENTIONS)
    _check_choice("optimizer", optimizer, OPTIMIZER_STATES)
    _check_choice("param_sharding", param_sharding, PARAM_SHARDINGS)
    if not isinstance(activation_checkpointing, bool):
        _check_choice("activation_checkpointing", activation_checkpointing, (False, True, *ACTIVATION_CHECKPOINTING))
    if not isinstance(include_weights, bool):
        raise ValueError(f"include_weights must be a bool, got {include_weights!r}.")
    if (
        isinstance(memory_budget_gb, bool)
        or not isinstance(memory_budget_gb, (int, float))
        or not math.isfinite(memory_budget_gb)
        or memory_budget_gb <= 0
    ):
        raise ValueError(f"memory_budget_gb must be a positive number of GiB, got {memory_budget_gb!r}.")


def estimate_context_parallel_memory_savings(
    seq_len: int,
    hidden_size: int,
    num_layers: int,
    batch_size: int,
    cp_size: int,
    *,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    ffn_hidden_size: int | None = None,
    vocab_size: int | None = None,
    dtype: str = "bf16",
    attention: str = "flash",
    activation_checkpointing: bool | str = False,
    include_weights: bool = True,
    optimizer: str = "adamw",
    memory_budget_gb: float = 80.0,
    dp_size: int = 1,
    param_sharding: str = "replicated",
    tie_embeddings: bool = False,
    loss_chunk_size: int | None = None,
    master_dtype: str | None = None,
    mlp_tile_size: int | None = None,
) -> dict:
    """Per-rank peak memory of a training step without and with context parallelism, and the longest fit.

    The model is the Llama-style decoder of :mod:`cp_dtensor.training.model`; the formulas are in Note [What
    one rank holds] and Note [Naive attention and the square root] of this module, each component in
    :func:`saved_per_token`, :func:`phase_bytes` and :func:`estimate_rank_memory`. In short, per rank
    with ``T = B L / P`` local tokens::

        peak = n b (2 + k_opt)                       # weights, grads, optimizer state
             + max over phases of [ N * T * saved_per_token
                                    + transients ]   # activations, linear in L / P (flash),
                                                     # + logits / MLP grads / ring workspace
             (+ N * B H (L/P) L b)                   # naive: the saved probability stripes

    Example (1M tokens, a 7B-sized model, 8 ranks)::

        >>> s = estimate_context_parallel_memory_savings(
        ...     seq_len=1_000_000, hidden_size=4096, num_layers=32, batch_size=1, cp_size=8)
        >>> round(s["reduction_factor"], 1) > 1
        True

    Args:
        seq_len: ``L``, global tokens per sequence; a multiple of ``cp_size``.
        hidden_size: ``E``.
        num_layers: ``N``.
        batch_size: ``B``, sequences per dp replica (per step, per cp group).
        cp_size: ``P``, ranks sharing one sequence.
        num_heads: ``H``; default ``E // 128`` (head dim 128).
        num_kv_heads: ``H_kv`` (GQA); default ``H``.
        ffn_hidden_size: ``F``; default ``8E/3`` rounded up to a multiple of 32 (as ``ModelConfig``).
        vocab_size: ``V``; default 32000.
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"``: parameters, gradients, optimizer state and
            activations (the ring's accumulators and log-sum-exp are fp32 regardless).
        attention: ``"flash"`` (fused kernels per block; what :func:`cp_dtensor.ring_attention` runs) or
            ``"naive"`` (scores materialised and saved by autograd, an ``(L/P) x L`` stripe per layer).
        activation_checkpointing: ``"none"``, ``"full"`` (keep only each layer's input; recompute the
            layer in backward) or ``"selective"`` (keep the attention half, recompute the MLP);
            ``False``/``True`` mean ``"none"``/``"full"``.
        include_weights: Count weights, gradients and optimizer state (else activations only).
        optimizer: ``"adamw"`` (2 states), ``"sgd"`` (momentum, 1) or ``"none"``.
        memory_budget_gb: Memory per rank, GiB, for ``max_seq_len_with_cp``.
        dp_size: Data-parallel replicas; changes per-rank memory only with ``param_sharding="fsdp"``.
        param_sharding: ``"replicated"`` (every rank holds all weights and gradients), ``"ddp"`` (the
            same plus DDP's gradient buckets, as :func:`cp_dtensor.parallel.grad_sync.apply_ddp`) or ``"fsdp"``
            (weights, gradients and optimizer state sharded over ``dp_size * cp_size`` ranks).
        tie_embeddings: The head shares the embedding matrix.
        loss_chunk_size: Tokens per tile of the chunked LM-head loss
            (:func:`~cp_dtensor.chunked_cross_entropy_across_shards`); ``None``: whole logits.
        master_dtype: Dtype of the stored weights, gradients and optimizer state, when it is wider
            than the compute ``dtype``: ``dtype="bf16", master_dtype="fp32", param_sharding="fsdp"``
            is FSDP2 with ``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``
            (fp32 sharded weights, gradients and AdamW moments; bf16 gathered weights and activations);
            ``None``: ``dtype``.
        mlp_tile_size: Tokens per tile of the sequence-tiled MLP (:func:`cp_dtensor.nn.tiled_mlp.tiled_mlp`,
            ``ModelConfig.mlp_tile_size``): the MLP's intermediates exist for one tile at a time;
            ``None``: untiled.

    Returns:
        A dict: ``without_cp_gb`` and ``with_cp_gb`` (per-rank peak at ``P = 1`` and ``P = cp_size``),
        ``savings_gb``, ``reduction_factor`` (without / with), ``activation_reduction_factor``
        (the same for everything but weights, gradients and optimizer state), ``max_seq_len_with_cp``
        and ``max_seq_len_without_cp`` (longest fitting ``L``, multiples of ``2 cp_size`` and 2, by
        bisection; 0 if nothing fits), ``breakdown_gb`` (``{"without_cp": {...}, "with_cp": {...}}``:
        weights, grads, optimizer_state, activations, attention_workspace, ring_buffers, logits,
        norm_workspace, mlp_workspace, alive at the peak, summing to the total), ``activations_per_layer_gb``,
        ``peak_phase`` (which moment peaks) and ``config`` (the resolved arguments).

    Raises:
        ValueError: A size is not a positive int, ``num_heads`` does not divide ``hidden_size``,
            ``num_kv_heads`` does not divide ``num_heads``, ``seq_len`` is not a multiple of
            ``cp_size``, an option is not one of its choices, or the budget is not positive.
    """
    dims = _resolve_dims(hidden_size, num_layers, num_heads, num_kv_heads, ffn_hidden_size, vocab_size, tie_embeddings)
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("cp_size", cp_size), ("dp_size", dp_size)):
        check_positive_int(name, value)
    if seq_len % cp_size:
        raise ValueError(f"seq_len={seq_len} must be a multiple of cp_size={cp_size} (each rank holds L / P tokens).")
    _check_options(
        dtype, attention, optimizer, param_sharding, activation_checkpointing, include_weights, memory_budget_gb
    )
    if loss_chunk_size is not None:
        check_positive_int("loss_chunk_size", loss_chunk_size)
    if master_dtype is not None:
        _check_choice("master_dtype", master_dtype, DTYPE_BYTES)
    if mlp_tile_size is not None:
        check_positive_int("mlp_tile_size", mlp_tile_size)
    common = dict(
        mlp_tile_size=mlp_tile_size,
        master_dtype=master_dtype,
        loss_chunk_size=loss_chunk_size,
        batch_size=batch_size,
        dtype=dtype,
        attention=attention,
        optimizer=optimizer,
        activation_checkpointing=activation_checkpointing,
        include_weights=include_weights,
        param_sharding=param_sharding,
        dp_size=dp_size,
    )
    without = estimate_rank_memory(dims, seq_len=seq_len, cp_size=1, **common)
    with_cp = estimate_rank_memory(dims, seq_len=seq_len, cp_size=cp_size, **common)
    budget = memory_budget_gb * GIB
    static = ("weights", "grads", "optimizer_state")

    def activation_total(est: RankMemory) -> float:
        return sum(v for k, v in est.components.items() if k not in static)

    return {
        "without_cp_gb": without.total / GIB,
        "with_cp_gb": with_cp.total / GIB,
        "savings_gb": (without.total - with_cp.total) / GIB,
        "reduction_factor": without.total / with_cp.total,
        "activation_reduction_factor": activation_total(without) / activation_total(with_cp),
        "max_seq_len_with_cp": max_seq_len(budget, dims, cp_size=cp_size, **common),
        "max_seq_len_without_cp": max_seq_len(budget, dims, cp_size=1, **common),
        "breakdown_gb": {
            "without_cp": {k: v / GIB for k, v in without.components.items()},
            "with_cp": {k: v / GIB for k, v in with_cp.components.items()},
        },
        "activations_per_layer_gb": {
            "without_cp": without.activations_per_layer / GIB,
            "with_cp": with_cp.activations_per_layer / GIB,
        },
        "peak_phase": {"without_cp": without.peak_phase, "with_cp": with_cp.peak_phase},
        "config": {
            "seq_len": seq_len,
            "batch_size": batch_size,
            "cp_size": cp_size,
            **{k: v for k, v in asdict(dims).items() if k != "explicit_head_dim"},
            **{k: v for k, v in common.items() if k != "batch_size"},
            "memory_budget_gb": memory_budget_gb,
        },
    }
