"""One rank, one K/V block: the attention kernels, the log-sum-exp merge and the block loop. No communication."""

__all__: list[str] = []
