"""Does a ring step's compute hide its communication on this machine? Measure both.

Two CPU processes (gloo) play two neighbours of a ring. For growing block
sizes c (tokens per rank), each rank times, as the median of 7 rounds:

* compute: the attention of its c queries to one block of c keys (the CPU
  flash kernel behind ``scaled_dot_product_attention``), 4 c^2 H D FLOPs;
* send: passing a K/V block (2 c H_kv D elements) to the next rank while
  receiving the previous rank's, as the ring does;
* both: the send posted first, the compute run while it is in flight, then
  the wait, which is what a ring step costs. ``both / max`` is 1.00 when the
  send is perfectly hidden and 2.00 when nothing overlaps (equal parts run
  one after the other). It can exceed 2: on a CPU the send's copies and the
  attention compete for the same cores, so each runs slower together than
  alone (on a machine busy with other jobs, ratios near 3 for small blocks).

From the largest block it derives the machine's F (FLOP/s) and B (bytes/s)
and the Ring Attention condition c >= F * H_kv * bytes / (2 * H * B).
Run it (CPU, gloo; 2 processes):

    torchrun --standalone --nproc_per_node=2 docs/examples/overlap_cpu.py
"""

import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

H, H_KV, D = 8, 8, 64  # query heads, K/V heads, head dim
DTYPE = torch.float32
BLOCKS = (16, 64, 256, 1024, 2048)  # c, tokens per rank
REPEATS = 7


def exchange(kv: torch.Tensor) -> list[dist.Work]:
    """Post the ring's send to rank + 1 and receive from rank - 1 (lone calls: gloo)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    received = torch.empty_like(kv)
    return [
        dist.irecv(received, (rank - 1) % world),
        dist.isend(kv, (rank + 1) % world),
    ]


def timed(*fns) -> list[float]:
    """Median seconds of each of ``fns`` over REPEATS rounds, ranks started together.

    The functions take turns within a round, so that a load on the machine that
    comes and goes weighs on all of them alike.
    """
    times = [[] for _ in fns]
    for _ in range(REPEATS):
        for fn, samples in zip(fns, times):
            dist.barrier()
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def measure(c: int) -> tuple[float, float, float]:
    """(compute, send, both) seconds for one ring step with blocks of c tokens."""
    q = torch.randn(1, H, c, D, dtype=DTYPE)
    k, v = (torch.randn(1, H_KV, c, D, dtype=DTYPE) for _ in range(2))
    kv = torch.stack([k, v])  # (2, 1, H_kv, c, D): what travels

    def compute():
        F.scaled_dot_product_attention(q, k, v, enable_gqa=H != H_KV)

    def send():
        for work in exchange(kv):
            work.wait()

    def both():
        works = exchange(kv)  # in flight ...
        compute()  # ... while this runs
        for work in works:
            work.wait()

    compute()  # warm up the kernel and the connection
    send()
    return tuple(timed(compute, send, both))


def main() -> None:
    dist.init_process_group("gloo")
    rows = [(c, *measure(c)) for c in BLOCKS]
    if dist.get_rank() == 0:
        elem = torch.finfo(DTYPE).bits // 8
        print("    c  compute ms  send ms  both ms  both / max")
        for c, t_compute, t_send, t_both in rows:
            print(
                f"{c:5d}  {1e3 * t_compute:10.3f}  {1e3 * t_send:7.3f}  "
                f"{1e3 * t_both:7.3f}  {t_both / max(t_compute, t_send):9.2f}"
            )
        c, t_compute, t_send, _ = rows[-1]
        flops = 4 * c * c * H * D / t_compute
        bandwidth = 2 * c * H_KV * D * elem / t_send
        print(f"F = {flops / 1e9:.1f} GFLOP/s per rank, B = {bandwidth / 1e9:.2f} GB/s")
        threshold = flops * H_KV * elem / (2 * H * bandwidth)
        print(f"c >= F * H_kv * bytes / (2 H B) = {threshold:.0f}")
    dist.barrier()  # every rank done before gloo tears down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
