"""Modules and losses for models: the context-parallel attention module, RoPE at global positions, the loss."""

__all__: list[str] = []
