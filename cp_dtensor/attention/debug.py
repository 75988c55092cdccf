"""Opt-in checks for a run that misbehaves: do the ranks agree on the call, and is the output right?

Both are off by default (they communicate and compute more); every attention strategy calls them:

* **validate** (``validate=True`` or ``CP_DTENSOR_VALIDATE=1``): before anything else, each rank of
  the cp group all-gathers a summary of its call (function, layout, cp size, the shape, dtype and
  device type of every tensor, ``causal``, ``scale``, the mask arguments, the names of score and mask
  functions, the debug switch) with
  ``all_gather_object``. If any rank differs, every rank raises the same ``ValueError`` listing what
  differs per rank, instead of hanging in the ring or mixing mismatched data. A global
  ``document_ids`` (``(B, L)``, the same on every rank) and the ``sinks`` are compared by content too.
* **debug check** (``debug_check=True`` or ``CP_DTENSOR_DEBUG_CHECK=1``): after the forward, every
  rank all-gathers ``q``, ``k``, ``v``, recomputes fp64 attention of the whole sequence with
  :func:`cp_dtensor.reference.full_attention` and the call's mask, and warns (``RuntimeWarning``, naming the
  rank and the max error) when its own output differs by more than the dtype's tolerance. Memory
  ``O(B * H * L^2)``: for small debugging runs only.

Every rank must enable a switch alike (set the environment variable for the whole job): a rank that
validates waits in a collective the others never join (until the group's timeout).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import warnings
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from cp_dtensor.attention.checks import check_group
from cp_dtensor.comm.counter import record_comm
from cp_dtensor.local.logits import LogitSpec
from cp_dtensor.positions.masks import MaskSpec, positions
from cp_dtensor.reference import full_attention  # the project's fp64 oracle, shipped inside the package

if TYPE_CHECKING:
    from cp_dtensor.attention.call import AttentionOptions

__all__ = ["VALIDATE_ENV", "DEBUG_CHECK_ENV", "enabled", "check_call", "recheck_output", "DEBUG_CHECK_TOLERANCE"]

VALIDATE_ENV = "CP_DTENSOR_VALIDATE"
DEBUG_CHECK_ENV = "CP_DTENSOR_DEBUG_CHECK"

# Max abs error allowed against the fp64 reference, relative to max |v|: the output is a convex
# combination of value rows. Loose on purpose (a wrong block or merge errs by O(max |v|)): fp32
# rounds logits at ~1e-7 relative; bf16/fp16 round inputs and probabilities at 2^-8 / 2^-11.
DEBUG_CHECK_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def enabled(flag: object, env: str) -> bool:
    """``flag`` or the environment variable ``env`` set to ``1``/``true``/``yes``/``on``.

    Raises:
        ValueError: ``flag`` is not a bool.
    """
    if not isinstance(flag, bool):
        raise ValueError(f"The {env.removeprefix('CP_DTENSOR_').lower()} switch must be a bool, got {flag!r}.")
    return flag or os.environ.get(env, "").strip().lower() in ("1", "true", "yes", "on")


def _describe(value: object, content: bool = False) -> str:
    """A short comparable description: tensors by kind, shape, dtype, device type; others by ``repr``."""
    if isinstance(value, DTensor):
        return f"DTensor(shape={tuple(value.shape)}, dtype={value.dtype}, placements={tuple(value.placements)})"
    if isinstance(value, torch.Tensor):
        text = f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype}, device={value.device.type})"
        if content:
            raw = value.detach().cpu().contiguous().view(torch.uint8)  # any dtype, bf16 included
            digest = hashlib.sha1(raw.numpy().tobytes()).hexdigest()[:12]
            text += f" content sha1 {digest}"
        return text
    if callable(value):  # a score or mask function: its name (its repr holds a per-process address)
        return f"function {getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _is_global_ids(ids: object, q: object, size: int) -> bool:
    """True for a ``(B, L)`` global ``document_ids``, which must be identical on every rank."""
    return (
        size > 1
        and isinstance(ids, torch.Tensor)
        and not isinstance(ids, DTensor)
        and ids.dim() == 2
        and isinstance(q, torch.Tensor)
        and q.dim() == 4
        and ids.shape[1] == q.shape[2] * size
    )


def _summary(name: str, cp_group, q, k, v, args: dict) -> dict[str, str]:
    summary = {"function": name, "layout": repr(cp_group.layout), "cp size": str(cp_group.size)}
    summary.update({"q": _describe(q), "k": _describe(k), "v": _describe(v)})
    for key, value in args.items():
        content = key == "sinks" or (key == "document_ids" and _is_global_ids(value, q, cp_group.size))
        summary[key] = _describe(value, content=content)
    return summary


def _disagreement(name: str, summaries: list[dict[str, str]]) -> str | None:
    """The message naming each differing field per rank, or ``None`` when all ranks agree."""
    keys = list(dict.fromkeys(key for s in summaries for key in s))
    lines = []
    for key in keys:
        values = [s.get(key, "<missing>") for s in summaries]
        if len(set(values)) > 1:
            per_rank = "; ".join(f"cp rank {r}: {value}" for r, value in enumerate(values))
            lines.append(f"  {key}: {per_rank}")
    if not lines:
        return None
    return (
        f"validate: the ranks of the cp group disagree on the {name} call:\n" + "\n".join(lines) + "\n"
        "Every rank of the cp axis must pass tensors of the same shapes and dtypes and the same arguments "
        "(only the contents of its own shard differ): check the data loader and the sequence length per rank."
    )


def check_call(
    name: str,
    cp_group: object,
    q: object,
    k: object,
    v: object,
    common: AttentionOptions,
    options: object,
) -> None:
    """The first step of every attention call: check ``cp_group``; with validation, that all ranks agree.

    Args:
        name: The public function called (``"ring_attention"``...), for the message.
        cp_group: The group the call was given.
        q: The call's queries, as given (not yet checked: any object).
        k: The call's keys, as given.
        v: The call's values, as given.
        common: The call's common options; ``common.validate`` (or ``CP_DTENSOR_VALIDATE=1``)
            all-gathers the call's summary over the cp group and compares (see the module docstring).
        options: The strategy's own options (a dataclass), compared too.

    Raises:
        ValueError: ``cp_group`` is not a :class:`~cp_dtensor.ContextParallelGroup`, ``validate`` is not
            a bool, or (validation on) the ranks disagree: the same message on every rank.
    """
    check_group(cp_group)
    args = {f.name: getattr(common, f.name) for f in dataclasses.fields(common) if f.name != "validate"}
    args.update(vars(options))
    # the effective switch is compared: its env var may differ per rank
    args["debug_check"] = enabled(args["debug_check"], DEBUG_CHECK_ENV)
    if not enabled(common.validate, VALIDATE_ENV) or cp_group.size == 1:
        return
    summary = _summary(name, cp_group, q, k, v, args)
    summaries: list = [None] * cp_group.size
    dist.all_gather_object(summaries, summary, group=cp_group.process_group)
    record_comm("validate", len(pickle.dumps(summary)) * (cp_group.size - 1))
    message = _disagreement(name, summaries)
    if message is not None:
        raise ValueError(message)


def recheck_output(
    name: str,
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cp_group,
    *,
    debug_check: bool,
    scale: float,
    causal: bool = False,
    mask: MaskSpec | None = None,
    logits: LogitSpec | None = None,
) -> None:
    """The last line of every strategy: with the debug check on, compare ``out`` with an fp64 reference.

    Collective when on: every rank of the cp group must call it (it all-gathers ``q``, ``k``, ``v``).

    Args:
        name: The public function called, for the warning.
        out: This rank's output ``(B, H, S, D)`` (local).
        q: This rank's queries ``(B, H, S, D)`` (local, checked).
        k: This rank's keys ``(B, H_kv, S, D)``.
        v: This rank's values ``(B, H_kv, S, D)``.
        cp_group: The cp group.
        debug_check: Run the check; also on when ``CP_DTENSOR_DEBUG_CHECK=1``.
        scale: The resolved softmax scale.
        causal: Causal masking, when ``mask`` is not given.
        mask: Every visibility rule of the call (:class:`~cp_dtensor.positions.masks.MaskSpec`); default causal only.
        logits: Soft-capping, ``score_mod`` and sinks of the call, or ``None``.

    Warns:
        RuntimeWarning: naming the rank, the max abs error and the tolerance, on mismatch.
    """
    if not enabled(debug_check, DEBUG_CHECK_ENV):
        return
    mask = MaskSpec(causal=causal) if mask is None else mask
    with torch.no_grad():
        q_full, k_full, v_full = (cp_group.gather_sequence(x.detach(), seq_dim=2).double() for x in (q, k, v))
        record_comm("debug_check", sum(x.numel() * x.element_size() for x in (q, k, v)) * (cp_group.size - 1))
        seq_len = q_full.shape[2]
        all_pos = torch.arange(seq_len)  # masks are evaluated on the host, like the ring's plans
        visible = mask.visible(all_pos, all_pos)[:, None].to(q_full.device)  # (B or 1, 1, L, L)
        extra = {}
        if logits is not None:
            sinks = None if logits.sinks is None else logits.sinks.double()
            extra = dict(sinks=sinks, softcap=logits.softcap, score_mod=logits.score_mod)
        expected_full = full_attention(q_full, k_full, v_full, scale=scale, mask=visible, **extra)  # (B, H, L, D)
        expected = expected_full[:, :, positions(cp_group.runs(seq_len)).to(q_full.device)]  # this rank's rows
        error = (out.detach().double() - expected).abs().max().item()
        tolerance = DEBUG_CHECK_TOLERANCE[q.dtype] * max(1.0, v_full.abs().max().item())
    if not error <= tolerance:  # also catches NaN
        warnings.warn(
            f"cp_dtensor debug check: {name} on cp rank {cp_group.rank} (global rank {dist.get_rank()}) differs "
            f"from a single-process fp64 reference: max abs error {error:.3g} > tolerance {tolerance:.3g} for "
            f"{q.dtype}.",
            RuntimeWarning,
            stacklevel=3,
        )
