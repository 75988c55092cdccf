"""The rank pool itself: it reports the rank that failed first, with its traceback, and catches leaked state."""

from __future__ import annotations

import time

import mp_pool
import pytest
import torch
import torch.distributed as dist


def rank_1_raises_while_rank_0_waits_on_it() -> None:
    """Rank 1 raises before sending; rank 0 blocks on its receive (until the group's timeout)."""
    if dist.get_rank() == 1:
        raise ValueError("the real failure, on rank 1")
    buf = torch.zeros(1)
    dist.recv(buf, src=1)


def test_the_first_failure_is_reported_with_its_traceback_not_the_waiting_ranks_timeout():
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        mp_pool.run_on_ranks(2, rank_1_raises_while_rank_0_waits_on_it, timeout=mp_pool.GROUP_TIMEOUT_S * 2)
    message = str(info.value)
    assert message.startswith("rank_1_raises_while_rank_0_waits_on_it: rank 1 failed first"), message
    assert "ValueError: the real failure, on rank 1" in message and "Traceback" in message
    assert "no answer from ranks [0]" in message
    # Reported after the grace period, not after rank 0's group timeout.
    assert time.monotonic() - start < mp_pool.GROUP_TIMEOUT_S / 2


def leaks_the_default_tile() -> None:
    import cp_dtensor.positions.masks

    cp_dtensor.positions.masks.DEFAULT_TILE = 3


def restores_the_default_tile() -> int:
    from helpers import default_tile

    import cp_dtensor.positions.masks

    with default_tile(3):
        inside = cp_dtensor.positions.masks.DEFAULT_TILE
    return inside


def test_a_task_that_leaks_module_state_fails():
    import cp_dtensor.positions.masks

    assert mp_pool.run_on_ranks(1, restores_the_default_tile) == [3]
    with pytest.raises(
        RuntimeError, match=r"changed global state.*cp_dtensor\.positions\.masks\.DEFAULT_TILE.*\(256, 3\)"
    ):
        mp_pool.run_on_ranks(1, leaks_the_default_tile)
    assert cp_dtensor.positions.masks.DEFAULT_TILE == 256  # (this process was never touched)


def group_timeouts() -> list[float]:
    """The timeout of every process group this worker's cached groups use (hybrid: flattened meshes too)."""
    group = mp_pool.group(2, ulysses_size=2)
    plain = mp_pool.group(2)
    meshes = [plain.cp_mesh, plain.dp_mesh, group.cp_mesh, group.ring_mesh, group.ulysses_mesh, group.dp_mesh]
    return [_timeout_s(m.get_group()) for m in meshes]


def _timeout_s(pg) -> float:
    return pg._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def test_every_group_of_a_worker_has_the_short_timeout():
    for timeouts in mp_pool.run_on_ranks(2, group_timeouts):
        assert timeouts == [mp_pool.GROUP_TIMEOUT_S] * len(timeouts), timeouts
