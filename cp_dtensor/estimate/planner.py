"""Choose how to run a training job: dp x cp x tp, the attention strategy, and the memory options.

:func:`plan` searches every combination the engine runs (Note [The planner's space]), keeps those
whose per-rank peak fits the budget (:func:`cp_dtensor.estimate.memory.estimate_rank_memory`), and
ranks them by predicted time per token (Note [The planner's time model]). It returns the best plan,
the runners-up and every rejected combination with its reason.

Note [The planner's space]
~~~~~~~~~~~~~~~~~~~~~~~~~~
For ``W`` ranks, ``G`` per node: ``tp`` divides ``W`` and the query heads, is at most ``G`` (tensor
parallelism inside a node), and either divides the K/V heads or is a multiple of them
(:func:`cp_dtensor.parallel.tensor_parallel.check_tp_heads`); ``cp`` divides ``W / tp`` and ``L / 2``
(the zigzag layout cuts the sequence into ``2 cp`` chunks); ``dp = W / (tp cp)``. Strategies: ``ring``
and ``allgather`` for any head count; ``ulysses`` when ``cp`` divides the query heads per tp rank;
``hybrid`` with every Ulysses size ``u``, ``1 < u < cp``, dividing them. Then activation
checkpointing ``none | selective | full``, the loss whole or in chunks, the MLP whole or in tiles,
and parameters under DDP or FSDP2 (with fp32 master state under bf16 compute). The layout is the
zigzag one: it balances causal attention, the only kind a decoder has.

Note [The planner's time model]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Per rank and step, with ``T = B L / cp`` local tokens and ``rate = peak FLOP/s x efficiency``:

* matmuls: ``2 T`` flops per weight of a block (``/ tp``) and of the LM head, times 3 (forward and
  backward); attention ``4 B H D (L^2 / 2) / (cp tp)`` causal flops forward, times 3.5 (the
  backward recomputes the scores). Recompute adds a forward: the block under ``full``, the MLP
  under ``selective`` or tiles, the LM head under a chunked loss.
* communication, bytes sent per rank: the attention's from
  :func:`cp_dtensor.estimate.comm_model.comm_bytes` per block (its forward again under ``full``);
  tensor parallelism two all-reduces of ``T E`` per block forward and two backward; DDP an
  all-reduce of the fp32 gradients, FSDP2 two all-gathers of the bf16 weights and a reduce-scatter
  of fp32 gradients, over the dp x cp ranks. A group inside one node moves ``intra_node_gbps``,
  one across nodes ``inter_node_gbps`` (ranks are numbered tp fastest, then cp, then dp).
* overlap: ring and all-gather traffic hides behind the attention's compute (each block's time is
  the larger of the two), the all-to-alls of Ulysses and the tp all-reduces do not; gradient sync
  hides behind the whole step's compute. On a device whose cores both compute and communicate
  (``Device.overlaps_comm`` false: a CPU under gloo) nothing hides: the times add.

Memory is :func:`~cp_dtensor.estimate.memory.estimate_rank_memory`'s (which models the ring's
workspace), plus, for ``allgather``, the whole K/V it gathers, ``2 B L Ekv b``. The embedding and the
LM head are counted whole on every tp rank (an upper bound: the demo model splits them).

The ranking key is seconds per token (``step / (dp B L)``); ties go to fewer bytes, then to less
memory, then to fewer memory options turned on. It is a model: it knows no kernel efficiencies
beyond one ``efficiency`` factor.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from cp_dtensor.arguments import check_positive_int
from cp_dtensor.attention.api import set_auto_chooser
from cp_dtensor.estimate.comm_model import comm_bytes
from cp_dtensor.estimate.memory import GIB, ModelDims, default_ffn_hidden_size, estimate_rank_memory
from cp_dtensor.mesh.group import ContextParallelGroup

__all__ = [
    "AutoChoice",
    "DEVICES",
    "Device",
    "Plan",
    "PlanResult",
    "Rejection",
    "attention_choice",
    "auto_strategy",
    "candidates",
    "dims_from_config",
    "evaluate",
    "format_plan",
    "plan",
]


@dataclass(frozen=True)
class Device:
    """What the time model needs of an accelerator (or a CPU), per device.

    Attributes:
        name: Short name.
        peak_flops: Dense bf16 matmul FLOP/s (fp32 on CPU).
        memory_gib: Memory the job may use, GiB (``2**30`` bytes).
        intra_node_gbps: Bytes per second one device sends to its node's peers (one direction).
        inter_node_gbps: Bytes per second one device sends to other nodes.
        source: Where the figures come from.
        overlaps_comm: Communication runs beside compute (a GPU's copy engines and NCCL kernels);
            ``False`` where the same cores do both (a CPU under gloo): the times then add.
    """

    name: str
    peak_flops: float
    memory_gib: float
    intra_node_gbps: float
    inter_node_gbps: float
    source: str
    overlaps_comm: bool = True


_IB_NDR = "400 Gb/s InfiniBand NDR per GPU (50 GB/s)"
DEVICES = {
    "H100": Device(
        "H100",
        989e12,
        79.0,
        450e9,
        50e9,
        "NVIDIA H100 SXM datasheet: 989 TFLOP/s dense BF16, 80 GB, NVLink 900 GB/s (450 each way); " + _IB_NDR,
    ),
    "H200": Device(
        "H200",
        989e12,
        131.0,
        450e9,
        50e9,
        "NVIDIA H200 SXM datasheet: 989 TFLOP/s dense BF16, 141 GB, NVLink 900 GB/s (450 each way); " + _IB_NDR,
    ),
    "A100": Device(
        "A100",
        312e12,
        79.0,
        300e9,
        25e9,
        "NVIDIA A100 SXM 80GB datasheet: 312 TFLOP/s dense BF16, 80 GB, NVLink 600 GB/s (300 each way); "
        "200 Gb/s InfiniBand HDR per GPU (25 GB/s)",
    ),
    "B200": Device(
        "B200",
        2.25e15,
        167.0,
        900e9,
        50e9,
        "NVIDIA HGX B200 datasheet: 36 PFLOP/s sparse BF16 per 8 GPUs (2.25 dense each), 180 GB, "
        "NVLink 1.8 TB/s (900 GB/s each way); " + _IB_NDR,
    ),
    "CPU": Device(
        "CPU",
        100e9,
        8.0,
        5e9,
        1e9,
        "laptop CPU, gloo via shared memory; measure: --peak-tflops, --intra-node-gbps",
        overlaps_comm=False,
    ),
}
"""The devices :func:`plan` knows: H100, H200, A100, B200 and CPU, each citing its figures in
``Device.source`` (datasheets; the CPU entry is a rough guess: pass measured figures). Override any figure
with :func:`dataclasses.replace`."""

AC_MODES = ("none", "selective", "full")
SHARDINGS = ("ddp", "fsdp")


@dataclass(frozen=True)
class Plan:
    """One way to run the job, with what the models predict for it.

    Attributes:
        dp: Data-parallel replicas.
        cp: Ranks sharing one sequence.
        tp: Tensor-parallel ranks (heads and MLP width split).
        strategy: Attention strategy over cp (a name of :data:`cp_dtensor.STRATEGIES`).
        ulysses_size: ``u`` of ``"hybrid"``, else ``None``.
        layout: Sequence layout over cp (``"zigzag"``).
        activation_checkpointing: ``"none"``, ``"selective"`` or ``"full"``.
        loss_chunk_size: Tokens per tile of the chunked loss, or ``None``.
        mlp_tile_size: Tokens per tile of the sequence-tiled MLP, or ``None``.
        param_sharding: ``"ddp"`` or ``"fsdp"`` (fp32 master state, bf16 compute).
        memory_gib: Predicted per-rank peak.
        bytes_per_step: Bytes one rank sends per step (attention, tp, gradient sync).
        step_time_s: Predicted seconds per step.
        seconds_per_token: ``step_time_s / (dp B L)``, the ranking key.
    """

    dp: int
    cp: int
    tp: int
    strategy: str
    ulysses_size: int | None
    layout: str
    activation_checkpointing: str
    loss_chunk_size: int | None
    mlp_tile_size: int | None
    param_sharding: str
    memory_gib: float = 0.0
    bytes_per_step: int = 0
    step_time_s: float = 0.0
    seconds_per_token: float = 0.0

    def describe(self) -> str:
        """One line: the layout and options, e.g. ``dp 2 x cp 4 x tp 1, ring, zigzag, AC full, ...``."""
        strategy = self.strategy + (f" (u={self.ulysses_size})" if self.ulysses_size else "")
        extras = [f"AC {self.activation_checkpointing}", self.param_sharding]
        extras += [f"loss chunk {self.loss_chunk_size}"] if self.loss_chunk_size else []
        extras += [f"MLP tiles {self.mlp_tile_size}"] if self.mlp_tile_size else []
        return f"dp {self.dp} x cp {self.cp} x tp {self.tp}, {strategy}, {self.layout}, " + ", ".join(extras)


@dataclass(frozen=True)
class Rejection:
    """A combination the planner did not keep, and why.

    Attributes:
        what: The combination (a :meth:`Plan.describe` line, or a part of one).
        reason: Why, with the numbers.
    """

    what: str
    reason: str


@dataclass(frozen=True)
class PlanResult:
    """The answer of :func:`plan`.

    Attributes:
        best: The plan with the least predicted time per token, or ``None`` when nothing fits.
        runners_up: The next best plans, one per (dp, cp, tp, strategy), best first.
        rejections: Every combination left out, with its reason.
        inputs: The resolved inputs (model sizes, sequence, world, device).
    """

    best: Plan | None
    runners_up: list[Plan]
    rejections: list[Rejection]
    inputs: dict = field(default_factory=dict)

    def to_json(self) -> str:
        """The result as JSON."""
        return json.dumps(
            {
                "best": asdict(self.best) if self.best else None,
                "runners_up": [asdict(p) for p in self.runners_up],
                "rejections": [asdict(r) for r in self.rejections],
                "inputs": self.inputs,
            },
            indent=2,
        )


def dims_from_config(path: str | Path) -> ModelDims:
    """The sizes of a Llama-style model from a Hugging Face ``config.json`` (read locally, nothing downloaded).

    Args:
        path: A ``config.json`` file, or a folder holding one.

    Returns:
        Its :class:`~cp_dtensor.estimate.memory.ModelDims` (keys ``hidden_size``,
        ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
        ``intermediate_size``, ``vocab_size``, ``tie_word_embeddings``).

    Raises:
        ValueError: The file lacks one of the required keys.
    """
    path = Path(path)
    config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    config = config.get("text_config", config)  # multimodal configs nest the decoder's
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in config]
    if missing:
        raise ValueError(f"{path} is not a decoder config: it lacks {', '.join(missing)}.")
    e, h = config["hidden_size"], config["num_attention_heads"]
    return ModelDims(
        hidden_size=e,
        num_layers=config["num_hidden_layers"],
        num_heads=h,
        num_kv_heads=config.get("num_key_value_heads") or h,
        ffn_hidden_size=config.get("intermediate_size") or default_ffn_hidden_size(e),
        vocab_size=config["vocab_size"],
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        explicit_head_dim=config.get("head_dim"),
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _tp_problem(dims: ModelDims, tp: int, gpus_per_node: int) -> str | None:
    if tp > gpus_per_node:
        return f"tp {tp} > {gpus_per_node} devices per node"
    if dims.num_heads % tp:
        return f"tp {tp} does not divide the {dims.num_heads} query heads"
    if dims.num_kv_heads % tp and tp % dims.num_kv_heads:
        return f"tp {tp} neither divides nor is a multiple of the {dims.num_kv_heads} K/V heads"
    return None


def _strategies(heads_per_tp: int, cp: int) -> tuple[list[tuple[str, int | None]], list[tuple[str, str]]]:
    kept: list[tuple[str, int | None]] = [("ring", None), ("allgather", None)]
    rejected = []
    if cp == 1:
        return [("ring", None)], []
    if heads_per_tp % cp == 0:
        kept.append(("ulysses", None))
    else:
        rejected.append(("ulysses", f"cp {cp} does not divide the {heads_per_tp} query heads per tp rank"))
    for u in _divisors(cp)[1:-1]:
        if heads_per_tp % u == 0:
            kept.append(("hybrid", u))
        else:
            rejected.append((f"hybrid (u={u})", f"u {u} does not divide the {heads_per_tp} query heads per tp rank"))
    return kept, rejected


def candidates(
    dims: ModelDims, *, seq_len: int, world_size: int, gpus_per_node: int, loss_chunk_size: int, mlp_tile_size: int
) -> tuple[list[Plan], list[Rejection]]:
    """Every combination of Note [The planner's space], unevaluated, and the layouts ruled out by shape.

    Returns:
        ``(plans, rejections)``: plans with zero predictions; rejections of tp, cp and strategies.
    """
    plans, rejections = [], []
    for tp in _divisors(world_size):
        if problem := _tp_problem(dims, tp, gpus_per_node):
            rejections.append(Rejection(f"tp {tp}", problem))
            continue
        for cp in _divisors(world_size // tp):
            if seq_len % (2 * cp):
                rejections.append(Rejection(f"tp {tp} x cp {cp}", f"L {seq_len} is not a multiple of 2 cp = {2 * cp}"))
                continue
            kept, ruled_out = _strategies(dims.num_heads // tp, cp)
            rejections += [Rejection(f"tp {tp} x cp {cp}, {name}", why) for name, why in ruled_out]
            dp = world_size // (tp * cp)
            if tp > 1:
                rejections.append(Rejection(f"tp {tp} x cp {cp}, MLP tiles, ddp", TILED_TP_DDP))
            for (strategy, u), ac, chunk, tile, sharding in itertools.product(
                kept, AC_MODES, (None, loss_chunk_size), (None, mlp_tile_size), SHARDINGS
            ):
                if tile and tp > 1 and sharding == "ddp":
                    continue
                plans.append(Plan(dp, cp, tp, strategy, u, "zigzag", ac, chunk, tile, sharding))
    return plans, rejections


TILED_TP_DDP = "MLP tiles with tp need fsdp (a wrong norm gradient under ddp)"


def _per_rank_dims(dims: ModelDims, tp: int) -> ModelDims:
    """One tp rank's share of the blocks (heads, K/V heads, MLP width); the embedding and head counted whole."""
    return replace(
        dims,
        num_heads=dims.num_heads // tp,
        num_kv_heads=max(dims.num_kv_heads // tp, 1),
        ffn_hidden_size=dims.ffn_hidden_size // tp,
        explicit_head_dim=dims.head_dim,
    )


def _overlap(device: Device, compute_s: float, comm_s: float) -> float:
    """Seconds of compute and communication that may overlap: the larger, or the sum on a device that cannot."""
    return max(compute_s, comm_s) if device.overlaps_comm else compute_s + comm_s


def _all_reduce(nbytes: float, n: int) -> float:
    return 2 * (n - 1) / n * nbytes


def evaluate(
    candidate: Plan,
    dims: ModelDims,
    *,
    seq_len: int,
    batch_size: int,
    device: Device,
    gpus_per_node: int,
    efficiency: float,
) -> Plan:
    """``candidate`` with its predicted memory, bytes and time (Note [The planner's time model]).

    Args:
        candidate: A plan from :func:`candidates`.
        dims: The whole model's sizes.
        seq_len: ``L``.
        batch_size: ``B``, sequences per dp replica.
        device: Peak FLOP/s and bandwidths.
        gpus_per_node: ``G``.
        efficiency: Fraction of the peak FLOP/s the matmuls reach.

    Returns:
        The plan with ``memory_gib``, ``bytes_per_step``, ``step_time_s`` and ``seconds_per_token``.
    """
    c, local = candidate, _per_rank_dims(dims, candidate.tp)
    shards = c.dp * c.cp
    mem = estimate_rank_memory(
        local,
        seq_len=seq_len,
        batch_size=batch_size,
        cp_size=c.cp,
        dtype="bf16",
        master_dtype="fp32",
        activation_checkpointing=c.activation_checkpointing,
        loss_chunk_size=c.loss_chunk_size,
        mlp_tile_size=c.mlp_tile_size,
        param_sharding=c.param_sharding if shards > 1 else "replicated",
        dp_size=c.dp,
        optimizer="adamw",
    )
    t = batch_size * seq_len // c.cp
    e, n_layers, b = dims.hidden_size, dims.num_layers, 2
    attn_weights = e * (2 * local.q_dim + 2 * local.kv_dim)
    mlp_weights = 3 * e * local.ffn_hidden_size
    head = dims.vocab_size * e / c.tp
    attn_flops = 4 * batch_size * local.num_heads * local.head_dim * (seq_len * seq_len / 2) / c.cp
    recompute_block = c.activation_checkpointing == "full"
    # one more MLP forward: in the tiles' backward, or under selective (the tiled MLP needs no checkpoint)
    recompute_mlp = bool(c.mlp_tile_size) or c.activation_checkpointing == "selective"
    matmul = 2 * t * (n_layers * (3 + recompute_block) * attn_weights + head * (3 + bool(c.loss_chunk_size)))
    matmul += 2 * t * n_layers * mlp_weights * (3 + recompute_block + recompute_mlp)
    rate = device.peak_flops * efficiency
    # attention, per block: compute (3.5 forwards, + 1 under full AC) against the bytes it sends
    vol = comm_bytes(
        c.strategy,
        batch=batch_size,
        seq_len=seq_len,
        heads=local.num_heads,
        kv_heads=local.num_kv_heads,
        head_dim=local.head_dim,
        world_size=c.cp,
        dtype=torch.bfloat16,
        ulysses_size=c.ulysses_size,
    )
    fwd_sends = sum(vol.forward.values())
    attn_bytes = vol.total + (fwd_sends if recompute_block else 0)
    a2a = (vol.forward.get("all_to_all", 0) + vol.backward.get("all_to_all", 0)) * (1 + recompute_block / 2)
    cp_bw = device.intra_node_gbps if c.tp * c.cp <= gpus_per_node else device.inter_node_gbps
    attn_time = _overlap(device, attn_flops * (3.5 + recompute_block) / rate, (attn_bytes - a2a) / cp_bw) + a2a / cp_bw
    tp_bytes = _all_reduce(t * e * b, c.tp) * n_layers * (4 + 2 * recompute_block) if c.tp > 1 else 0
    n_rank = dims.num_params() - n_layers * (dims.layer_params() - local.layer_params())
    if shards == 1:
        sync_bytes = 0.0
    elif c.param_sharding == "ddp":
        sync_bytes = _all_reduce(n_rank * 4, shards)
    else:  # all-gather bf16 weights in forward and in backward, reduce-scatter fp32 gradients
        sync_bytes = (shards - 1) / shards * n_rank * (2 * b + 4)
    sync_bw = device.intra_node_gbps if c.tp * shards <= gpus_per_node else device.inter_node_gbps
    compute = matmul / rate + n_layers * attn_time
    step = _overlap(device, compute, sync_bytes / sync_bw) + tp_bytes / device.intra_node_gbps
    total_bytes = int(n_layers * attn_bytes + tp_bytes + sync_bytes)
    # the all-gather strategy holds the whole K/V during a block's attention; the estimator's workspace is the ring's
    gathered_kv = 2 * batch_size * seq_len * local.kv_dim * b if c.strategy == "allgather" and c.cp > 1 else 0
    return replace(
        c,
        memory_gib=(mem.total + gathered_kv) / GIB,
        bytes_per_step=total_bytes,
        step_time_s=step,
        seconds_per_token=step / (c.dp * batch_size * seq_len),
    )


def _key(p: Plan) -> tuple:
    options = (p.activation_checkpointing != "none") + (p.loss_chunk_size is not None) + (p.mlp_tile_size is not None)
    return (p.seconds_per_token, p.bytes_per_step, p.memory_gib, options, p.describe())


def plan(
    dims: ModelDims,
    *,
    seq_len: int,
    world_size: int,
    gpus_per_node: int = 8,
    device: str | Device = "H100",
    memory_budget_gib: float | None = None,
    batch_size: int = 1,
    efficiency: float = 0.4,
    loss_chunk_size: int = 4096,
    mlp_tile_size: int = 4096,
    num_runners_up: int = 5,
) -> PlanResult:
    """The best way to train ``dims`` on ``seq_len`` tokens over ``world_size`` devices, and the others.

    Searches every combination of Note [The planner's space], rejects those that do not fit
    ``memory_budget_gib`` per rank (:func:`~cp_dtensor.estimate.memory.estimate_rank_memory`, bf16
    compute with fp32 master state), and ranks the rest by predicted seconds per token (Note [The
    planner's time model]).

    Args:
        dims: Model sizes (:func:`dims_from_config` reads a Hugging Face ``config.json``).
        seq_len: ``L``, tokens per sequence.
        world_size: ``W``, devices.
        gpus_per_node: ``G``, devices per node (tp stays inside one).
        device: A key of :data:`DEVICES` or a :class:`Device`.
        memory_budget_gib: GiB per device; default the device's ``memory_gib``.
        batch_size: ``B``, sequences per dp replica per step.
        efficiency: Fraction of the peak FLOP/s the kernels reach (0.4: a well-tuned GPU job).
        loss_chunk_size: Tokens per tile when the plan chunks the loss.
        mlp_tile_size: Tokens per tile when the plan tiles the MLP.
        num_runners_up: How many runners-up to return.

    Returns:
        A :class:`PlanResult`.

    Raises:
        ValueError: A size is not a positive int, ``device`` is unknown, or a budget or efficiency is
            not positive.
    """
    for name, value in (("seq_len", seq_len), ("world_size", world_size), ("gpus_per_node", gpus_per_node)):
        check_positive_int(name, value)
    for name, value in (("batch_size", batch_size), ("loss_chunk_size", loss_chunk_size)):
        check_positive_int(name, value)
    check_positive_int("mlp_tile_size", mlp_tile_size)
    if isinstance(device, str):
        if device not in DEVICES:
            raise ValueError(f"Invalid device {device!r}. Must be one of: {', '.join(map(repr, DEVICES))}.")
        device = DEVICES[device]
    budget = device.memory_gib if memory_budget_gib is None else memory_budget_gib
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"memory_budget_gib must be a positive number of GiB, got {budget!r}.")
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency!r}.")
    found, rejections = candidates(
        dims,
        seq_len=seq_len,
        world_size=world_size,
        gpus_per_node=gpus_per_node,
        loss_chunk_size=loss_chunk_size,
        mlp_tile_size=mlp_tile_size,
    )
    fits = []
    for c in found:
        p = evaluate(
            c,
            dims,
            seq_len=seq_len,
            batch_size=batch_size,
            device=device,
            gpus_per_node=gpus_per_node,
            efficiency=efficiency,
        )
        if p.memory_gib <= budget:
            fits.append(p)
        else:
            rejections.append(Rejection(p.describe(), f"{p.memory_gib:.1f} GiB per rank > budget {budget:g} GiB"))
    fits.sort(key=_key)
    best_per_layout: dict[tuple, Plan] = {}
    for p in fits:
        best_per_layout.setdefault((p.dp, p.cp, p.tp, p.strategy, p.ulysses_size), p)
    ranked = list(best_per_layout.values())
    inputs = {
        "model": asdict(dims),
        "seq_len": seq_len,
        "world_size": world_size,
        "gpus_per_node": gpus_per_node,
        "device": asdict(device),
        "memory_budget_gib": budget,
        "batch_size": batch_size,
        "efficiency": efficiency,
    }
    return PlanResult(ranked[0] if ranked else None, ranked[1 : 1 + num_runners_up], rejections, inputs)


def format_plan(result: PlanResult, *, max_rejections: int = 12) -> str:
    """The result as a table: the best plan, the runners-up, then the rejections (grouped by reason)."""
    head = f"{'#':<3}{'plan':<86}{'GiB/rank':>9}{'GB sent':>9}{'step s':>9}{'tok/s':>10}"
    rows = [head, "-" * len(head)]
    for i, p in enumerate([result.best, *result.runners_up] if result.best else []):
        rows.append(
            f"{i + 1:<3}{p.describe():<86}{p.memory_gib:>9.1f}{p.bytes_per_step / 1e9:>9.2f}"
            f"{p.step_time_s:>9.3g}{1 / p.seconds_per_token:>10,.0f}"
        )
    if result.best is None:
        rows.append("nothing fits: see the rejections")
    rows += ["", f"rejected ({len(result.rejections)}):"]
    rows += [f"  {r.what}: {r.reason}" for r in result.rejections[:max_rejections]]
    if len(result.rejections) > max_rejections:
        rows.append(f"  ... and {len(result.rejections) - max_rejections} more (--json lists all)")
    return "\n".join(rows)


# ---- strategy="auto": the same model, for one attention call ----------------------------------------


@dataclass(frozen=True)
class AutoChoice:
    """What ``strategy="auto"`` runs for one call shape, and why.

    Attributes:
        strategy: The chosen strategy.
        ulysses_size: The group's Ulysses size when ``"hybrid"`` is chosen, else ``None``.
        seconds: Predicted forward + backward seconds of the call, per strategy considered.
        bytes_sent: Bytes one rank sends, per strategy considered.
        reason: One line: the choice against the runner-up.
    """

    strategy: str
    ulysses_size: int | None
    seconds: dict[str, float]
    bytes_sent: dict[str, int]
    reason: str


@functools.lru_cache(maxsize=1024)
def attention_choice(
    batch: int,
    seq_len: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    cp_size: int,
    dtype: torch.dtype,
    causal: bool,
    ulysses_size: int | None,
    device: Device,
    cross_node: bool,
    efficiency: float = 0.4,
) -> AutoChoice:
    """The strategy the time model of Note [The planner's time model] predicts fastest for one call.

    Per strategy: ``max(attention compute, ring or all-gather bytes / bandwidth) + all-to-all bytes /
    bandwidth`` (the sum, not the max, where ``device.overlaps_comm`` is false), forward and backward;
    on equal times the ring goes before the all-gather (which
    holds the whole K/V; this call knows no memory budget), then fewer bytes first. Ulysses needs
    ``cp_size`` to divide ``heads``; hybrid a group with a Ulysses axis (``ulysses_size``) dividing
    them. Cached per argument tuple (per shape).

    Args:
        batch: ``B``.
        seq_len: Global ``L``.
        heads: ``H``.
        kv_heads: ``H_kv``.
        head_dim: ``D``.
        cp_size: ``P``.
        dtype: Of ``q``, ``k``, ``v``.
        causal: Causal masking (half the score blocks).
        ulysses_size: The group's Ulysses size, or ``None``.
        device: Peak FLOP/s and bandwidths.
        cross_node: The cp group spans nodes.
        efficiency: Fraction of the peak FLOP/s reached.

    Returns:
        The :class:`AutoChoice`.
    """
    options: list[tuple[str, int | None]] = [("ring", None), ("allgather", None)]
    if heads % cp_size == 0:
        options.append(("ulysses", None))
    if ulysses_size and 1 < ulysses_size < cp_size and heads % ulysses_size == 0:
        options.append(("hybrid", ulysses_size))
    flops = 4 * batch * heads * head_dim * seq_len * seq_len / cp_size * (0.5 if causal else 1.0) * 3.5
    compute = flops / (device.peak_flops * efficiency)
    bw = device.inter_node_gbps if cross_node else device.intra_node_gbps
    seconds, sent = {}, {}
    for name, u in options:
        vol = comm_bytes(
            name,
            batch=batch,
            seq_len=seq_len,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            world_size=cp_size,
            dtype=dtype,
            ulysses_size=u,
        )
        a2a = vol.forward.get("all_to_all", 0) + vol.backward.get("all_to_all", 0)
        seconds[name], sent[name] = _overlap(device, compute, (vol.total - a2a) / bw) + a2a / bw, vol.total
    # equal times: the ring before the all-gather (one K/V block held, not all), then fewer bytes
    ranked = sorted(seconds, key=lambda n: (seconds[n], n == "allgather", sent[n]))
    best, second = ranked[0], ranked[1]
    reason = (
        f"{best}: {seconds[best] * 1e3:.3g} ms predicted, {sent[best]:,} bytes sent; "
        f"next {second}: {seconds[second] * 1e3:.3g} ms, {sent[second]:,} bytes"
    )
    return AutoChoice(best, dict(options)[best], seconds, sent, reason)


def _device_of(t: torch.Tensor) -> Device:
    if t.device.type != "cuda":
        return DEVICES["CPU"]
    name = torch.cuda.get_device_name(t.device)
    return next((d for key, d in DEVICES.items() if key in name), DEVICES["H100"])


def auto_strategy(
    q: torch.Tensor, k: torch.Tensor, cp_group: ContextParallelGroup, *, causal: bool = False
) -> AutoChoice:
    """What ``context_parallel_attention(..., strategy="auto")`` runs for these inputs, and why.

    The device is ``q``'s (a CUDA device by its name among :data:`DEVICES`, else H100's figures; CPU
    otherwise); the cp group spans nodes when it is larger than ``LOCAL_WORLD_SIZE`` (torchrun's
    ranks per node). Every rank decides the same (the same shapes and group).

    Args:
        q: Local queries ``(B, H, S_local, D)`` (or the global DTensor).
        k: Local keys ``(B, H_kv, S_local, D)``.
        cp_group: The :class:`~cp_dtensor.ContextParallelGroup`.
        causal: Causal masking.

    Returns:
        The :class:`AutoChoice` (cached per shape).
    """
    batch, heads, seq, head_dim = q.shape
    seq_len = seq if hasattr(q, "placements") else seq * cp_group.size
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", cp_group.size))
    return attention_choice(
        batch,
        seq_len,
        heads,
        k.shape[1],
        head_dim,
        cp_group.size,
        q.dtype,
        bool(causal),
        cp_group.ulysses_size,
        _device_of(q),
        cp_group.size > per_node,
    )


set_auto_chooser(auto_strategy)
