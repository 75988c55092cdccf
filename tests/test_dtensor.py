"""DTensors built with torch's own ``distribute_tensor`` mean natural order, in every strategy, the module and
``gather_sequence``: forward and backward against fp64 full attention on real gloo ranks, and the bytes of the
relayout (see Note [Re-laying out a DTensor] in cp_dtensor/mesh/sharding.py)."""

from __future__ import annotations

import mp_pool
import pytest
import torch
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from cp_dtensor import ContextParallelAttention, context_parallel_attention, count_comm
from cp_dtensor.positions.layout import DocumentZigzag, shard_positions
from cp_dtensor.reference import full_attention

B, H, HKV, D = 2, 4, 2, 8
# fp64 end to end: only the summation order differs from the oracle.
ATOL = 1e-10


def _layout(name: str, world_size: int):
    """A layout by name; "documents" is a DocumentZigzag of one long and two short segments."""
    if name != "documents":
        return name
    unit = 2 * world_size
    return DocumentZigzag((3 * unit, unit, 2 * unit))


def _seq_len(layout, world_size: int) -> int:
    return layout.seq_len if isinstance(layout, DocumentZigzag) else 6 * world_size


def _inputs(seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"q": (B, H, seq_len, D), "k": (B, HKV, seq_len, D), "v": (B, HKV, seq_len, D), "dout": (B, H, seq_len, D)}
    return {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}


def _doc_ids(layout, seq_len: int) -> torch.Tensor | None:
    """Packed-document ids (B, L) matching a DocumentZigzag (last token of each segment is padding)."""
    if not isinstance(layout, DocumentZigzag):
        return None
    ids = sum(([i] * (n - 1) + [-1] for i, n in enumerate(layout.lengths)), [])
    return torch.tensor([ids] * B)


def _oracle(inputs: dict, causal: bool, docs: torch.Tensor | None) -> dict[str, torch.Tensor]:
    q, k, v = (inputs[n].clone().requires_grad_() for n in "qkv")
    mask = None
    if docs is not None:
        seq_len = docs.shape[1]
        vis = (docs[:, :, None] == docs[:, None, :]) & (docs[:, :, None] >= 0)
        if causal:
            vis &= torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
        mask = vis[:, None]
    out = full_attention(q, k, v, causal=causal and docs is None, mask=mask)
    out.backward(inputs["dout"])
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def dtensor_case(
    world_size: int,
    strategy: str,
    ulysses_size,
    layout_name: str,
    causal: bool,
    inputs: dict,
    docs,
    docs_as_dtensor: bool,
    dp_size: int | None = None,
) -> dict:
    """Runs on every rank: distribute_tensor the global q, k, v, attend, backward; return full tensors.

    ``world_size`` is the cp size; with ``dp_size``, ``inputs`` is a list: one sequence per dp replica.
    """
    extra = {} if ulysses_size is None else {"ulysses_size": ulysses_size}
    group = mp_pool.group(world_size, dp_size=dp_size, **extra).with_layout(_layout(layout_name, world_size))
    if dp_size is not None:
        inputs = inputs[group.dp_mesh.get_local_rank()]
    mesh = group.cp_mesh
    q, k, v = (distribute_tensor(inputs[n], mesh, [Shard(2)]).requires_grad_() for n in "qkv")
    dout = distribute_tensor(inputs["dout"], mesh, [Shard(2)])
    if docs is not None and docs_as_dtensor:
        docs = distribute_tensor(docs, mesh, [Shard(1)])
    with count_comm() as fwd:
        out = context_parallel_attention(q, k, v, group, strategy=strategy, causal=causal, document_ids=docs)
    with count_comm() as bwd:
        out.backward(dout)
    assert isinstance(out, DTensor) and tuple(out.placements) == (Shard(2),) and out.device_mesh == mesh
    gathered = group.gather_sequence(out.detach(), seq_dim=2)
    return {
        "out": out.full_tensor().detach(),
        "dq": q.grad.full_tensor(),
        "dk": k.grad.full_tensor(),
        "dv": v.grad.full_tensor(),
        "gathered": gathered,
        "fwd": (dict(fwd.calls).get("relayout", 0), dict(fwd.bytes).get("relayout", 0)),
        "bwd": (dict(bwd.calls).get("relayout", 0), dict(bwd.bytes).get("relayout", 0)),
    }


