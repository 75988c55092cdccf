"""Checks of plain user arguments that every layer shares (``ValueError`` naming the value)."""

from __future__ import annotations

__all__ = ["check_int", "check_positive_int"]


def check_int(name: str, value: object) -> int:
    """``value`` if it is an int (not a bool).

    Raises:
        ValueError: ``value`` is not an int, naming ``name``.
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}.")
    return value


def check_positive_int(name: str, value: object) -> int:
    """``value`` if it is an int >= 1 (not a bool).

    Raises:
        ValueError: ``value`` is not a positive int, naming ``name``.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return value
