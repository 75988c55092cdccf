"""cp_dtensor: context parallelism for PyTorch.

Shard a long sequence across the ranks of a ``DeviceMesh`` axis and compute exact attention over the
whole sequence with ring attention (or the other strategies), forward and backward.
"""

from cp_dtensor.allgather import allgather_kv_attention
from cp_dtensor.chunked_loss import chunked_cross_entropy_across_shards, chunked_linear_cross_entropy
from cp_dtensor.comm import CommCounter, RingAttentionCommunicator, count_comm
from cp_dtensor.comm_model import CommVolume, comm_bytes
from cp_dtensor.group import ContextParallelGroup, init_context_parallel_group
from cp_dtensor.hybrid import hybrid_attention
from cp_dtensor.layout import LAYOUTS, DocumentZigzag, shard_positions, shard_runs
from cp_dtensor.loss import ShardedLoss, cross_entropy_across_shards, shift_labels
from cp_dtensor.masks import MaskSpec, document_ids_from_cu_seqlens
from cp_dtensor.memory import estimate_context_parallel_memory_savings
from cp_dtensor.module import ContextParallelAttention
from cp_dtensor.parallel.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from cp_dtensor.parallel.fsdp import apply_fsdp
from cp_dtensor.parallel.grad_sync import apply_ddp
from cp_dtensor.parallel.tensor_parallel import parallelize_for_tp
from cp_dtensor.ring import ring_attention
from cp_dtensor.strategies import STRATEGIES, context_parallel_attention, get_strategy
from cp_dtensor.training.data import LongSequenceDataset
from cp_dtensor.training.model import ModelConfig, TransformerWithCP, apply_activation_checkpointing
from cp_dtensor.ulysses import ulysses_attention

__all__ = [
    "LAYOUTS",
    "STRATEGIES",
    "CommCounter",
    "CommVolume",
    "DocumentZigzag",
    "ContextParallelAttention",
    "ContextParallelGroup",
    "LongSequenceDataset",
    "MaskSpec",
    "ModelConfig",
    "RingAttentionCommunicator",
    "ShardedLoss",
    "TransformerWithCP",
    "allgather_kv_attention",
    "apply_activation_checkpointing",
    "apply_ddp",
    "apply_fsdp",
    "chunked_cross_entropy_across_shards",
    "chunked_linear_cross_entropy",
    "comm_bytes",
    "context_parallel_attention",
    "count_comm",
    "cross_entropy_across_shards",
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
