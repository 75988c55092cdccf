"""reference.attention: the full-attention oracle against torch SDPA, and the block pieces."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cp_dtensor.reference.attention import attention_block, full_attention
from cp_dtensor.reference.ring import merge

SETTINGS = settings(derandomize=True, deadline=None, max_examples=60)


@st.composite
def attention_cases(draw):
    """Shapes, flags and a seed for one full-attention call (q and k lengths may differ)."""
    kv_heads = draw(st.integers(1, 3))
    return {
        "batch": draw(st.integers(1, 2)),
        "heads": kv_heads * draw(st.integers(1, 3)),
        "kv_heads": kv_heads,
        "s_q": draw(st.integers(1, 12)),
        "s_k": draw(st.integers(1, 12)),
        "head_dim": draw(st.integers(1, 8)),
        "causal": draw(st.booleans()),
        "scale": draw(st.none() | st.floats(0.1, 2.0)),
        "seed": draw(st.integers(0, 2**16)),
    }


def make_qkv(case, dtype=torch.float64):
    gen = torch.Generator().manual_seed(case["seed"])
    b, d = case["batch"], case["head_dim"]
    q = torch.randn(b, case["heads"], case["s_q"], d, generator=gen, dtype=dtype)
    k = torch.randn(b, case["kv_heads"], case["s_k"], d, generator=gen, dtype=dtype)
    v = torch.randn(b, case["kv_heads"], case["s_k"], d, generator=gen, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v)]


def output_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


@SETTINGS
@given(case=attention_cases())
def test_full_attention_matches_sdpa(case):
    q, k, v = make_qkv(case)

    def ours(q, k, v):
        return full_attention(q, k, v, causal=case["causal"], scale=case["scale"])

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=case["causal"], scale=case["scale"], enable_gqa=True)

    for got, want in zip(output_and_grads(ours, q, k, v), output_and_grads(sdpa, q, k, v), strict=True):
        # fp64, same formula; only the order of summation differs
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@SETTINGS
@given(case=attention_cases(), mask_seed=st.integers(0, 2**16), per_head=st.booleans())
def test_full_attention_with_mask_matches_sdpa(case, mask_seed, per_head):
    q, k, v = make_qkv(case)
    shape = (case["batch"], case["heads"]) if per_head else (1, 1)
    mask = torch.rand(*shape, case["s_q"], case["s_k"], generator=torch.Generator().manual_seed(mask_seed))
    mask = mask < 0.6  # (B or 1, H or 1, S_q, S_k)
    mask[..., 0] = True  # every row sees a key (SDPA's answer for an empty row is not ours)
    causal_part = torch.ones(case["s_q"], case["s_k"], dtype=torch.bool).tril()
    sdpa_mask = (mask & causal_part) if case["causal"] else mask  # SDPA takes no is_causal with a mask

    def ours(q, k, v):
        return full_attention(q, k, v, causal=case["causal"], scale=case["scale"], mask=mask)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, scale=case["scale"], enable_gqa=True)

    for got, want in zip(output_and_grads(ours, q, k, v), output_and_grads(sdpa, q, k, v), strict=True):
        # fp64, same formula; only the order of summation differs
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_rows_without_visible_keys_give_zero_output_and_zero_gradient():
    q, k, v = make_qkv({"batch": 1, "heads": 2, "kv_heads": 1, "s_q": 4, "s_k": 5, "head_dim": 3, "seed": 0})
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2] = False  # query 2 may attend nothing
    out = full_attention(q, k, v, mask=mask)
    out.sum().backward()
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))
    assert all(torch.isfinite(t).all() for t in (out, q.grad, k.grad, v.grad))


def test_gqa_kv_head_serves_consecutive_query_heads():
    q, k, v = make_qkv({"batch": 1, "heads": 4, "kv_heads": 2, "s_q": 3, "s_k": 3, "head_dim": 2, "seed": 3})
    out = full_attention(q, k, v)
    by_hand = full_attention(q, k[:, [0, 0, 1, 1]], v[:, [0, 0, 1, 1]])
    assert torch.equal(out, by_hand)


@pytest.mark.parametrize(
    ("q_shape", "kv_shape", "match"),
    [
        ((1, 6, 4, 8), (1, 4, 4, 8), "must divide the number of query heads"),
        ((1, 2, 4, 8), (1, 2, 4, 4), "head_dim"),
        ((1, 2, 4), (1, 2, 4, 8), "expected 4 dims"),
    ],
)
def test_full_attention_rejects_shapes_that_do_not_fit(q_shape, kv_shape, match):
    with pytest.raises(ValueError, match=match):
        full_attention(torch.randn(q_shape), torch.randn(kv_shape), torch.randn(kv_shape))


def test_bad_kv_heads_error_lists_valid_options():
    with pytest.raises(ValueError, match=r"q has 6 heads but k/v have 4.*\[1, 2, 3, 6\]"):
        full_attention(torch.randn(1, 6, 2, 2), torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2))


@SETTINGS
@given(case=attention_cases(), split=st.integers(0, 12))
def test_merge_of_two_key_blocks_equals_attention_over_both(case, split):
    q, k, v = (x.detach() for x in make_qkv(case))
    split = min(split, case["s_k"])
    gen = torch.Generator().manual_seed(case["seed"])
    visible = torch.rand(case["s_q"], case["s_k"], generator=gen) < 0.7  # (S_q, S_k)
    scale = case["scale"] or 0.5
    whole = attention_block(q, k, v, scale=scale, visible=visible)
    first = attention_block(q, k[:, :, :split], v[:, :, :split], scale=scale, visible=visible[:, :split])
    second = attention_block(q, k[:, :, split:], v[:, :, split:], scale=scale, visible=visible[:, split:])
    merged = merge(*first, *second)
    for got, want in zip(merged, whole, strict=True):
        # fp64; rows that see no key carry lse = -inf on both sides, which assert_close treats as equal
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_merge_into_empty_state_returns_the_block():
    block_out, block_lse = torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3)
    out, lse = merge(torch.zeros(1, 1, 3, 2), torch.full((1, 1, 3), float("-inf")), block_out, block_lse)
    assert torch.equal(out, block_out) and torch.equal(lse, block_lse)


def test_merge_is_not_a_plain_sum():
    # two blocks of one key each with equal scores: the answer is the mean of the values, not the sum
    v_a, v_b = torch.tensor([[[[2.0]]]]), torch.tensor([[[[4.0]]]])
    lse = torch.zeros(1, 1, 1)
    out, _ = merge(v_a, lse, v_b, lse)
    assert out.item() == 3.0
