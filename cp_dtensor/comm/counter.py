"""A counter of every byte that leaves a rank: each communication helper reports here.

Every send of the package (ring rotations, collectives, mask gathers, validation, re-layouts) calls
:func:`record_comm` with its operation's name and byte count; :func:`count_comm` collects them.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

__all__ = ["CommCounter", "count_comm", "record_comm"]


class CommCounter:
    """Bytes and calls sent by this rank, by operation name (``"ring_send"``, ``"all_to_all"``...).

    One call is one rotation or one collective, whatever the number of tensors it moves.

    Use through :func:`count_comm`; every communication helper of the package reports to the active
    counters with :func:`record_comm`.
    """

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    @property
    def total_bytes(self) -> int:
        """All bytes sent, over every operation."""
        return sum(self.bytes.values())

    def __repr__(self) -> str:
        return f"CommCounter(bytes={dict(self.bytes)}, calls={dict(self.calls)})"


_ACTIVE: list[CommCounter] = []


@contextlib.contextmanager
def count_comm() -> Iterator[CommCounter]:
    """Count what this rank sends inside the ``with`` block.

    Examples:
        >>> with count_comm() as counter:  # doctest: +SKIP
        ...     out = ring_attention(q, k, v, cp_group)
        >>> counter.calls["ring_send"]  # P - 1 K/V blocks in the forward  # doctest: +SKIP
    """
    counter = CommCounter()
    _ACTIVE.append(counter)
    try:
        yield counter
    finally:
        _ACTIVE.remove(counter)


def record_comm(op: str, num_bytes: int) -> None:
    """Report one message of ``num_bytes`` bytes sent by ``op`` to every active counter."""
    for counter in _ACTIVE:
        counter.bytes[op] += num_bytes
        counter.calls[op] += 1
