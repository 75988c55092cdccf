"""cp_dtensor: context parallelism for PyTorch.

Shard a long sequence across the ranks of a ``DeviceMesh`` axis and compute exact attention over the
whole sequence with ring attention (or the other strategies), forward and backward.
"""

from cp_dtensor.allgather import allgather_kv_attention
from cp_dtensor.comm import CommCounter, RingAttentionCommunicator, count_comm
from cp_dtensor.comm_model import CommVolume, comm_bytes
from cp_dtensor.group import ContextParallelGroup, init_context_parallel_group
from cp_dtensor.hybrid import hybrid_attention
from cp_dtensor.layout import LAYOUTS, shard_positions, shard_runs
from cp_dtensor.memory import estimate_context_parallel_memory_savings
from cp_dtensor.ring import ring_attention
from cp_dtensor.strategies import STRATEGIES, context_parallel_attention, get_strategy
from cp_dtensor.ulysses import ulysses_attention

__all__ = [
    "LAYOUTS",
    "STRATEGIES",
    "CommCounter",
    "CommVolume",
    "ContextParallelGroup",
    "RingAttentionCommunicator",
    "allgather_kv_attention",
    "comm_bytes",
    "context_parallel_attention",
    "count_comm",
    "estimate_context_parallel_memory_savings",
    "get_strategy",
    "hybrid_attention",
    "init_context_parallel_group",
    "ring_attention",
    "shard_positions",
    "shard_runs",
    "ulysses_attention",
]
