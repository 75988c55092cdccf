"""Checkpoints through ``torch.distributed.checkpoint`` (DCP), safe against a kill mid-save.

Layout of a checkpoint directory::

    ckpt/step_00000200/          a complete checkpoint (DCP files + .metadata)
    ckpt/step_00000400/          the latest one: resume starts here
    ckpt/.tmp_step_00000600/     a save in progress (or killed): never read

Every rank calls :func:`save_checkpoint` (DCP saves collectively: each rank writes its files, rank
0 writes ``.metadata`` last). The save goes to a temporary directory; only after every rank has
finished does rank 0 ``rename`` it to its final name. A rename within one filesystem is atomic, so
a job killed at any moment leaves either the new checkpoint complete or no trace of it besides a
``.tmp_`` directory, and the previous checkpoint untouched. :func:`latest_checkpoint` only looks at
final names.

What is saved: the model and optimizer states (by parameter name, from
``torch.distributed.checkpoint.state_dict.get_state_dict``, so a DDP wrapper makes no difference),
and a ``train`` dict the caller fills (step, data position, ...), plus each rank's RNG states.
Parameters are replicated, so DCP writes each tensor once (deduplicated across ranks). Under tensor
parallelism (:func:`~cp_dtensor.parallelize_for_tp`) parameters and optimizer states are DTensors on
the tp mesh: each tp shard is written once (its dp x cp replicas deduplicated) with its place in the
whole tensor, so the checkpoint loads into another dp x cp x tp split too, one process included
(DCP reads what each rank's shard covers; tests/test_tensor_parallel.py). Under FSDP2
(:func:`~cp_dtensor.apply_fsdp`) the same holds one level down: every rank writes only its own shard
of each parameter and AdamW moment, and the checkpoint loads into one process, into DDP and into any
other dp x cp x tp split, FSDP or not, bit for bit (tests/test_fsdp.py).

Note [RNG states across worlds]
-------------------------------
Weights, optimizer states and the ``train`` dict load into any dp x cp x tp split, larger or smaller:
they are whole tensors or DTensors with their place in the whole, and DCP reshards them. The RNG
states are not: each rank saved its own (``rng.rank{r}``), and what rank ``r``'s generator is used
for depends on the split (its dp replica, cp shard and tp shard). So :func:`load_checkpoint` restores
rank ``r``'s state only when the checkpoint was saved by a world of the same size; then the ranks
play the same roles (the job builds its mesh from the same sizes) and training goes on exactly. In a
world of another size no saved state belongs to this rank, and guessing would repeat streams across
ranks; instead every rank reseeds deterministically from the checkpoint: ``seed + rank``, where
``seed`` is drawn from rank 0's saved CPU generator. A resumed run is then reproducible (the same
checkpoint on the same world gives the same streams), every rank's stream differs, and a warning
says that the RNG streams were not continued. The saved world size is read from the checkpoint's
own metadata (the ``rng.rank*`` keys DCP recorded), so no format of our own is involved.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint"]

logger = logging.getLogger(__name__)

_FINAL = re.compile(r"^step_(\d{8})$")
_TMP_PREFIX = ".tmp_"


def _rng_key() -> str:
    return f"rank{dist.get_rank()}"  # per rank: DCP would deduplicate a key that every rank shares


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    ckpt_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict[str, Any],
    *,
    keep_last: int | None = 2,
    before_rename: Callable[[], None] | None = None,
) -> Path:
    """Save a checkpoint of ``step`` atomically (collective: every rank calls it).

    Args:
        ckpt_dir: Directory holding the checkpoints (created if missing; shared by all ranks).
        step: Training step just completed; names the checkpoint ``step_{step:08d}``.
        model: The model (or its DDP wrapper).
        optimizer: Its optimizer.
        train_state: Small JSON-serialisable values to restore (step, data position, ...).
        keep_last: Keep this many newest checkpoints, delete older ones; ``None`` keeps all.
        before_rename: Called on every rank after the data is written and before it is published
            (tests use it to kill the job mid-save).

    Returns:
        The final checkpoint directory.
    """
    root = Path(ckpt_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{_TMP_PREFIX}*"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "train": json.dumps(train_state), "rng": {_rng_key(): _rng_state()}}
    dcp.save(state, checkpoint_id=tmp)
    dist.barrier()  # every rank's files are written (and .metadata, by rank 0, last)
    if before_rename is not None:
        before_rename()
    if dist.get_rank() == 0:
        if final.exists():  # the same step saved again (a resumed run): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)  # atomic: the checkpoint appears complete or not at all
        _fsync_dir(root)
        if keep_last is not None:
            for old in _final_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _final_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _FINAL.match(p.name) and (p / ".metadata").is_file()]
    return sorted(found, key=lambda p: int(_FINAL.match(p.name).group(1)))


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``ckpt_dir``, or ``None`` if there is none.

    Directories of saves still in progress or killed (``.tmp_*``) are ignored.
    """
    found = _final_checkpoints(Path(ckpt_dir))
    return found[-1] if found else None


def _saved_keys(path: Path) -> set[str]:
    """The flattened keys the checkpoint holds (``model.*``, ``rng.rank{r}.cpu``, ...), from DCP's metadata."""
    return set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)


def _restore_rng(path: Path, state: dict) -> None:
    """Set this rank's RNG states from a loaded checkpoint; see Note [RNG states across worlds]."""
    if "mine" in state:
        rng = state["mine"]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        return
    gen = torch.Generator()
    gen.set_state(state["rank0"]["cpu"])
    seed = int(torch.randint(0, 2**62, (1,), generator=gen)) + dist.get_rank()
    torch.manual_seed(seed)  # CPU and every CUDA device
    if dist.get_rank() == 0:
        logger.warning(
            "Checkpoint %s was saved by a world of another size: the RNG streams are not continued; every rank "
            "reseeds from the checkpoint (seed + rank). Weights, optimizer and train state are restored exactly.",
            path,
        )


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a checkpoint into ``model`` and ``optimizer`` in place (collective: every rank calls it).

    The checkpoint may come from any dp x cp x tp split, larger or smaller than this one: weights,
    optimizer states and the ``train`` state are restored bit for bit (DCP reshards them). RNG states
    are restored when the saving world had as many ranks as this one; otherwise every rank reseeds
    deterministically from the checkpoint (``seed + rank``) and rank 0 logs a warning (see Note [RNG
    states across worlds]).

    Args:
        path: A checkpoint directory, as returned by :func:`latest_checkpoint`.
        model: The model (or its DDP wrapper), built as when it was saved (any split).
        optimizer: Its optimizer.

    Returns:
        The ``train_state`` dict given to :func:`save_checkpoint`.
    """
    path = Path(path)
    keys = _saved_keys(path)
    same_world = sum(bool(re.fullmatch(r"rng\.rank\d+\.cpu", k)) for k in keys) == dist.get_world_size()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    # DCP raises on a key the checkpoint lacks: ask for this rank's own RNG states only in a world of
    # the same size, and only for the devices that were saved.
    if same_world:
        rng = {_rng_key(): {d: t for d, t in _rng_state().items() if f"rng.{_rng_key()}.{d}" in keys}}
    else:
        rng = {"rank0": {"cpu": torch.get_rng_state()}}
    state = {"model": model_sd, "optim": optim_sd, "train": "", "rng": rng}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _restore_rng(path, {"mine": state["rng"][_rng_key()]} if same_world else state["rng"])
    return json.loads(state["train"])