def _moved_rows(seq_len: int, world_size: int, rank: int, layout) -> int:
    """Positions of rank's contiguous chunk that the layout puts elsewhere: what one relayout sends."""
    chunk = seq_len // world_size
    mine = set(shard_positions(seq_len, world_size, rank, layout).tolist())
    return len(set(range(rank * chunk, (rank + 1) * chunk)) - mine)


CASES = [  # (strategy, world size, ulysses size, layout)
    *[
        (s, p, None, lay)
        for s in ("ring", "ulysses", "allgather")
        for p in (2, 4)
        for lay in ("zigzag", "contiguous", "documents")
    ],
    ("hybrid", 4, 2, "zigzag"),
    ("hybrid", 4, 2, "contiguous"),
    ("hybrid", 4, 2, "documents"),
    ("hybrid", 2, 2, "zigzag"),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("strategy", "world_size", "ulysses_size", "layout_name"), CASES)
def test_distribute_tensor_inputs_are_natural_order(strategy, world_size, ulysses_size, layout_name, causal):
    """A plain distribute_tensor DTensor gives exact attention and gradients, and the relayout's bytes."""
    layout = _layout(layout_name, world_size)
    seq_len = _seq_len(layout, world_size)
    inputs = _inputs(seq_len, seed=world_size + 7 * causal)
    docs = _doc_ids(layout, seq_len)
    results = mp_pool.run_on_ranks(
        world_size,
        dtensor_case,
        world_size,
        strategy,
        ulysses_size,
        layout_name,
        causal,
        inputs,
        docs,
        docs_as_dtensor=strategy == "ring",
    )
    expected = _oracle(inputs, causal, docs)
    for rank, r in enumerate(results):
        for name in ("out", "dq", "dk", "dv"):
            torch.testing.assert_close(r[name], expected[name], rtol=0, atol=ATOL, msg=f"rank {rank} {name}")
        torch.testing.assert_close(r["gathered"], expected["out"], rtol=0, atol=ATOL, msg=f"rank {rank} gathered")
        # Forward: q, k, v in and the output back; backward: dout in and dq, dk, dv back.
        rows = _moved_rows(seq_len, world_size, rank, layout)
        expected_bytes = rows * B * (2 * H + 2 * HKV) * D * 8
        calls = 0 if layout_name == "contiguous" else 4
        assert r["fwd"] == (calls, expected_bytes), f"rank {rank} forward relayout {r['fwd']}"
        assert r["bwd"] == (calls, expected_bytes), f"rank {rank} backward relayout {r['bwd']}"
        if layout_name != "contiguous":
            assert expected_bytes > 0


