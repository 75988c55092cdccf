"""How much memory a 1M-token sequence needs, with and without 8-way context
parallelism.

Run it (one process, no ranks needed: the estimator is arithmetic):

    python docs/examples/memory_estimate.py

Sizes are GiB (2**30 bytes), the estimator's unit. The Memory page explains what the
numbers count and compares the estimator with measured peaks.
"""

from cp_dtensor import estimate_context_parallel_memory_savings

savings = estimate_context_parallel_memory_savings(
    seq_len=1_000_000, hidden_size=4096, num_layers=32, batch_size=1, cp_size=8
)

print(f"Without CP: {savings['without_cp_gb']:.1f} GiB")
print(f"With CP:    {savings['with_cp_gb']:.1f} GiB")
print(f"Savings:    {savings['savings_gb']:.1f} GiB")
print(f"Reduction:  {savings['reduction_factor']:.1f}x")
print(f"Max seq len (theoretical): {savings['max_seq_len_with_cp']:,} tokens")
