"""One rank of a ring fails; the others must fail with a clear error within the group's timeout.

    torchrun --standalone --nproc-per-node 2 tests/failing_rank.py --fail raise --timeout 5

``tests/test_robustness.py`` starts each rank as a plain ``python`` process with the environment
torchrun would give it (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, and
``TORCHELASTIC_USE_AGENT_STORE``: the test holds the rendezvous store, as torchrun's agent does):
torchrun stops every worker as soon as one fails, which would hide how the survivors fail on their own.

Failures injected on ``--failing-rank`` (cp rank 1 of the first replica by default):

* ``raise``: raises before its first send (the process then exits with the traceback);
* ``exit``: runs the forward, then ``os._exit(1)`` before the backward: dies mid-step, no cleanup;
* ``hang``: stays alive but never joins the ring (stuck elsewhere): only the timeout can help.

Every other rank runs ring attention forward and backward and prints ``completed`` if it can.
``--user-init`` creates the default process group first, without a timeout, as many training
scripts do; ``--dp-size 2`` puts the ring on a sub-group of the world.

The ranks meet at the rendezvous store before they make any group: ``--timeout`` is for the step
(how long a survivor waits for a peer that failed), but gloo also gives a group's ranks that long to
connect, and ranks that start at once on a busy machine (ten of them importing torch on 2 cores in
the test) can reach that point further apart than 5 s. Lined up first, they connect within
milliseconds of each other, and only the injected failure can make a timeout fire.
"""

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist

from cp_dtensor import init_context_parallel_group, ring_attention


def line_up(world_size: int) -> None:
    """Wait at the rendezvous store until every rank of the world has started (no time limit of its own)."""
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=datetime.timedelta(hours=1)
    )
    if store.add("failing_rank/started", 1) == world_size:
        store.set("failing_rank/all_started", "1")
    store.wait(["failing_rank/all_started"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail", choices=["raise", "exit", "hang"], required=True)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--dp-size", type=int, default=1)
    parser.add_argument("--failing-rank", type=int, default=1)
    parser.add_argument("--user-init", action="store_true")
    args = parser.parse_args()
    line_up(int(os.environ["WORLD_SIZE"]))
    if args.user_init:
        dist.init_process_group("gloo")  # the c10d default timeout (30 min)
    world_size = int(os.environ["WORLD_SIZE"])
    group = init_context_parallel_group(
        world_size // args.dp_size, dp_size=args.dp_size, device_type="cpu", timeout=args.timeout
    )
    rank = dist.get_rank()
    print(f"rank {rank}: cp rank {group.rank} of {group.size}, timeout {args.timeout} s", flush=True)
    q_BHSD = torch.randn(1, 2, 8, 16, requires_grad=True)  # local shard
    if rank == args.failing_rank and args.fail == "raise":
        raise RuntimeError(f"injected failure on rank {rank} before its first send")
    if rank == args.failing_rank and args.fail == "hang":
        time.sleep(600)  # the test kills this process once the others have exited
    out = ring_attention(q_BHSD, q_BHSD, q_BHSD, group, causal=True)
    if rank == args.failing_rank and args.fail == "exit":
        os._exit(1)
    out.sum().backward()
    print(f"rank {rank}: completed", flush=True)


if __name__ == "__main__":
    main()