def test_distribute_tensor_inputs_with_a_dp_axis():
    """dp 2 x cp 2: each replica's DTensor lives on its own cp mesh and computes its own sequence."""
    seq_len = _seq_len("zigzag", 2)
    inputs = [_inputs(seq_len, seed=s) for s in (31, 32)]
    results = mp_pool.run_on_ranks(4, dtensor_case, 2, "ring", None, "zigzag", True, inputs, None, False, dp_size=2)
    for rank, r in enumerate(results):
        expected = _oracle(inputs[rank // 2], True, None)  # ranks 0, 1: replica 0; ranks 2, 3: replica 1
        for name in ("out", "dq", "dk", "dv"):
            torch.testing.assert_close(r[name], expected[name], rtol=0, atol=ATOL, msg=f"rank {rank} {name}")


HIDDEN, HEADS = 16, 4


def module_case(world_size: int, layout_name: str, inputs: dict) -> dict:
    """Runs on every rank: ContextParallelAttention on a distribute_tensor DTensor and on local shards."""
    group = mp_pool.group(world_size).with_layout(_layout(layout_name, world_size))
    torch.manual_seed(0)  # the same weights on every rank
    layer = ContextParallelAttention(HIDDEN, HEADS, group, causal=True, num_kv_heads=2).double()
    x = distribute_tensor(inputs["x"], group.cp_mesh, [Shard(1)]).requires_grad_()
    with count_comm() as comm:
        out = layer(x)
        out.backward(distribute_tensor(inputs["dout"], group.cp_mesh, [Shard(1)]))
    assert isinstance(out, DTensor) and tuple(out.placements) == (Shard(1),)
    # The local path (tested against fp64 attention in test_module.py), gathered to natural order.
    x_local = group.partition_sequence(inputs["x"], seq_dim=1).requires_grad_()
    out_local = layer(x_local)
    out_local.backward(group.partition_sequence(inputs["dout"], seq_dim=1))
    return {
        "out": out.full_tensor().detach(),
        "dx": x.grad.full_tensor(),
        "relayout": comm.calls.get("relayout", 0),
        "local_out": group.gather_sequence(out_local.detach(), seq_dim=1),
        "local_dx": group.gather_sequence(x_local.grad, seq_dim=1),
    }


@pytest.mark.parametrize(("world_size", "layout_name"), [(2, "zigzag"), (4, "zigzag"), (4, "documents")])
def test_module_takes_distribute_tensor_inputs(world_size, layout_name):
    """The layer on a natural-order DTensor equals the layer on local shards, output and input gradient."""
    seq_len = _seq_len(_layout(layout_name, world_size), world_size)
    gen = torch.Generator().manual_seed(world_size)
    inputs = {n: torch.randn(1, seq_len, HIDDEN, generator=gen, dtype=torch.float64) for n in ("x", "dout")}
    for rank, r in enumerate(mp_pool.run_on_ranks(world_size, module_case, world_size, layout_name, inputs)):
        # fp64, and the same local computation after the relayout: only the exchange differs.
        torch.testing.assert_close(r["out"], r["local_out"], rtol=0, atol=ATOL, msg=f"rank {rank} out")
        torch.testing.assert_close(r["dx"], r["local_dx"], rtol=0, atol=ATOL, msg=f"rank {rank} dx")
        assert r["relayout"] == 4, "x in and out back, forward and backward: q, k, v are not moved"


def distribute_sequence_case(world_size: int, layout_name: str, x: torch.Tensor) -> dict:
    """Runs on every rank: distribute_sequence equals distribute_tensor; gather_sequence takes both kinds."""
    group = mp_pool.group(world_size).with_layout(_layout(layout_name, world_size))
    ours = group.distribute_sequence(x, seq_dim=2)
    torchs = distribute_tensor(x, group.cp_mesh, [Shard(2)])
    return {
        "same_local": torch.equal(ours.to_local(), torchs.to_local()),
        "full": ours.full_tensor(),
        "gather_dtensor": group.gather_sequence(ours, seq_dim=2),
        "gather_local": group.gather_sequence(group.partition_sequence(x, seq_dim=2), seq_dim=2),
    }


@pytest.mark.parametrize(("world_size", "layout_name"), [(2, "zigzag"), (4, "documents"), (4, "contiguous")])
def test_distribute_sequence_is_distribute_tensor(world_size, layout_name):
    seq_len = _seq_len(_layout(layout_name, world_size), world_size)
    x = torch.randn(1, 2, seq_len, 3, dtype=torch.float64)
    for r in mp_pool.run_on_ranks(world_size, distribute_sequence_case, world_size, layout_name, x):
        assert r["same_local"]
        for name in ("full", "gather_dtensor", "gather_local"):
            assert torch.equal(r[name], x), name
