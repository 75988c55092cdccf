"""Direct tests of ``cp_dtensor.local.kernels``: ``block_forward``, ``block_backward`` and ``accum_dtype``.

Every result is checked against an fp64 oracle on CPU (``cp_dtensor.reference.full_attention`` differentiated by
autograd, and the log-sum-exp of the masked scores written out below), on the same inputs rounded to
the dtype under test, so that the difference measures the kernel alone:

* forward output, log-sum-exp and the gradients dq / dk / dv, for fp64, fp32, bf16 and fp16, causal
  (top-left aligned: query ``i`` sees key ``j <= i``) or not, GQA (H = 4, H_kv in 4, 2, 1),
  S_q != S_k, head_dim 16, 64 and 320;
* bool masks ``(B, 1, S_q, S_k)`` and ``(S_q, S_k)`` with rows that see no key (output 0, lse -inf,
  zero gradient);
* the property the ring is built on: block results merged with ``cp_dtensor.local.merge.merge_into`` equal
  one call over all keys, and the backward of each block given the FINAL output and lse gives that
  block's share of dq and its slice of dk / dv;
* output dtypes and shapes, and that the tolerances used catch a 10% error in the scale.

Each test runs on every device this machine has (``DEVICES``): on a machine with a GPU the same cases
also exercise the CUDA branches of the kernels (flash for fp16/bf16 with head_dim <= 256, efficient
attention for fp32 and head_dim > 256, the explicit math path for fp64 and for masked blocks).
"""

from __future__ import annotations

import pytest
import torch

from cp_dtensor.local.kernels import accum_dtype, block_backward, block_forward
from cp_dtensor.local.merge import merge_into
from cp_dtensor.reference import full_attention

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
B, H, S_Q, S_K = 2, 4, 48, 80  # S_q != S_k, and neither a multiple of a kernel tile (32 / 64 / 128)

# Tolerances on out, dq, dk, dv: max |actual - expected| <= TOL * max |expected| (the tensor's magnitude).
# Measured on the CPU kernel (worst of the grid): fp64 3e-15, fp32 1.3e-6, bf16 7e-3, fp16 8e-4; a 10%
# error in the scale moves each of them by >= 4.4e-2 (test_tolerances_catch_a_wrong_scale).
TOL = {
    torch.float64: 1e-10,  # same math in fp64, only the summation order differs (~1e-15 seen)
    torch.float32: 1e-5,  # fp32 accumulation over <= 80 keys (~1e-6 seen; margin for GPU kernels)
    torch.bfloat16: 2e-2,  # 8 mantissa bits: out / P / grads rounded to bf16, 2^-9 = 2e-3 each (7e-3 seen)
    torch.float16: 5e-3,  # 11 mantissa bits: 2^-12 = 2.4e-4 per rounding (8e-4 seen)
}
# Tolerances on lse (always fp32 or fp64), relative to max |lse| the same way; -inf entries must match exactly.
LSE_TOL = {
    torch.float64: 1e-12,  # fp64 logsumexp, different order (~2e-16 seen)
    torch.float32: 1e-5,  # fp32 logsumexp (~2e-7 seen)
    torch.bfloat16: 1e-4,  # fp32 logsumexp of scores from half inputs (~1.4e-5 seen on CPU)
    torch.float16: 1e-4,  # as bf16
}


