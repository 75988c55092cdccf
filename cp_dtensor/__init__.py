"""cp_dtensor: context parallelism for PyTorch.

Shard a long sequence across the ranks of a ``DeviceMesh`` axis and compute exact attention over the
whole sequence with ring attention (or the other strategies), forward and backward.
"""

from cp_dtensor.comm import CommCounter, RingAttentionCommunicator, count_comm
from cp_dtensor.group import ContextParallelGroup, init_context_parallel_group
from cp_dtensor.layout import LAYOUTS, shard_positions, shard_runs
from cp_dtensor.ring import ring_attention
from cp_dtensor.strategies import STRATEGIES, context_parallel_attention, get_strategy

__all__ = [
    "LAYOUTS",
    "STRATEGIES",
    "CommCounter",
    "ContextParallelGroup",
    "RingAttentionCommunicator",
    "context_parallel_attention",
    "count_comm",
    "get_strategy",
    "init_context_parallel_group",
    "ring_attention",
    "shard_positions",
    "shard_runs",
]
