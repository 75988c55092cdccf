"""The demo: a small Llama-style decoder, a long-context recall task and the job that trains it.

One command runs the job on one process or under torchrun (``dp x cp x tp`` ranks)::

    python -m cp_dtensor.training
    torchrun --standalone --nproc-per-node 4 -m cp_dtensor.training

- :mod:`~cp_dtensor.training.model`: ``TransformerWithCP``, whose attention is context parallel.
- :mod:`~cp_dtensor.training.data`: ``LongSequenceDataset``, key-value recall across the whole sequence.
- :mod:`~cp_dtensor.training.train`: the job (flags in ``TrainConfig``, entry point ``main``).
"""

from cp_dtensor.training.data import LongSequenceDataset
from cp_dtensor.training.model import ModelConfig, TransformerWithCP, apply_activation_checkpointing

__all__ = ["LongSequenceDataset", "ModelConfig", "TransformerWithCP", "apply_activation_checkpointing"]