def make_inputs(dtype, device, *, h_kv=H, head_dim=16, s_q=S_Q, s_k=S_K, seed=0) -> dict[str, torch.Tensor]:
    """q, k, v, dout drawn in fp64 and rounded to ``dtype``: the oracle sees exactly what the kernel sees."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (B, H, s_q, head_dim), "k": (B, h_kv, s_k, head_dim), "v": (B, h_kv, s_k, head_dim)}
    shapes["dout"] = shapes["q"]
    return {n: torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device) for n, s in shapes.items()}


def visible(s_q: int, s_k: int, causal: bool, mask: torch.Tensor | None) -> torch.Tensor:
    """Bool ``(..., S_q, S_k)`` on CPU: causal is top-left aligned (query i sees key j <= i), and-ed with mask."""
    vis = torch.ones(s_q, s_k, dtype=torch.bool)
    if causal:
        vis = vis.tril()
    return vis if mask is None else vis & mask.cpu()


def oracle(inputs, *, causal, scale, mask=None) -> dict[str, torch.Tensor]:
    """fp64 CPU math: out and dq / dk / dv by autograd through ``full_attention``, lse of the masked scores."""
    q, k, v = (inputs[n].detach().cpu().double().requires_grad_() for n in "qkv")
    cpu_mask = None if mask is None else mask.cpu()
    out = full_attention(q, k, v, causal=causal, scale=scale, mask=cpu_mask)
    out.backward(inputs["dout"].cpu().double())
    k_exp = k.detach().repeat_interleave(H // k.shape[1], dim=1)  # (B, H, S_k, D)
    scores = (q.detach() @ k_exp.transpose(-2, -1)) * scale  # (B, H, S_q, S_k)
    vis = visible(q.shape[2], k.shape[2], causal, cpu_mask)
    lse = torch.logsumexp(scores.masked_fill(~vis, float("-inf")), dim=-1)  # (B, H, S_q); -inf: sees nothing
    return {"out": out.detach(), "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}


def assert_near(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str) -> None:
    """``|actual - expected| <= tol * max |expected|`` elementwise; infinities must be equal."""
    finite = expected.isfinite()
    magnitude = expected[finite].abs().max().item() if bool(finite.any()) else 1.0
    torch.testing.assert_close(
        actual.detach().double().cpu(), expected, atol=tol * magnitude, rtol=0.0, msg=lambda m: f"{name}: {m}"
    )


def run_kernels(inputs, *, causal, scale, mask=None) -> dict[str, torch.Tensor]:
    """block_forward, then block_backward with that (single-block, hence final) out and lse."""
    q, k, v, dout = (inputs[n] for n in ("q", "k", "v", "dout"))
    out, lse = block_forward(q, k, v, causal=causal, scale=scale, mask=mask)
    dq, dk, dv = block_backward(dout, q, k, v, out, lse, causal=causal, scale=scale, mask=mask)
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def check_all(got, want, dtype, label: str) -> None:
    assert_near(got["lse"], want["lse"], LSE_TOL[dtype], f"{label} lse")
    for name in ("out", "dq", "dk", "dv"):
        assert_near(got[name], want[name], TOL[dtype], f"{label} {name}")


# ---- forward and backward of one call against the oracle ----------------------------------------


@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("h_kv", [4, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_one_block_matches_oracle(device, dtype, causal, h_kv, head_dim):
    inputs = make_inputs(dtype, device, h_kv=h_kv, head_dim=head_dim)
    scale = head_dim**-0.5
    got = run_kernels(inputs, causal=causal, scale=scale)
    check_all(got, oracle(inputs, causal=causal, scale=scale), dtype, f"{device} {dtype} causal={causal}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_head_dim_above_256(device, dtype, causal):
    """head_dim 320: past flash's limit, so CUDA takes efficient attention for fp16 / bf16 too."""
    inputs = make_inputs(dtype, device, h_kv=2, head_dim=320, s_q=24, s_k=40)
    scale = 320**-0.5
    got = run_kernels(inputs, causal=causal, scale=scale)
    check_all(got, oracle(inputs, causal=causal, scale=scale), dtype, f"{device} {dtype} D=320")


# ---- masks: rows that see nothing ---------------------------------------------------------------


