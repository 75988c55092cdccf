"""Single-process reference for context parallelism: the oracle and the ring, written to be read.

Pure PyTorch, one process, no `torch.distributed`. It is what the production package
(`cp_dtensor`) is checked against, and never imports it.

* `full_attention`: textbook attention, the oracle (`cp_dtensor.reference.attention`).
* `shard_indices`, `shard`, `unshard`: how a sequence is split over ranks (`cp_dtensor.reference.layouts`).
* `simulate_ring_attention`: ring attention on P virtual ranks, forward and backward, with an
  optional trace of its schedule (`cp_dtensor.reference.ring`, `cp_dtensor.reference.trace`).
* `AttentionMask`, `make_mask`, `document_ids_from_lengths`: packed documents, sliding windows and
  padding on global positions (`cp_dtensor.reference.masks`); the ring takes them as ``document_ids=``,
  ``window=`` and ``seq_len=``, and `AttentionMask.dense` gives the oracle's mask.

Examples:
    >>> import torch
    >>> from cp_dtensor.reference import full_attention, simulate_ring_attention
    >>> q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64) for _ in range(3))
    >>> out = simulate_ring_attention(q, k, v, world_size=4, causal=True, layout="zigzag")
    >>> torch.allclose(out, full_attention(q, k, v, causal=True))
    True
"""

from .attention import full_attention
from .layouts import LAYOUTS, num_chunks, shard, shard_indices, unshard
from .masks import AttentionMask, document_ids_from_lengths, make_mask
from .ring import (
    merge,
    simulate_ring_attention,
    simulate_ring_attention_backward,
    simulate_ring_attention_forward,
)
from .trace import BLOCK_KINDS, TraceEntry, ring_steps_needed, trace_work_per_rank

__all__ = [
    "AttentionMask",
    "BLOCK_KINDS",
    "LAYOUTS",
    "TraceEntry",
    "document_ids_from_lengths",
    "full_attention",
    "make_mask",
    "merge",
    "num_chunks",
    "ring_steps_needed",
    "shard",
    "shard_indices",
    "simulate_ring_attention",
    "simulate_ring_attention_backward",
    "simulate_ring_attention_forward",
    "trace_work_per_rank",
    "unshard",
]
