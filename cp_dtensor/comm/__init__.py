"""Every byte that leaves a rank: point-to-point rotations, collectives and the counter they report to."""

__all__: list[str] = []
