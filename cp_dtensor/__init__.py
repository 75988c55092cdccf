"""cp_dtensor: context parallelism for PyTorch.

Shard a long sequence across the ranks of a ``DeviceMesh`` axis and compute exact attention over the
whole sequence with ring attention (or the other strategies), forward and backward.

The face of the library: the strategies, the group, the module and losses, data and gradient
parallelism, the ``ContextParallel`` style for ``parallelize_module`` plans, checkpoints and the
estimators. The demo model and job live in
:mod:`cp_dtensor.training` (not imported here); the layers of the package are described in
``ARCHITECTURE.md``.
"""

# First: an ImportError naming the torch version needed, before any module can fail on an old torch.
from cp_dtensor import _torch_version  # noqa: F401

# isort: split
from cp_dtensor.attention.api import (
    STRATEGIES,
    allgather_kv_attention,
    context_parallel_attention,
    dispatch_attention,
    get_strategy,
    hybrid_attention,
    ring_attention,
    ulysses_attention,
)
from cp_dtensor.comm.counter import CommCounter, count_comm
from cp_dtensor.comm.p2p import RingAttentionCommunicator
from cp_dtensor.estimate.comm_model import CommVolume, comm_bytes
from cp_dtensor.estimate.memory import estimate_context_parallel_memory_savings
from cp_dtensor.estimate.planner import auto_strategy  # also registers strategy="auto"
from cp_dtensor.integrations.parallel_style import ContextParallel
from cp_dtensor.mesh.group import ContextParallelGroup, init_context_parallel_group
from cp_dtensor.nn.chunked_loss import chunked_cross_entropy_across_shards, chunked_linear_cross_entropy
from cp_dtensor.nn.loss import ShardedLoss, cross_entropy_across_shards, shift_labels
from cp_dtensor.nn.module import ContextParallelAttention
from cp_dtensor.parallel.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from cp_dtensor.parallel.fsdp import apply_fsdp
from cp_dtensor.parallel.grad_sync import apply_ddp
from cp_dtensor.parallel.tensor_parallel import parallelize_for_tp
from cp_dtensor.positions.layout import LAYOUTS, DocumentZigzag, shard_positions, shard_runs
from cp_dtensor.positions.masks import MaskSpec, document_ids_from_cu_seqlens

__all__ = [
    "LAYOUTS",
    "STRATEGIES",
    "CommCounter",
    "CommVolume",
    "ContextParallel",
    "ContextParallelAttention",
    "ContextParallelGroup",
    "DocumentZigzag",
    "MaskSpec",
    "RingAttentionCommunicator",
    "ShardedLoss",
    "allgather_kv_attention",
    "apply_ddp",
    "apply_fsdp",
    "auto_strategy",
    "chunked_cross_entropy_across_shards",
    "chunked_linear_cross_entropy",
    "comm_bytes",
    "context_parallel_attention",
    "count_comm",
    "cross_entropy_across_shards",
    "dispatch_attention",
    "document_ids_from_cu_seqlens",
    "estimate_context_parallel_memory_savings",
    "get_strategy",
    "hybrid_attention",
    "init_context_parallel_group",
    "latest_checkpoint",
    "load_checkpoint",
    "parallelize_for_tp",
    "ring_attention",
    "save_checkpoint",
    "shard_positions",
    "shard_runs",
    "shift_labels",
    "ulysses_attention",
]
