"""The training job: a small Llama-style model learns long-range key-value recall under CP x DP.

Run it on one process, or on four (2-way data parallel x 2-way context parallel; gloo on CPU, NCCL
when GPUs are present)::

    python -m cp_dtensor.training
    torchrun --standalone --nproc-per-node 4 -m cp_dtensor.training

Both run the same computation on the same global batch (the global batch size is fixed, the ranks
split it), so their loss curves agree up to floating-point summation order. Each sequence is split
over the cp ranks in the zigzag layout; every attention call sees the whole sequence through ring
attention (or ``--strategy``); gradients are summed over dp x cp
(Note [Gradient sync over dp x cp] in :mod:`cp_dtensor.parallel.grad_sync`).

The task (:class:`~cp_dtensor.training.LongSequenceDataset`): key-value pairs scattered over the whole
sequence, queried at its end, so many answers sit on another rank's shard (about half under cp=2,
three quarters under cp=4). Chance is ``1 / --num-values``. The job ends with the held-out recall of
the answers on the query's own cp rank and on another, and of the same weights with each rank
attending to its own shard only (:func:`attention_within_own_shard`): the other ranks' answers then
fall to near chance, which is what context parallelism is for. The defaults (one layer, 16 sequences
of 512 tokens per step, 800 steps at a peak lr of 2e-3) reach about 100% held-out recall in 2-3
minutes on 2 CPU cores (bench/README.md: how they were chosen).
Rank 0 prints progress
(loss, recall accuracy, tokens/s, peak memory of every rank) and a summary; ``--out`` writes the
summary and the loss/accuracy curve as JSON. The exit status is non-zero on failure (an exception,
a non-finite loss, or an evaluation accuracy below ``--min-accuracy``).

Tensor parallelism: ``--tp T`` splits each layer's heads and MLP width over ``T`` consecutive ranks
(:mod:`cp_dtensor.parallel.tensor_parallel`), e.g. dp 2 x cp 2 x tp 2 on 8 processes::

    torchrun --standalone --nproc-per-node 8 -m cp_dtensor.training --dp 2 --cp 2 --tp 2

Packed documents and windows: ``--packed N`` packs N recall documents of random lengths into each
sequence and passes their ``document_ids`` to every attention call, so a token attends only within its
document; ``--window W`` lets each token see itself and the ``W - 1`` tokens before it. Both are exact
and skip the blocks the mask hides (docs/masks.md)::

    torchrun --standalone --nproc-per-node 4 -m cp_dtensor.training --packed 4 --seq-len 1024

Sharded states: ``--grad-sync fsdp`` shards parameters, gradients and AdamW's moments over the dp x cp
ranks with FSDP2 instead of replicating them (:mod:`cp_dtensor.parallel.fsdp`), for models whose
states do not fit on one rank; the loss curve is the same::

    torchrun --standalone --nproc-per-node 8 -m cp_dtensor.training --dp 2 --cp 2 --tp 2 --grad-sync fsdp

Checkpoints: ``--ckpt-dir DIR --save-every N`` saves through ``torch.distributed.checkpoint``;
``--resume`` continues from the newest complete checkpoint with the same loss curve. A checkpoint
loads into any split and either ``--grad-sync``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shlex
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy

from cp_dtensor.mesh.group import ContextParallelGroup, init_context_parallel_group
from cp_dtensor.nn.loss import IGNORE_INDEX, cross_entropy_across_shards
from cp_dtensor.nn.module import ContextParallelAttention
from cp_dtensor.parallel.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from cp_dtensor.parallel.fsdp import apply_fsdp
from cp_dtensor.parallel.grad_sync import apply_ddp
from cp_dtensor.parallel.tensor_parallel import parallelize_for_tp
from cp_dtensor.training.data import LongSequenceDataset
from cp_dtensor.training.model import AC_MODES, ModelConfig, TransformerWithCP

__all__ = ["TrainConfig", "attention_within_own_shard", "main", "model_config", "parse_args", "train"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
GRAD_SYNCS = ("ddp", "fsdp")


def _opt(help: str, **kwargs: Any) -> Any:
    return field(metadata={"help": help}, **kwargs)


@dataclass
class TrainConfig:
    """Every setting of the job; each field is the command-line flag ``--field-name``."""

    seq_len: int = _opt("tokens per sequence (split over the cp ranks)", default=512)
    batch_size: int = _opt("sequences per step, GLOBAL (split over the dp ranks)", default=16)
    cp: int | None = _opt("context-parallel ranks; default 2 if the world size is even, else 1", default=None)
    dp: int | None = _opt("data-parallel replicas; default world_size / (cp * tp)", default=None)
    tp: int = _opt("tensor-parallel ranks: each holds num_heads / tp heads and 1/tp of the MLP (1: off)", default=1)
    layout: str = _opt("sequence layout: zigzag or contiguous", default="zigzag")
    strategy: str = _opt(
        "attention strategy over cp, a name in cp_dtensor.STRATEGIES, or auto (the planner's time model picks "
        "one per attention shape)",
        default="ring",
    )
    ulysses_size: int | None = _opt("Ulysses ranks inside cp, for --strategy hybrid (a divisor of cp)", default=None)
    grad_sync: str = _opt(
        "ddp: every dp x cp rank holds the whole model, gradients all-reduced; fsdp: parameters, "
        "gradients and optimizer states sharded over the dp x cp ranks (FSDP2)",
        default="ddp",
    )
    hidden_size: int = _opt("model width", default=128)
    num_layers: int = _opt("decoder blocks", default=1)
    num_heads: int = _opt("attention heads", default=8)
    num_kv_heads: int | None = _opt("K/V heads (GQA); default num_heads", default=None)
    intermediate_size: int = _opt(
        "SwiGLU width (0: Llama's 8/3 hidden_size rounded up to 32); the recall task needs attention, not MLP width",
        default=32,
    )
    rope_base: float = _opt("RoPE base (theta)", default=ModelConfig.rope_base)
    ac: str = _opt(
        "activation checkpointing of the decoder blocks: none, full (recompute each block, ring "
        "included) or selective (recompute the MLPs, keep attention)",
        default="none",
    )
    loss_chunk_size: int = _opt(
        "tokens per tile of the LM head + loss, which then never holds all logits (0: whole logits)", default=0
    )
    mlp_tile_size: int = _opt(
        "tokens per tile of the sequence-tiled MLP, whose hidden activations then never exist for the whole "
        "sequence; recomputes the MLP in backward (0: untiled)",
        default=0,
    )
    steps: int = _opt("optimizer steps", default=800)
    lr: float = _opt("peak learning rate (AdamW)", default=2e-3)
    warmup: int = _opt("linear warm-up steps, then cosine decay to lr/10", default=20)
    weight_decay: float = _opt("AdamW weight decay", default=0.0)
    grad_clip: float = _opt("clip the global gradient norm to this (0: off)", default=1.0)
    dtype: str = _opt("float32, bfloat16 (autocast) or float64", default="float32")
    seed: int = _opt("seed of the model init and the data", default=0)
    num_pairs: int = _opt("key-value pairs per sequence (also the queries at its end)", default=8)
    num_keys: int = _opt("key vocabulary", default=8)
    num_values: int = _opt("value vocabulary", default=8)
    num_filler: int = _opt("filler token ids", default=1)
    packed: int = _opt(
        "pack this many recall documents of random lengths into each sequence; attention stays "
        "inside each document (document_ids mask); 0: one document per sequence, no mask",
        default=0,
    )
    no_document_mask: bool = _opt(
        "with --packed: drop the document mask and attend causally across the packed "
        "documents, to measure what a CP path that ignores the mask costs",
        default=False,
    )
    window: int | None = _opt(
        "sliding window: each token attends to itself and the window - 1 tokens before "
        "it (exact; blocks outside every window are skipped); default: full causal",
        default=None,
    )
    compile: bool = _opt(
        "torch.compile the model (fullgraph; each attention call is one custom operator, see "
        "docs/performance.md); the first step compiles",
        default=False,
    )
    eval_samples: int = _opt("held-out sequences scored at the end", default=128)
    log_every: int = _opt("steps between progress lines", default=10)
    ckpt_dir: str | None = _opt("directory for checkpoints (torch.distributed.checkpoint)", default=None)
    save_every: int = _opt(
        "save a checkpoint every N steps (0: never; the last step is always saved when --ckpt-dir is set)", default=0
    )
    resume: bool = _opt("resume from the newest complete checkpoint in --ckpt-dir", default=False)
    profile: str | None = _opt("write a torch.profiler trace of steps 3-5 per rank to this directory", default=None)
    out: str | None = _opt("write the summary and the curve as JSON to this file", default=None)
    min_accuracy: float | None = _opt("exit with status 3 if the eval accuracy ends below this", default=None)
    timeout: float = _opt("seconds before a stuck collective raises", default=600.0)
    crash_at_step: int | None = _opt("testing: os._exit(17) on every rank right after this step", default=None)
    crash_in_save: bool = _opt("testing: with --crash-at-step, die inside that step's save", default=False)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Build a :class:`TrainConfig` from command-line flags (one ``--flag`` per field)."""
    parser = argparse.ArgumentParser(
        prog="python -m cp_dtensor.training",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        kind = {"int": int, "float": float, "str": str}[str(f.type).split(" ")[0]]
        parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"])
    return TrainConfig(**vars(parser.parse_args(argv)))


# ---- pieces of the loop --------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of (1-based) ``step``: linear warm-up, then cosine decay to ``lr / 10``."""
    if step <= cfg.warmup:
        return cfg.lr * step / max(cfg.warmup, 1)
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def attention_kwargs(cfg: TrainConfig, document_ids_BL: torch.Tensor) -> dict[str, Any]:
    """The masks every attention call of the job gets (see docs/masks.md).

    Args:
        cfg: The job; ``--packed`` adds ``document_ids`` (unless ``--no-document-mask``), ``--window W``
            adds ``window=(W - 1, 0)``.
        document_ids_BL: The batch's document ids ``(b, L)`` in GLOBAL order, on the CPU: passed whole,
            so no attention call has to all-gather them, and where the ring plans its masks.

    Returns:
        Keyword arguments for :class:`~cp_dtensor.training.TransformerWithCP` (empty for plain causal attention).
    """
    kwargs: dict[str, Any] = {}
    if cfg.packed and not cfg.no_document_mask:
        kwargs["document_ids"] = document_ids_BL
    if cfg.window is not None:
        kwargs["window"] = (cfg.window - 1, 0)
    return kwargs


def local_batch(
    items: list[dict[str, torch.Tensor]], cp_group: ContextParallelGroup, device: torch.device, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """This rank's shards of ``items`` (samples of :class:`~cp_dtensor.training.LongSequenceDataset`).

    Labels come shifted on the full sequence from the dataset, then ids and labels are partitioned alike.

    Returns:
        ``(input_ids, labels, attn_kwargs)``: the ids and labels ``(b, S)`` of this rank, and the
        masks of :func:`attention_kwargs`.
    """
    ids_BL, labels_BL, docs_BL = (
        torch.stack([it[key] for it in items]) for key in ("input_ids", "labels", "document_ids")
    )
    return (
        cp_group.partition_sequence(ids_BL, seq_dim=1).to(device),
        cp_group.partition_sequence(labels_BL, seq_dim=1).to(device),
        attention_kwargs(cfg, docs_BL),
    )


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def gather_floats(value: float, device: torch.device) -> list[float]:
    """``value`` from every rank, in rank order (collective)."""
    mine = torch.tensor([value], dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [t.item() for t in every]


class Progress:
    """A plain-text progress bar on rank 0: redrawn in place on a terminal, one line per log otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.tty = enabled and sys.stdout.isatty()
        self.start = time.perf_counter()

    def update(self, step: int, text: str, first_step: int) -> None:
        """Draw ``step / total`` and ``text``."""
        if not self.enabled:
            return
        done = step / self.total
        bar = "#" * int(24 * done) + "." * (24 - int(24 * done))
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(step - first_step, 1) * (self.total - step)
        line = f"step {step:>{len(str(self.total))}}/{self.total} [{bar}] {text} eta {eta:4.0f}s"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)

    def close(self) -> None:
        """End the in-place line."""
        if self.tty:
            print(flush=True)


# ---- the job -------------------------------------------------------------------------------------


def _setup(cfg: TrainConfig) -> tuple[ContextParallelGroup, torch.device]:
    if cfg.dtype not in DTYPES:
        raise ValueError(f"Invalid dtype {cfg.dtype!r}. Must be one of: {', '.join(map(repr, DTYPES))}.")
    if cfg.grad_sync not in GRAD_SYNCS:
        raise ValueError(f"Invalid grad_sync {cfg.grad_sync!r}. Must be one of: {', '.join(map(repr, GRAD_SYNCS))}.")
    if cfg.compile and cfg.grad_sync == "fsdp":
        raise ValueError("--compile with --grad-sync fsdp is not supported yet: use --grad-sync ddp to compile.")
    if cfg.compile and cfg.loss_chunk_size:
        raise ValueError(
            f"--compile with --loss-chunk-size {cfg.loss_chunk_size} is not supported yet (the compiled graph "
            "ends at the logits): use --loss-chunk-size 0 to compile."
        )
    if cfg.packed < 0:
        raise ValueError(f"--packed {cfg.packed} must be >= 0 (documents per sequence; 0: no packing).")
    if cfg.no_document_mask and not cfg.packed:
        raise ValueError("--no-document-mask needs --packed N (there is no document mask to drop).")
    if cfg.ac not in AC_MODES:
        raise ValueError(f"Invalid --ac {cfg.ac!r}. Must be one of: {', '.join(map(repr, AC_MODES))}.")
    if cfg.loss_chunk_size < 0:
        raise ValueError(f"--loss-chunk-size {cfg.loss_chunk_size} must be >= 0 (tokens per tile; 0: whole logits).")
    if cfg.mlp_tile_size < 0:
        raise ValueError(f"--mlp-tile-size {cfg.mlp_tile_size} must be >= 0 (tokens per tile; 0: untiled MLP).")
    if cfg.mlp_tile_size and cfg.tp > 1 and cfg.grad_sync == "ddp":
        raise ValueError(
            f"--mlp-tile-size {cfg.mlp_tile_size} with --tp {cfg.tp} needs --grad-sync fsdp: under ddp the tiled "
            "MLP's norm gradient comes out wrong with tensor parallelism (a known fault). Use --grad-sync fsdp, "
            "or --mlp-tile-size 0."
        )
    if cfg.intermediate_size < 0:
        raise ValueError(f"--intermediate-size {cfg.intermediate_size} must be >= 0 (0: Llama's 8/3 hidden_size).")
    if cfg.window is not None and cfg.window < 1:
        raise ValueError(f"--window {cfg.window} must be >= 1 (tokens each token attends to, itself included).")
    if not dist.is_initialized() and "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
    else:
        world = dist.get_world_size() if dist.is_initialized() else 1
    cp = cfg.cp if cfg.cp is not None else (2 if (world // cfg.tp) % 2 == 0 else 1)
    cp_group = init_context_parallel_group(
        cp, dp_size=cfg.dp, layout=cfg.layout, timeout=cfg.timeout, tp_size=cfg.tp, ulysses_size=cfg.ulysses_size
    )
    device = torch.device(cp_group.device_type, torch.cuda.current_device() if cp_group.device_type == "cuda" else None)
    dp = cp_group.dp_mesh.size()
    if cfg.batch_size % dp:
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of dp={dp} (it is the global batch).")
    cp_group.runs(cfg.seq_len)  # ValueError with the fix if the sequence does not split evenly
    return cp_group, device


def _datasets(cfg: TrainConfig) -> tuple[LongSequenceDataset, LongSequenceDataset]:
    kwargs = dict(
        num_pairs=cfg.num_pairs,
        num_keys=cfg.num_keys,
        num_values=cfg.num_values,
        num_filler=cfg.num_filler,
        num_documents=max(cfg.packed, 1),
    )
    try:
        return (
            LongSequenceDataset(cfg.seq_len, seed=cfg.seed, **kwargs),
            LongSequenceDataset(cfg.seq_len, seed=cfg.seed + 1, **kwargs),
        )  # held out: other sequences
    except ValueError as e:  # the dataset names its parameters; name the flags that set them
        raise ValueError(
            f"the recall task's flags do not fit together (--seq-len {cfg.seq_len}, --packed "
            f"{cfg.packed}, --num-pairs {cfg.num_pairs}, --num-keys {cfg.num_keys}, --num-values "
            f"{cfg.num_values}): {e}"
        ) from e


def _recall_counts(
    model: torch.nn.Module,
    dataset: LongSequenceDataset,
    cfg: TrainConfig,
    cp_group: ContextParallelGroup,
    device: torch.device,
    autocast,
) -> torch.Tensor:
    """Held-out answers, correct and asked, split by where their pair token lies (collective).

    Returns:
        ``(4,)`` float64, summed over the replicas: correct and asked answers whose pair token lies on
        another cp rank's shard, then the same for the query's own shard.
    """
    dp, dp_rank = cp_group.dp_mesh.size(), cp_group.dp_mesh.get_local_rank()
    per_dp = cfg.batch_size // dp
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # remote: correct, total; local: correct, total
    with torch.no_grad():
        for first in range(dp_rank * per_dp, cfg.eval_samples - cfg.eval_samples % cfg.batch_size, cfg.batch_size):
            items = [dataset[first + i] for i in range(per_dp)]
            ids, labels, attn_kwargs = local_batch(items, cp_group, device, cfg)
            remote = cp_group.partition_sequence(
                torch.stack([dataset.remote_answers(it, cp_group.size, cp_group.layout) for it in items]), seq_dim=1
            ).to(device)
            with autocast():
                logits = model(ids, return_logits=True, **attn_kwargs)
            asked = labels != IGNORE_INDEX
            correct = (logits.argmax(-1) == labels) & asked
            counts += torch.stack(
                [(correct & remote).sum(), (asked & remote).sum(), (correct & ~remote).sum(), (asked & ~remote).sum()]
            ).double()
    dist.all_reduce(counts, group=cp_group.replica_group)
    return counts


@contextlib.contextmanager
def attention_within_own_shard(model: torch.nn.Module, own_shard: ContextParallelGroup):
    """Inside the block, every attention layer of ``model`` attends only to its own rank's shard.

    What the same weights do when the sequence is split over the cp ranks WITHOUT context
    parallelism: each attention layer gets ``own_shard``, a one-rank cp group, so no K/V block
    travels and a query sees the keys of its own shard only, causally (a zigzag or contiguous shard
    holds its positions in increasing order). The model keeps its own group, so RoPE still rotates by
    global positions.

    Args:
        model: A :class:`~cp_dtensor.training.TransformerWithCP` (or any module holding
            :class:`~cp_dtensor.ContextParallelAttention` layers); restored when the block ends.
        own_shard: A group with ``cp_size=1`` (``init_context_parallel_group(1)``, called on every rank).

    Raises:
        ValueError: ``own_shard`` spans more than one cp rank.
    """
    if own_shard.size != 1:
        raise ValueError(f"own_shard must be a one-rank cp group, got cp size {own_shard.size}.")
    layers = [m for m in model.modules() if isinstance(m, ContextParallelAttention)]
    real = [m.cp_group for m in layers]
    for m in layers:
        m.cp_group = own_shard
    try:
        yield model
    finally:
        for m, group in zip(layers, real):
            m.cp_group = group


def evaluate(
    model: TransformerWithCP,
    dataset: LongSequenceDataset,
    cfg: TrainConfig,
    cp_group: ContextParallelGroup,
    device: torch.device,
    autocast,
) -> dict[str, float]:
    """Recall accuracy on the first ``cfg.eval_samples`` sequences of ``dataset`` (collective).

    Returns:
        ``eval_accuracy``, and the same over the answers whose pair token lies on another cp rank's
        shard (``eval_accuracy_remote``) and on the query's own shard (``eval_accuracy_local``): with
        exact attention across shards the two agree up to sampling noise. Then the same two with
        each rank attending only to its own shard (:func:`attention_within_own_shard`):
        ``own_shard_accuracy_remote`` falls to near chance, since those answers are out of reach
        (NaN where this is not measured: one cp rank, tensor parallelism, masks, or ``--compile``).
    """
    c_remote, n_remote, c_local, n_local = _recall_counts(model, dataset, cfg, cp_group, device, autocast).tolist()
    ratio = lambda c, n: c / n if n else float("nan")  # noqa: E731
    summary = {
        "eval_accuracy": ratio(c_remote + c_local, n_remote + n_local),
        "eval_accuracy_remote": ratio(c_remote, n_remote),
        "eval_accuracy_local": ratio(c_local, n_local),
        "eval_answers": int(n_remote + n_local),
        "eval_answers_remote": int(n_remote),
        "own_shard_accuracy_remote": float("nan"),
        "own_shard_accuracy_local": float("nan"),
    }
    plain = cfg.tp == 1 and not (cfg.packed or cfg.window or cfg.compile)
    if cp_group.size > 1 and plain:
        ulysses = 1 if cfg.strategy == "hybrid" else None  # hybrid needs a Ulysses axis, here of one rank
        own_shard = init_context_parallel_group(1, layout=cp_group.layout, timeout=cfg.timeout, ulysses_size=ulysses)
        with attention_within_own_shard(model, own_shard):
            counts = _recall_counts(model, dataset, cfg, cp_group, device, autocast)
        c_remote, n_remote, c_local, n_local = counts.tolist()
        summary["own_shard_accuracy_remote"] = ratio(c_remote, n_remote)
        summary["own_shard_accuracy_local"] = ratio(c_local, n_local)
    return summary


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    """The demo model's :class:`~cp_dtensor.training.ModelConfig` for the job ``cfg`` (0 flags become ``None``).

    Args:
        cfg: The job.
        vocab_size: Token ids of the task (:attr:`~cp_dtensor.training.LongSequenceDataset.vocab_size`).

    Returns:
        The model's shape, attention strategy and memory options.
    """
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size or None,
        rope_base=cfg.rope_base,
        strategy=cfg.strategy,
        activation_checkpointing=cfg.ac,
        loss_chunk_size=cfg.loss_chunk_size or None,
        mlp_tile_size=cfg.mlp_tile_size or None,
    )


def _build(cfg: TrainConfig, cp_group: ContextParallelGroup, device: torch.device, vocab_size: int):
    """The model (same initial weights on every rank), its gradient-syncing wrapper and the optimizer."""
    torch.manual_seed(cfg.seed)
    model = TransformerWithCP(model_config(cfg, vocab_size), cp_group=cp_group).to(device)
    if cfg.dtype == "float64":
        model = model.double()
    model = parallelize_for_tp(model, cp_group)  # heads and MLP width over tp; unchanged when --tp 1
    if cfg.compile:  # in place: the gradient-syncing wrapper calls the compiled forward
        model.compile(fullgraph=True, dynamic=False)
    if cfg.grad_sync == "fsdp":  # see Note [FSDP over dp x cp]; the model itself becomes the FSDP module
        mp_policy = None
        if cfg.dtype == "bfloat16" and device.type == "cuda":  # bf16 weights in compute, fp32 reduction
            mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        ddp = model = apply_fsdp(model, cp_group, mp_policy=mp_policy)
    else:
        ddp = apply_ddp(model, cp_group)  # see Note [Gradient sync over dp x cp]
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    return model, ddp, optimizer


def _resume(cfg: TrainConfig, ddp: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """The last completed step: from the newest complete checkpoint with ``--resume``, else 0."""
    if not cfg.resume:
        return 0
    if cfg.ckpt_dir is None:
        raise ValueError("--resume needs --ckpt-dir.")
    latest = latest_checkpoint(cfg.ckpt_dir)
    return 0 if latest is None else load_checkpoint(latest, ddp, optimizer)["step"]


def _step(cfg: TrainConfig, step: int, ddp, model, optimizer, batch, cp_group, autocast):
    """One optimizer step on this rank's share of the global batch; returns its :class:`ShardedLoss`."""
    ids, labels, attn_kwargs = batch
    if cfg.compile:  # the compiled graph ends at the logits: the loss's all-reduce reads counts on the host
        with autocast():
            logits = ddp(ids, return_logits=True, **attn_kwargs)
        out = cross_entropy_across_shards(logits, labels, cp_group)
    else:
        with autocast():
            out = ddp(ids, labels, return_sharded_loss=True, **attn_kwargs)  # Note [Loss across shards]
    out.loss.backward()  # the wrapper sums the gradients over dp x cp
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not math.isfinite(out.loss.item()):
        raise FloatingPointError(f"loss is {out.loss.item()} at step {step}; try a lower --lr or --dtype float32")
    return out


def _mean(curve: list[dict[str, float]], key: str) -> float:
    return sum(c[key] for c in curve) / len(curve) if curve else float("nan")


def _throughput(curve: list[dict[str, float]], tokens_per_step: int) -> float:
    """Tokens per second over ``curve``'s steps (harmonic: total tokens / total time)."""
    seconds = sum(tokens_per_step / c["tokens_per_s"] for c in curve)
    return tokens_per_step * len(curve) / seconds if seconds else float("nan")


def _banner(
    cfg: TrainConfig,
    cp_group: ContextParallelGroup,
    dataset: LongSequenceDataset,
    device: torch.device,
    num_params: int,
    start_step: int,
) -> None:
    print(
        f"cp_dtensor.training: world {dist.get_world_size()} = dp {cp_group.dp_mesh.size()} x cp {cp_group.size} "
        f"x tp {cp_group.tp_size} ({cp_group.layout}, {cfg.strategy}, {cfg.grad_sync}), "
        f"{device.type}/{dist.get_backend()}, "
        f"{num_params:,} parameters, {cfg.dtype}"
    )
    mask = "NO document mask" if cfg.no_document_mask else "document mask"
    packing = f"{cfg.packed} packed documents ({mask}) of " if cfg.packed else ""
    window = f", sliding window {cfg.window}" if cfg.window is not None else ""
    print(
        f"task: {cfg.seq_len} tokens/sequence ({cfg.seq_len // cp_group.size} per cp rank{window}), {packing}"
        f"{cfg.num_pairs} key-value pairs, {cfg.batch_size} sequences/step; answers on another cp "
        f"rank's shard: {dataset.remote_fraction(cp_group.size, cp_group.layout):.0%}; chance accuracy "
        f"{dataset.chance_accuracy:.1%}" + (f"; resuming after step {start_step}" if start_step else ""),
        flush=True,
    )


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the job described by ``cfg``; every rank returns the summary (rank 0's is the one to report).

    Returns:
        The summary: configuration, final loss and accuracies, chance levels, throughput, peak
        memory per rank, the machine, and the per-step curve.

    Raises:
        ValueError: An inconsistent configuration (names the setting and the fix).
        FloatingPointError: The loss became NaN or infinite.
    """
    dataset, eval_set = _datasets(cfg)  # first: a task that does not fit fails before any process group
    cp_group, device = _setup(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    dp, dp_rank = cp_group.dp_mesh.size(), cp_group.dp_mesh.get_local_rank()
    per_dp = cfg.batch_size // dp
    model, ddp, optimizer = _build(cfg, cp_group, device, dataset.vocab_size)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if cfg.dtype == "bfloat16"
        else contextlib.nullcontext
    )
    start_step = _resume(cfg, ddp, optimizer)
    num_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        _banner(cfg, cp_group, dataset, device, num_params, start_step)

    progress = Progress(cfg.steps, rank == 0)
    curve: list[dict[str, float]] = []
    tokens_per_step = cfg.batch_size * cfg.seq_len
    mem_per_rank: list[float] = []
    wall_start = time.perf_counter()
    with _profiler(cfg, rank, device) if cfg.profile else contextlib.nullcontext() as prof:
        for step in range(start_step + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            first = (step - 1) * cfg.batch_size + dp_rank * per_dp  # the data position is a function of step
            batch = local_batch([dataset[first + i] for i in range(per_dp)], cp_group, device, cfg)
            out = _step(cfg, step, ddp, model, optimizer, batch, cp_group, autocast)
            curve.append(
                {
                    "step": step,
                    "loss": out.loss.item(),
                    "accuracy": out.accuracy,
                    "lr": lr_at(step, cfg),
                    "tokens_per_s": tokens_per_step / (time.perf_counter() - t0),
                    "time_s": time.perf_counter() - wall_start,
                }
            )
            if step % cfg.log_every == 0 or step == cfg.steps:
                mem_per_rank = gather_floats(peak_memory_mb(device), device)
                recent = curve[-cfg.log_every :]
                progress.update(
                    step,
                    f"loss {curve[-1]['loss']:.3f} acc {_mean(recent, 'accuracy'):.2f} "
                    f"{_throughput(recent, tokens_per_step) / 1e3:.1f}k tok/s "
                    f"mem/rank {'/'.join(f'{m:.0f}' for m in mem_per_rank)} MB",
                    start_step,
                )
            if cfg.ckpt_dir and ((cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps):
                crash = cfg.crash_in_save and step == cfg.crash_at_step
                save_checkpoint(
                    cfg.ckpt_dir,
                    step,
                    ddp,
                    optimizer,
                    {"step": step, "next_sample": step * cfg.batch_size},
                    before_rename=(lambda: os._exit(17)) if crash else None,
                )
            if step == cfg.crash_at_step:
                os._exit(17)  # testing: a hard kill, no cleanup (see tests/test_train.py)
            if prof is not None:
                prof.step()
    progress.close()
    wall = time.perf_counter() - wall_start
    evaluation = evaluate(model, eval_set, cfg, cp_group, device, autocast)
    if cfg.profile and rank == 0:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    tail = curve[-max(len(curve) // 10, 1) :]
    return {
        "command": _command(world),
        "machine": _machine(),
        "config": asdict(cfg),
        "world_size": world,
        "dp": dp,
        "cp": cp_group.size,
        "tp": cp_group.tp_size,
        "device": device.type,
        "backend": dist.get_backend(),
        "torch": torch.__version__,
        "num_params": num_params,
        "tokens_per_cp_rank": cfg.seq_len // cp_group.size,
        "steps_run": len(curve),
        "first_step": start_step + 1,
        "wall_s": wall,
        "tokens_per_s": _throughput(curve[1:], tokens_per_step),  # the first step warms up
        "final_loss": _mean(tail, "loss"),
        "final_train_accuracy": _mean(tail, "accuracy"),
        **evaluation,
        "chance_accuracy": dataset.chance_accuracy,
        "remote_answer_fraction": dataset.remote_fraction(cp_group.size, cp_group.layout),
        "peak_memory_mb_per_rank": mem_per_rank,
        "curve": curve,
    }


def _profiler(cfg: TrainConfig, rank: int, device: torch.device):
    from torch.profiler import ProfilerActivity, profile, schedule

    Path(cfg.profile).mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(
        activities=activities,
        schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
        on_trace_ready=lambda p: p.export_chrome_trace(str(Path(cfg.profile) / f"rank{rank}.json")),
    )


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.1%}"


def _machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU model and count, GPU, and the load when measured."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "loadavg_1m": os.getloadavg()[0],
    }


def _command(world: int) -> str:
    args = shlex.join(sys.argv[1:])
    launcher = f"torchrun --standalone --nproc-per-node {world}" if world > 1 else "python"
    return f"{launcher} -m cp_dtensor.training {args}".strip()


def _print_summary(summary: dict[str, Any]) -> None:
    """The run, then the point of it: recall of answers on the query's own cp rank and on another."""
    machine = summary["machine"]
    rows = [
        (
            "ranks",
            f"{summary['world_size']} = dp {summary['dp']} x cp {summary['cp']} x tp {summary['tp']} "
            f"({summary['device']}, {summary['backend']})",
        ),
        (
            "steps",
            f"{summary['first_step']}..{summary['first_step'] + summary['steps_run'] - 1} in "
            f"{summary['wall_s']:.1f} s, {summary['tokens_per_s']:,.0f} tokens/s",
        ),
        ("peak memory", " / ".join(f"{m:.0f}" for m in summary["peak_memory_mb_per_rank"]) + " MB per rank"),
        (
            "machine",
            f"{machine['cpu_count']} x {machine['cpu']}"
            + (f", {machine['gpu']}" if machine["gpu"] else "")
            + f", load average {machine['loadavg_1m']:.1f} at the end",
        ),
        (
            "final loss",
            f"{summary['final_loss']:.4f}, train recall {_pct(summary['final_train_accuracy'])} "
            "(means of the last 10% of steps)",
        ),
    ]
    print("summary:")
    for name, value in rows:
        print(f"  {name:<12} {value}")
    n_all, n_remote = summary["eval_answers"], summary["eval_answers_remote"]
    rows = (
        ("on the query's cp rank", "local", n_all - n_remote),
        ("on another cp rank", "remote", n_remote),
    )
    print(
        f"held-out recall of {n_all:,} answers (chance {_pct(summary['chance_accuracy'])}), "
        f"all {_pct(summary['eval_accuracy'])}; by where the queried pair sits:"
    )
    alone = not math.isnan(summary["own_shard_accuracy_remote"])  # measured: cp > 1, no tp, masks or compile
    print(f"  {'':<24}{'context parallel':>20}" + (f"{'each rank alone':>18}" if alone else ""))
    for name, where, count in rows:
        if not count:  # one cp rank: every answer is on the query's rank
            continue
        ring = f"{_pct(summary[f'eval_accuracy_{where}'])} of {count:,}"
        print(f"  {name:<24}{ring:>20}" + (f"{_pct(summary[f'own_shard_accuracy_{where}']):>18}" if alone else ""))
    if alone:
        print("  (each rank alone: the same weights, attending to its own shard; no keys or values cross ranks)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m cp_dtensor.training``; returns the exit status (0 = success)."""
    cfg = parse_args(argv)
    status = 0
    try:
        summary = train(cfg)
        if dist.get_rank() == 0:
            _print_summary(summary)
            if cfg.out:
                Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
                Path(cfg.out).write_text(json.dumps(summary, indent=1))
        if cfg.min_accuracy is not None and not summary["eval_accuracy"] >= cfg.min_accuracy:
            if dist.get_rank() == 0:
                print(f"FAILED: eval accuracy {summary['eval_accuracy']:.1%} < --min-accuracy {cfg.min_accuracy:.1%}")
            status = 3
    except Exception:
        traceback.print_exc()
        status = 1
    finally:
        if dist.is_initialized() and status == 0:
            dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
