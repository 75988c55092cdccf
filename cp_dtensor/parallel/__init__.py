"""Context parallelism composed with the other parallelisms: data parallel, tensor parallel, checkpoints.

- :mod:`~cp_dtensor.parallel.grad_sync`: gradients summed over every replica of the ``dp x cp`` mesh (DDP).
- :mod:`~cp_dtensor.parallel.fsdp`: parameters, gradients and optimizer states sharded over ``dp x cp`` (FSDP2).
- :mod:`~cp_dtensor.parallel.tensor_parallel`: heads split over a ``"tp"`` axis inside the cp ring.
- :mod:`~cp_dtensor.parallel.checkpoint`: DCP checkpoints of a model on any of these meshes.

Their public names are also exported from :mod:`cp_dtensor`. This package imports none of its modules
itself: :mod:`cp_dtensor.nn.loss` needs ``grad_sync``, while ``tensor_parallel`` needs the model, which
needs the loss.

Context parallelism as a ``ParallelStyle``, one entry of a ``parallelize_module`` plan beside the
tensor-parallel styles, is :class:`cp_dtensor.ContextParallel`, in
:mod:`cp_dtensor.integrations.parallel_style`: it routes attention through the SDPA mode and
transformers' attention function, which live in that layer.
"""

__all__ = ["checkpoint", "fsdp", "grad_sync", "tensor_parallel"]
