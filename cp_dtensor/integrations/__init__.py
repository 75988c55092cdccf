"""Context parallelism in models you did not write.

* :mod:`cp_dtensor.integrations.transformers`: Hugging Face models, through transformers'
  ``AttentionInterface`` (``attn_implementation="cp_ring"`` and friends). Needs the ``[hf]`` extra;
  transformers is imported only when :func:`~cp_dtensor.integrations.transformers.register` runs.
* :mod:`cp_dtensor.integrations.sdpa`: any model that calls ``F.scaled_dot_product_attention``.
* :mod:`cp_dtensor.integrations.parallel_style`: either kind, or a
  :class:`~cp_dtensor.ContextParallelAttention`, made context-parallel by one entry of a
  ``parallelize_module`` plan (:class:`ContextParallel`), beside tensor-parallel styles.
* :mod:`cp_dtensor.integrations.batch`: the batch cut per rank and the exact global loss, for both.
"""

from cp_dtensor.integrations.batch import (
    ShardedBatch,
    causal_lm_loss,
    chunked_causal_lm_loss,
    document_ids_from_position_ids,
    shard_batch,
)
from cp_dtensor.integrations.parallel_style import ContextParallel
from cp_dtensor.integrations.sdpa import context_parallel_sdpa

__all__ = [
    "ContextParallel",
    "ShardedBatch",
    "causal_lm_loss",
    "chunked_causal_lm_loss",
    "context_parallel_sdpa",
    "document_ids_from_position_ids",
    "shard_batch",
]
