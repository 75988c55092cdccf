"""The NCCL point-to-point checker (tests/nccl_rules.py) has teeth, and every strategy passes it.

Each task runs on real gloo ranks of the pool and builds its groups with the ``"nccl_rules"``
backend, so the production code takes the path it takes on NCCL (one ``batch_isend_irecv`` per
rotation) and runs under NCCL's ordering rules. To stay cheap in CI, a test runs one task per world
size (all its cases inside), the groups that pass are the cached ones of ``mp_pool.group``, and the
two expected deadlocks are caught inside one task, so no pool is torn down and restarted.
"""

from __future__ import annotations

import datetime
import os

import mp_pool
import nccl_rules
import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from cp_dtensor import RingAttentionCommunicator, context_parallel_attention, shift_labels
from cp_dtensor.comm.p2p import batches_p2p
from cp_dtensor.positions.layout import shard_positions

DEADLOCK_TIMEOUT_S = 2.0  # a deadlock is reported after this (peers publish their ops after 0.5 s)


def _rules_group(cp_size: int, **extra):
    """The pool's cached ``ContextParallelGroup`` on the rules backend.

    Its groups report a deadlock after 60 s, not the default 10: these cases pass, and a loaded CI
    machine must not turn a slow rank into a false report.
    """
    nccl_rules.install()
    os.environ.setdefault("NCCL_RULES_TIMEOUT_S", "60")  # read when a group is built
    return mp_pool.group(cp_size, backend=nccl_rules.BACKEND, timeout=60, **extra)


def _rotate(group: dist.ProcessGroup | None, batched: bool, rounds: int = 3) -> float:
    """Rotate two tensors around the ring ``rounds`` times; check and return what arrived last."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    comm = RingAttentionCommunicator(group, batched=batched)
    kv = [torch.full((4,), float(rank)), torch.full((2, 3), float(rank), dtype=torch.float64)]
    for _ in range(rounds):
        comm.ring_forward(kv)
        kv = comm.wait()
    assert kv[0][0].item() == kv[1][0, 0].item() == (rank - rounds) % size
    return kv[0][0].item()


# ---- the checker's teeth: two deadlocks of two ranks --------------------------------------------


def _send_first(group: dist.ProcessGroup) -> None:
    """Both ranks send, then receive (NVIDIA/nccl#2057): a deadlock once sends block like large NCCL ones."""
    peer = dist.get_global_rank(group, 1 - dist.get_rank(group))
    works = [dist.isend(torch.ones(8), peer, group=group), dist.irecv(torch.empty(8), peer, group=group)]
    for w in works:
        w.wait()


def deadlocks_task() -> dict[str, str]:
    """Each deadlock on a fresh group (it leaves its group stuck): the error each raised, or "no deadlock"."""
    nccl_rules.install()
    reports = {}
    for name, scenario in (("ungrouped", lambda g: _rotate(g, batched=False)), ("send_first", _send_first)):
        # gloo's own timeout ends the stuck gloo ops in the background, so none is left at shutdown
        group = dist.new_group(backend=nccl_rules.BACKEND, timeout=datetime.timedelta(seconds=5))
        group.rules_timeout_s = DEADLOCK_TIMEOUT_S
        try:
            scenario(group)
            reports[name] = "no deadlock"
        except RuntimeError as error:
            reports[name] = str(error)
    return reports


def test_two_ranks_deadlock_is_reported_with_the_ops_each_rank_is_stuck_on():
    reports = mp_pool.run_on_ranks(2, deadlocks_task, timeout=60)
    for report in reports:
        # The ungrouped rotation (irecv then isend, per tensor: the gloo path) at P = 2 on NCCL: each
        # receive waits for a send queued behind the peer's own receive.
        ungrouped = report["ungrouped"]
        assert "NCCL point-to-point rules: deadlock" in ungrouped
        assert "rank 0: recv #1 from rank 1" in ungrouped and "rank 1: recv #1 from rank 0" in ungrouped
        assert "send #1 to rank 1 (4 torch.float32, lone): queued behind earlier ops of its pair" in ungrouped
        # Both send first: each send waits for a receive queued behind the peer's send.
        assert "rank 1: send #1 to rank 0 (8 torch.float32, lone): running" in report["send_first"]


# ---- the rotation passes where NCCL lets it ------------------------------------------------------


def rotation_task(world_size: int) -> dict:
    """Grouped rotation on the rules backend (and ungrouped where prev and next differ), both paths on gloo."""
    rules = _rules_group(world_size).process_group
    world = None if world_size == 1 else dist.group.WORLD
    cpu = torch.device("cpu")
    return {
        "grouped": _rotate(rules, batched=True),
        "ungrouped": _rotate(rules, batched=False) if world_size > 2 else None,
        "gloo": [_rotate(world, batched) for batched in (True, False)],
        # gloo: lone isend/irecv; anything else (nccl, and the checker, which answers as nccl does): grouped
        "path": {"gloo": batches_p2p(None, cpu), "nccl_rules": batches_p2p(rules, cpu)},
    }


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_rotation_passes_grouped_and_where_prev_and_next_differ(world_size):
    results = mp_pool.run_on_ranks(world_size, rotation_task, world_size)
    for rank, r in enumerate(results):
        arrived = float((rank - 3) % world_size)
        assert r["grouped"] == arrived and r["gloo"] == [arrived, arrived]
        assert r["ungrouped"] == (arrived if world_size > 2 else None)
        assert r["path"] == {"gloo": False, "nccl_rules": True}


# ---- collectives: gloo's, without the GIL deadlock of a Python process group ---------------------


def collectives_task(rounds: int) -> list[torch.Tensor]:
    """``rounds`` of c10d and functional collectives on fresh tensors; the last round's results.

    Before Note [Collectives of a Python process group] was handled, a few hundred rounds froze a
    rank (the GIL held while waiting for gloo's queue lock); each round also checks the values.
    """
    group = _rules_group(2).process_group
    rank = dist.get_rank(group)
    for i in range(rounds):
        x = torch.full((2,), float(rank + i))
        dist.broadcast(x, src=dist.get_global_rank(group, 1), group=group)
        summed = torch.full((2,), float(rank + i))
        dist.all_reduce(summed, group=group)
        gathered = torch.empty(4)
        dist.all_gather_into_tensor(gathered, torch.full((2,), float(rank)), group=group)
        functional = funcol.all_reduce(torch.full((2,), float(rank + i)), "sum", group).wait()
        functional_gather = funcol.all_gather_tensor(torch.full((2,), float(rank)), 0, group).wait()
        expected = [torch.full((2,), 1.0 + i), torch.full((2,), 1.0 + 2 * i), torch.tensor([0.0, 0, 1, 1])]
        got = [x, summed, gathered]
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), (i, got)
        assert torch.equal(functional, expected[1]) and torch.equal(functional_gather, expected[2]), i
    return got


