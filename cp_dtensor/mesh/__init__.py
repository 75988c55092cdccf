"""The context-parallel group (a named DeviceMesh and its layout) and DTensors in and out of it."""

__all__: list[str] = []
