"""Ring attention on two real gloo ranks, forward and backward, against attention on one process.

What ``tests/test_package.py`` runs with the python of a fresh environment that holds the built
wheel and nothing of this repository, from an empty directory; so it imports only what ``pip
install`` installed. By hand, with ``cp_dtensor`` installed::

    python tests/smoke_installed.py
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cp_dtensor import init_context_parallel_group, ring_attention
from cp_dtensor.reference import full_attention

WORLD_SIZE = 2
B, H, L, D = 1, 2, 64, 16  # batch, heads, tokens in the WHOLE sequence, head dim
TIMEOUT_S = 90  # the whole run; a rank stuck in a transfer raises after the same time


def check_rank(rank: int, store_path: str) -> None:
    """One rank: its zigzag shard through ring attention and back; rank 0 compares with one process."""
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    store = dist.FileStore(store_path, WORLD_SIZE)  # a file, not a port: nothing to race for
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD_SIZE, timeout=timeout)
    cp_group = init_context_parallel_group(cp_size=WORLD_SIZE, device_type="cpu", timeout=timeout)
    torch.manual_seed(0)  # the same global tensors on every rank
    q, k, v, dout = (torch.randn(B, H, L, D, dtype=torch.float64) for _ in range(4))
    q_l, k_l, v_l = (cp_group.partition_sequence(x, seq_dim=2).requires_grad_() for x in (q, k, v))
    out_l = ring_attention(q_l, k_l, v_l, cp_group, causal=True)
    out_l.backward(cp_group.partition_sequence(dout, seq_dim=2))
    got = [cp_group.gather_sequence(x.detach(), seq_dim=2) for x in (out_l, q_l.grad, k_l.grad, v_l.grad)]
    if rank == 0:
        q_r, k_r, v_r = (x.clone().requires_grad_() for x in (q, k, v))
        out_r = full_attention(q_r, k_r, v_r, causal=True)
        out_r.backward(dout)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, (out_r, q_r.grad, k_r.grad, v_r.grad)):
            err = (a - b.detach()).abs().max().item()
            assert err < 1e-10, f"{name}: max |ring - one process| = {err:.1e}"  # fp64: only the order of sums differs
    dist.barrier()  # every rank done sending before gloo tears down
    dist.destroy_process_group()


def main() -> None:
    """Spawn the ranks and wait for them, at most ``TIMEOUT_S`` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        ranks = mp.spawn(check_rank, args=(os.path.join(tmp, "store"),), nprocs=WORLD_SIZE, join=False)
        deadline = time.monotonic() + TIMEOUT_S
        while not ranks.join(timeout=1.0):  # raises, with the rank's traceback, if a rank failed
            if time.monotonic() > deadline:
                for process in ranks.processes:
                    process.kill()
                sys.exit(f"ring attention on {WORLD_SIZE} ranks did not finish in {TIMEOUT_S} s")
    print(f"ring attention on {WORLD_SIZE} ranks, forward and backward, matches one process")


if __name__ == "__main__":
    main()