def test_collectives_are_gloos_and_never_freeze():
    for result in mp_pool.run_on_ranks(2, collectives_task, 300, timeout=60):
        assert torch.equal(result[0], torch.full((2,), 300.0))


# ---- every strategy under the rules, exact against fp64 -----------------------------------------

CASES = [  # (strategy, ulysses_size, mask kwargs), each at world sizes 2, 3, 4
    ("ring", None, {"causal": True}),
    ("ring", None, {"causal": True, "window": (3, 0)}),  # the ring stops early, sends dK/dV home
    ("ring", None, {"document_ids": True}),
    ("ulysses", None, {"causal": True}),
    ("allgather", None, {"causal": True, "window": (5, 2)}),
    ("hybrid", 2, {"causal": True}),  # inner rings on the "ring" axis, all-to-all on "ulysses"
]


def _cases(world_size: int) -> list[tuple]:
    return [c for c in CASES if c[1] is None or world_size % c[1] == 0]  # hybrid: ulysses_size divides P


def _inputs(world_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    b, h, hkv, s, d = 1, 2 * world_size, world_size, 4 * world_size, 4  # heads split over Ulysses' P ranks
    shapes = {"q": (b, h, s, d), "k": (b, hkv, s, d), "v": (b, hkv, s, d), "dout": (b, h, s, d)}
    out = {n: torch.randn(shape, generator=gen, dtype=torch.float64) for n, shape in shapes.items()}
    out["document_ids"] = (torch.arange(s) * 3 // s).unsqueeze(0)  # three documents
    return out


def _dense(inputs: dict, kw: dict) -> dict[str, torch.Tensor]:
    """fp64 attention with an explicit (L, L) mask, and its autograd gradients."""
    q, k, v = (inputs[n].clone().requires_grad_() for n in "qkv")
    seq = q.shape[2]
    i, j = torch.arange(seq).unsqueeze(1), torch.arange(seq).unsqueeze(0)
    visible = torch.ones(seq, seq, dtype=torch.bool)
    if kw.get("causal"):
        visible &= j <= i
    if "window" in kw:
        left, right = kw["window"]
        visible &= (j >= i - left) & (j <= i + right)
    if kw.get("document_ids"):
        ids = inputs["document_ids"][0]
        visible &= ids.unsqueeze(1) == ids.unsqueeze(0)
    rep = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * q.shape[-1] ** -0.5
    out = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v.repeat_interleave(rep, 1)
    out.backward(inputs["dout"])
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def strategies_task(world_size: int, inputs: dict) -> list[dict]:
    """Runs on every rank: each case's attention forward and backward on a cp group of the rules backend."""
    results = []
    for strategy, ulysses_size, kw in _cases(world_size):
        extra = {} if ulysses_size is None else {"ulysses_size": ulysses_size}
        group = _rules_group(world_size, **extra)
        q, k, v = (group.partition_sequence(inputs[n], seq_dim=2).requires_grad_() for n in "qkv")
        kwargs = {**kw, "document_ids": inputs["document_ids"]} if kw.get("document_ids") else kw
        out = context_parallel_attention(q, k, v, group, strategy=strategy, **kwargs)
        out.backward(group.partition_sequence(inputs["dout"], seq_dim=2))
        results.append({"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad})
    return results


def _unshard(shards: list[torch.Tensor], world_size: int) -> torch.Tensor:
    seq = shards[0].shape[2] * world_size
    full = torch.empty(*shards[0].shape[:2], seq, shards[0].shape[3], dtype=shards[0].dtype)
    for rank, shard in enumerate(shards):
        full.index_copy_(2, shard_positions(seq, world_size, rank, "zigzag"), shard)
    return full


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_strategy_is_exact_under_the_rules(world_size):
    inputs = _inputs(world_size)
    ranks = mp_pool.run_on_ranks(world_size, strategies_task, world_size, inputs)
    for c, (strategy, _, kw) in enumerate(_cases(world_size)):
        expected = _dense(inputs, kw)
        for name in expected:  # fp64 everywhere: only the order of the sums differs from the oracle
            got = _unshard([r[c][name] for r in ranks], world_size)
            torch.testing.assert_close(got, expected[name], rtol=0, atol=1e-10, msg=f"{strategy} {kw}: {name}")


# ---- tensor parallelism and gradient sync under the rules ---------------------------------------

GLOBAL_BATCH, SEQ_LEN = 2, 8


def training_step_task(sizes: dict, batch: dict) -> dict:
    """One forward and backward of a small fp64 model on this rank's share of ``batch``.

    ``sizes`` all 1: the one-process oracle (gloo, bare model). Otherwise groups on the rules
    backend, the model parallelized over tp and its gradients synced over dp x cp (DDP, or hooks
    under tp).
    """
    from cp_dtensor import apply_ddp, parallelize_for_tp
    from cp_dtensor.training import ModelConfig, TransformerWithCP

    cp, dp, tp = sizes["cp"], sizes["dp"], sizes["tp"]
    extra = {"tp_size": tp} if tp > 1 else {}
    group = mp_pool.group(1) if cp * dp * tp == 1 else _rules_group(cp, dp_size=dp, **extra)
    torch.manual_seed(1)  # the same initial weights in every process
    config = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=2)
    model = parallelize_for_tp(TransformerWithCP(config, cp_group=group).double(), group)
    synced = apply_ddp(model, group) if cp * dp * tp > 1 else model
    dp_rank = group.dp_mesh.get_local_rank()
    rows = slice(dp_rank * GLOBAL_BATCH // dp, (dp_rank + 1) * GLOBAL_BATCH // dp)
    ids, labels = (group.partition_sequence(batch[k][rows], seq_dim=1) for k in ("input_ids", "labels"))
    with torch.no_grad():
        logits = group.gather_sequence(model(ids, return_logits=True), seq_dim=1)
    loss = synced(ids, labels)
    loss.backward()
    grads = {
        n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for n, p in model.named_parameters()
    }
    return {"logits": logits, "loss": loss.item(), "grads": grads}


@pytest.mark.parametrize(
    "sizes", [{"cp": 2, "dp": 2, "tp": 1}, {"cp": 2, "dp": 1, "tp": 2}], ids=["dp2-cp2-ddp", "cp2-tp2-dtensor"]
)
def test_training_step_under_the_rules_equals_one_process(sizes):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 32, (GLOBAL_BATCH, SEQ_LEN), generator=gen)
    batch = {"input_ids": ids, "labels": shift_labels(ids)}
    ranks = mp_pool.run_on_ranks(4, training_step_task, sizes, batch)
    (single,) = mp_pool.run_on_ranks(1, training_step_task, {"cp": 1, "dp": 1, "tp": 1}, batch)
    rows = GLOBAL_BATCH // sizes["dp"]
    for rank, r in enumerate(ranks):
        # fp64; cp splits attention and the loss into blocks, tp the matmuls into partial sums, dp x cp
        # sums the gradients: only the order of additions differs, ~1e-16 relative per sum.
        dp_rank = rank // (4 // sizes["dp"])
        expected = single["logits"][dp_rank * rows : (dp_rank + 1) * rows]
        torch.testing.assert_close(r["logits"], expected, rtol=0, atol=1e-12)
        assert r["loss"] == pytest.approx(single["loss"], rel=1e-12, abs=0)
        for name, grad in single["grads"].items():
            torch.testing.assert_close(r["grads"][name], grad, rtol=0, atol=1e-12, msg=name)
