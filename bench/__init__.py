"""Benchmarks of cp_dtensor: measurements, not tests. Nothing here asserts a time.

Every figure is a ratio of two things measured in the same run, on the same inputs, in the same
processes, alternating A B A B, with min / median / max over repeats and the machine described.
Each script is launched with ``torchrun`` and writes one JSON file under ``bench/results/``;
``python -m bench.report`` turns those files into the tables and plots of ``docs/performance.md``.
``bench/run_all.sh`` does both: one command regenerates every number of the page. The targets the
ratios are compared with, and the full provenance of every result file, are in ``bench/README.md``
(the maintainers' appendix; the report regenerates its tables too).

=====================  ==========================================================================
``bench.cost``         CPU cost of CP: sum of every rank's CPU seconds / one process's fused SDPA
``bench.balance``      load balance: max / mean of per-rank kernel time, zigzag vs contiguous
``bench.peers``        ours vs PyTorch's built-in CP (via ``bench.torch_cp_adapter``) and yunchang
``bench.scaling``      sequence-length scaling at P = 4 and per-rank peak memory
``bench.profile_ring`` where the ring's time goes (``torch.profiler`` labels of ``cp_dtensor.attention.ring``)
``bench.gpu_blocks``   one GPU: every virtual rank's block kernels + merges vs one flash call
``bench.report``       JSON results -> tables in ``docs/performance.md`` and ``perf_*.png`` plots
=====================  ==========================================================================
"""

__all__: list[str] = []
