"""The NCCL point-to-point checker (tests/nccl_rules.py) has teeth, and every strategy passes it.

Each task runs on real gloo ranks of the pool and builds its groups with the ``"nccl_rules"``
backend, so the production code takes the path it takes on NCCL (one ``batch_isend_irecv`` per
rotation) and runs under NCCL's ordering rules.
"""

from __future__ import annotations

import mp_pool
import nccl_rules
import pytest
import torch
import torch.distributed as dist

from cp_dtensor import RingAttentionCommunicator, context_parallel_attention
from cp_dtensor.comm import batches_p2p
from cp_dtensor.layout import shard_positions

RULES_TIMEOUT_S = 3.0  # a deadlock is reported after this; a live rotation of 16 floats takes ms


def _rules_world() -> dist.ProcessGroup:
    """A fresh ``nccl_rules`` group over the pool's world (fresh: a deadlock leaves its group stuck)."""
    nccl_rules.install()
    group = dist.new_group(backend=nccl_rules.BACKEND)
    group.rules_timeout_s = RULES_TIMEOUT_S
    return group


def rotation_task(batched: bool, rounds: int = 3) -> list[float]:
    """Rotate two tensors around the ring ``rounds`` times; return what arrived at the last round."""
    group = _rules_world()
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    comm = RingAttentionCommunicator(group, batched=batched)
    kv = [torch.full((4,), float(rank)), torch.full((2, 3), float(rank), dtype=torch.float64)]
    for _ in range(rounds):
        comm.ring_forward(kv)
        kv = comm.wait()
    assert kv[0][0].item() == kv[1][0, 0].item() == (rank - rounds) % size
    return [kv[0][0].item()]


def test_ungrouped_rotation_of_two_ranks_is_reported_as_a_deadlock():
    # Today's gloo path (irecv then isend, per tensor) on NCCL at P = 2: each receive waits for a
    # send queued behind the peer's own receive.
    with pytest.raises(RuntimeError) as failure:
        mp_pool.run_on_ranks(2, rotation_task, False, timeout=60)
    message = str(failure.value)
    assert "NCCL point-to-point rules: deadlock" in message
    assert "rank 0: recv #1 from rank 1" in message and "rank 1: recv #1 from rank 0" in message
    assert "send #1 to rank 1 (4 torch.float32, lone): queued behind earlier ops of its pair" in message


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_grouped_rotation_passes(world_size):
    assert mp_pool.run_on_ranks(world_size, rotation_task, True) == [
        [float((r - 3) % world_size)] for r in range(world_size)
    ]


@pytest.mark.parametrize("world_size", [3, 4])
def test_ungrouped_rotation_passes_when_prev_and_next_differ(world_size):
    mp_pool.run_on_ranks(world_size, rotation_task, False)


def send_first_task() -> None:
    """Both ranks send, then receive (NVIDIA/nccl#2057): a deadlock once sends block like large NCCL ones."""
    group = _rules_world()
    peer = 1 - dist.get_rank(group)
    x, y = torch.ones(8), torch.empty(8)
    works = [
        dist.isend(x, dist.get_global_rank(group, peer), group=group),
        dist.irecv(y, dist.get_global_rank(group, peer), group=group),
    ]
    for w in works:
        w.wait()


def test_send_before_receive_on_both_ranks_is_a_deadlock():
    with pytest.raises(RuntimeError, match=r"rank 1: send #1 to rank 0 \(8 torch.float32, lone\): running"):
        mp_pool.run_on_ranks(2, send_first_task, timeout=60)


def path_task() -> dict:
    nccl_rules.install()
    rules = dist.new_group(backend=nccl_rules.BACKEND)
    cpu = torch.device("cpu")
    return {"gloo": batches_p2p(None, cpu), "nccl_rules": batches_p2p(rules, cpu)}


def test_which_path_each_backend_takes():
    # gloo: lone isend/irecv; anything else (nccl, and the checker, which answers as nccl does): grouped
    assert mp_pool.run_on_ranks(2, path_task) == [{"gloo": False, "nccl_rules": True}] * 2


# ---- every strategy under the rules, exact against fp64 -----------------------------------------

CASES = [  # (strategy, ulysses_size, mask kwargs); world sizes 2, 3, 4 below
    ("ring", None, {"causal": True}),
    ("ring", None, {"causal": True, "window": (3, 0)}),  # the ring stops early, sends dK/dV home
    ("ring", None, {"document_ids": True}),
    ("ulysses", None, {"causal": True}),
    ("allgather", None, {"causal": True, "window": (5, 2)}),
    ("hybrid", 2, {"causal": True}),  # inner rings on the "ring" axis, all-to-all on "ulysses"
]


