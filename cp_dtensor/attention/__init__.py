"""Attention across the cp axis: the call and its checks, the strategies, the executor (eager or compiled)."""

__all__: list[str] = []