def random_mask(shape: str, causal: bool, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A random bool mask (~60% visible) with empty rows, and which (batch, query) rows see no key at all.

    Rows 3, 17 and 40 of every batch see nothing, row 5 exactly one key. With ``causal`` the mask is
    and-ed with the causal triangle first, as the ring's masks are (the test after this one covers a
    row that only the two together hide).

    Returns:
        ``(mask, empty)``: mask ``(B, 1, S_q, S_k)`` or ``(S_q, S_k)``; empty ``(B, S_q)`` bool.
    """
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, 1, S_Q, S_K, generator=g) < 0.6
    if shape == "2d":
        mask = mask[0, 0]
    mask[..., [3, 17, 40], :] = False
    mask[..., 5, :] = False
    mask[..., 5, 2] = True
    if causal:
        mask &= torch.ones(S_Q, S_K, dtype=torch.bool).tril()
    empty = ~mask.any(-1).expand(B, 1, S_Q)[:, 0]  # (B, S_q)
    assert bool(empty[:, [3, 17, 40]].all()) and not bool(empty[:, 5].any())
    return mask, empty


@pytest.mark.parametrize("mask_shape", ["4d", "2d"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_mask_with_empty_rows(device, dtype, causal, mask_shape):
    inputs = make_inputs(dtype, device, h_kv=2)
    mask, empty = random_mask(mask_shape, causal)
    scale = 16**-0.5
    got = run_kernels(inputs, causal=causal, scale=scale, mask=mask.to(device))
    check_all(got, oracle(inputs, causal=causal, scale=scale, mask=mask), dtype, f"{device} {dtype} masked")
    rows = empty[:, None, :].expand(B, H, S_Q)  # (B, H, S_q)
    assert bool(torch.isneginf(got["lse"][rows.to(device)]).all()), "lse must be -inf on rows that see no key"
    assert not bool(torch.isinf(got["lse"][~rows.to(device)]).any())
    assert bool((got["out"][rows.to(device)] == 0).all()), "out must be 0 on rows that see no key"
    assert bool((got["dq"][rows.to(device)] == 0).all()), "dq must be 0 on rows that see no key"
    for name in ("out", "dq", "dk", "dv"):
        assert bool(got[name].isfinite().all()), f"{name} has non-finite values"


@pytest.mark.parametrize("device", DEVICES)
def test_row_hidden_by_causal_and_mask_together(device):
    """Row 0 under causal sees key 0 only; the mask hides key 0 but shows others: the row sees nothing."""
    inputs = make_inputs(torch.float32, device, s_q=8, s_k=8)
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[0, 0] = False
    out, lse = block_forward(*(inputs[n] for n in "qkv"), causal=True, scale=0.25, mask=mask.to(device))
    assert bool((out[:, :, 0] == 0).all())
    assert bool(torch.isneginf(lse[:, :, 0]).all()), f"lse of an empty row: {lse[:, :, 0].flatten().tolist()}"


# ---- two blocks merged == one call: the ring's invariant ---------------------------------------

# name -> (causal, query positions, (keys of block A, keys of block B)): blocks as calls of the kernels.
#   full:   no mask, keys split unevenly 0..34 / 35..79.
#   causal: 48 queries at positions 32..79 over keys 0..79: block A (keys 0..31) is all visible, block B
#           (keys 32..79) is the square diagonal block, causal=True (top-left = global causality there).
#   masked: random (B, 1, S_q, S_k) mask with empty rows, keys split 0..39 / 40..79: some rows see
#           nothing in one block only (lse -inf there, merged away), some nothing at all.
MERGE_CASES = ["full", "causal", "masked"]


def merge_case(case: str):
    """(mask over all keys or None, [(key slice, causal, block mask or None)] for the two blocks)."""
    if case == "full":
        return None, [(slice(0, 35), False, None), (slice(35, 80), False, None)]
    if case == "causal":
        q_pos, k_pos = torch.arange(32, 80), torch.arange(80)
        mask = k_pos[None, :] <= q_pos[:, None]  # (S_q, S_k) global causality
        return mask, [(slice(0, 32), False, None), (slice(32, 80), True, None)]
    mask, _ = random_mask("4d", causal=False, seed=2)
    mask[:, :, 10, 40:] = False  # row 10: keys of block A only
    mask[:, :, 11, :40] = False  # row 11: keys of block B only
    return mask, [(slice(0, 40), False, mask[..., :40]), (slice(40, 80), False, mask[..., 40:])]


@pytest.mark.parametrize("case", MERGE_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_blocks_merge_to_one_call(device, dtype, case):
    inputs = make_inputs(dtype, device, h_kv=2)
    q, k, v, dout = (inputs[n] for n in ("q", "k", "v", "dout"))
    scale = 16**-0.5
    full_mask, blocks = merge_case(case)
    want = oracle(inputs, causal=False, scale=scale, mask=full_mask)
    dev_mask = None if full_mask is None else full_mask.to(device)
    label = f"{device} {dtype} {case}"

    # Forward: merge the blocks into a running (out, lse), exactly as ring_forward does.
    acc = accum_dtype(dtype)
    out = torch.zeros(q.shape, dtype=acc, device=device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=device)
    for keys, causal, mask in blocks:
        block_out, block_lse = block_forward(
            q, k[:, :, keys], v[:, :, keys], causal=causal, scale=scale, mask=None if mask is None else mask.to(device)
        )
        merge_into(out, lse, block_out, block_lse)
    one_out, one_lse = block_forward(q, k, v, causal=False, scale=scale, mask=dev_mask)
    assert_near(out, want["out"], TOL[dtype], f"{label} merged out vs oracle")
    assert_near(lse, want["lse"], LSE_TOL[dtype], f"{label} merged lse vs oracle")
    assert_near(out, one_out.double().cpu(), TOL[dtype], f"{label} merged out vs one call")
    assert_near(lse, one_lse.double().cpu(), LSE_TOL[dtype], f"{label} merged lse vs one call")

    # Backward: each block given the FINAL out (in q's dtype, as the ring saves it) and lse.
    out = out.to(dtype)
    dq = torch.zeros(q.shape, dtype=torch.float64)
    for keys, causal, mask in blocks:
        dq_b, dk_b, dv_b = block_backward(
            dout, q, k[:, :, keys], v[:, :, keys], out, lse,
            causal=causal, scale=scale, mask=None if mask is None else mask.to(device),
        )  # fmt: skip
        dq += dq_b.double().cpu()
        assert_near(dk_b, want["dk"][:, :, keys], TOL[dtype], f"{label} dk of keys {keys}")
        assert_near(dv_b, want["dv"][:, :, keys], TOL[dtype], f"{label} dv of keys {keys}")
    assert_near(dq, want["dq"], TOL[dtype], f"{label} sum of the blocks' dq")


# ---- dtypes, shapes, and the tolerances themselves ----------------------------------------------


def test_accum_dtype():
    assert accum_dtype(torch.float64) == torch.float64
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert accum_dtype(dtype) == torch.float32


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_output_dtypes_and_shapes(device, dtype, masked):
    inputs = make_inputs(dtype, device, h_kv=1, s_q=8, s_k=12)
    mask = torch.rand(8, 12, generator=torch.Generator().manual_seed(3)).lt(0.5).to(device) if masked else None
    got = run_kernels(inputs, causal=False, scale=0.25, mask=mask)
    assert (got["out"].dtype, got["out"].shape, got["out"].device) == (dtype, inputs["q"].shape, inputs["q"].device)
    assert (got["lse"].dtype, got["lse"].shape) == (accum_dtype(dtype), (B, H, 8))
    for grad, like in (("dq", "q"), ("dk", "k"), ("dv", "v")):
        assert (got[grad].dtype, got[grad].shape, got[grad].device) == (dtype, inputs[like].shape, inputs[like].device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_tolerances_catch_a_wrong_scale(device, dtype):
    """The kernels run with the scale 10% off: every checked quantity must fail its tolerance."""
    inputs = make_inputs(dtype, device, h_kv=2)
    want = oracle(inputs, causal=True, scale=0.25)
    got = run_kernels(inputs, causal=True, scale=0.25 * 1.1)
    with pytest.raises(AssertionError):
        assert_near(got["lse"], want["lse"], LSE_TOL[dtype], "lse")
    for name in ("out", "dq", "dk", "dv"):
        with pytest.raises(AssertionError):
            assert_near(got[name], want[name], TOL[dtype], name)


def test_merge_first_flag_matches_reading_the_state():
    """The ring tells merge_into which merge is a row's first (from its plan, no device read); with the flag or
    without it the result is the same, bit for bit, on an empty state and on a partly filled one."""
    g = torch.Generator().manual_seed(3)
    block_out, block_lse = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, generator=g)
    results = []
    for first in (True, None):
        out, lse = torch.zeros(1, 2, 5, 4), torch.full((1, 2, 5), float("-inf"))
        merge_into(out, lse, block_out, block_lse, first=first)
        results.append((out, lse))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    results = []
    for first in (False, None):
        out, lse = torch.zeros(1, 2, 5, 4), torch.full((1, 2, 5), float("-inf"))
        out[:, :, :2], lse[:, :, :2] = block_out[:, :, :2] * 2, block_lse[:, :, :2] - 1  # rows 0-1 merged before
        merge_into(out, lse, block_out, block_lse, first=first)
        results.append((out, lse))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert torch.equal(results[0][0][:, :, 2:], block_out[:, :, 2:])  # rows seen for the first time: the block