def _inputs(world_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    b, h, hkv, s, d = 1, 4 * world_size // 2 if world_size != 3 else 6, 2, 4 * world_size, 4
    if world_size == 3:
        hkv = 3
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


def strategy_task(world_size: int, strategy: str, ulysses_size: int | None, kw: dict, inputs: dict) -> dict:
    """Runs on every rank: a cp group built on the rules backend, attention forward and backward."""
    nccl_rules.install()
    extra = {} if ulysses_size is None else {"ulysses_size": ulysses_size}
    group = mp_pool.group(world_size, backend=nccl_rules.BACKEND, timeout=60, **extra)
    assert batches_p2p(group.process_group, torch.device("cpu"))
    q, k, v = (group.partition_sequence(inputs[n], seq_dim=2).requires_grad_() for n in "qkv")
    kwargs = dict(kw)
    if kwargs.get("document_ids"):
        kwargs["document_ids"] = inputs["document_ids"]
    out = context_parallel_attention(q, k, v, group, strategy=strategy, **kwargs)
    out.backward(group.partition_sequence(inputs["dout"], seq_dim=2))
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _unshard(shards: list[torch.Tensor], world_size: int) -> torch.Tensor:
    seq = shards[0].shape[2] * world_size
    full = torch.empty(*shards[0].shape[:2], seq, shards[0].shape[3], dtype=shards[0].dtype)
    for rank, shard in enumerate(shards):
        full.index_copy_(2, shard_positions(seq, world_size, rank, "zigzag"), shard)
    return full


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize(("strategy", "ulysses_size", "kw"), CASES)
def test_strategy_is_exact_under_the_rules(world_size, strategy, ulysses_size, kw):
    if ulysses_size is not None and world_size % ulysses_size:
        pytest.skip("hybrid needs ulysses_size to divide the cp size")
    inputs = _inputs(world_size)
    results = mp_pool.run_on_ranks(world_size, strategy_task, world_size, strategy, ulysses_size, kw, inputs)
    expected = _dense(inputs, kw)
    for name in expected:  # fp64 everywhere: only the order of the sums differs from the oracle
        got = _unshard([r[name] for r in results], world_size)
        torch.testing.assert_close(got, expected[name], rtol=0, atol=1e-10, msg=name)


# ---- tensor parallelism and gradient sync under the rules ---------------------------------------


def training_step_task(sizes: dict, backend: str | None) -> dict:
    """One forward and backward of a small model, synced over dp x cp (DDP, or hooks under tp)."""
    from cp_dtensor import ModelConfig, TransformerWithCP, apply_ddp, parallelize_for_tp

    nccl_rules.install()
    extra = {"backend": backend, "timeout": 60} if backend else {}
    group = mp_pool.group(sizes["cp"], dp_size=sizes["dp"], **{**extra, **sizes["extra"]})
    torch.manual_seed(1)  # the same initial weights in every process
    config = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=2)
    model = TransformerWithCP(config, cp_group=group).double()
    synced = apply_ddp(parallelize_for_tp(model, group), group)
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(2))
    ids, labels = (group.partition_sequence(x, seq_dim=1) for x in (ids, ids.roll(-1, 1)))
    loss = synced(ids, labels)
    loss.backward()
    grads = {
        n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for n, p in model.named_parameters()
    }
    return {"loss": loss.item(), "grads": grads}


# cp2 x tp2 under the rules hangs on rank 0 (not reported as a point-to-point deadlock: to be
# investigated, likely DTensor's functional collectives on a Python process group), so only DDP here.
@pytest.mark.parametrize("sizes", [{"cp": 2, "dp": 2, "extra": {}}], ids=["dp2-cp2-ddp"])
def test_grad_sync_passes_the_rules(sizes):
    # gloo is the oracle here: the same collectives in the same order give the same bits (the gloo
    # run itself is checked against one process in test_tensor_parallel.py).
    under_rules = mp_pool.run_on_ranks(4, training_step_task, sizes, nccl_rules.BACKEND)
    on_gloo = mp_pool.run_on_ranks(4, training_step_task, sizes, None)
    for rules, gloo in zip(under_rules, on_gloo):
        assert rules["loss"] == gloo["loss"]
        for name, grad in gloo["grads"].items():
            assert torch.equal(rules["grads"][name], grad), name


def gloo_rotation_task(batched: bool) -> list[float]:
    """The ring's rotation on the pool's gloo world, grouped or not."""
    rank, size = dist.get_rank(), dist.get_world_size()
    comm = RingAttentionCommunicator(None if size == 1 else dist.group.WORLD, batched=batched)
    x = [torch.arange(5.0) + 10 * rank, torch.full((2,), float(rank), dtype=torch.float64)]
    comm.ring_forward(x, offset=2)
    got = comm.wait()
    src = (rank - 2) % size
    assert torch.equal(got[0], torch.arange(5.0) + 10 * src) and torch.equal(
        got[1], torch.full((2,), float(src), dtype=torch.float64)
    )
    return [got[0][0].item()]


@pytest.mark.parametrize("batched", [True, False])
def test_both_paths_are_exact_on_gloo(batched):
    assert mp_pool.run_on_ranks(3, gloo_rotation_task, batched) == [[10.0], [20.0], [0.0]]
