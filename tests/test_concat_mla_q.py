"""The op's contract on valid inputs, on every device: q_out[t, h] = [ql_nope[t, h] | q_pe[t, h or 0]],
bit for bit as torch.cat gives it, for any strides, and nothing written outside q_out's elements."""

from __future__ import annotations

import pytest
import torch

import vllm_mla_ops
from mla_helpers import (
    ENTRY_POINTS,
    HALF_DTYPES,
    NOPE_LAYOUTS,
    OUT_LAYOUTS,
    PE_LAYOUTS,
    bits,
    check_writes_reference,
    contiguous,
    heads_major,
    inside_bigger,
    layout_params,
    random_bits,
    reference,
    snapshot,
    assert_storages,
    split_of_wider,
)

# (nope_dim, rope_dim, heads)
GEOMETRIES = [
    pytest.param(512, 64, 128, id="deepseek-v3-512+64x128h"),
    pytest.param(512, 64, 16, id="deepseek-v2-lite-512+64x16h"),
    pytest.param(512, 64, 1, id="512+64x1h"),
    pytest.param(512, 64, 64, id="kimi-k2-512+64x64h"),
    pytest.param(256, 32, 40, id="minicpm3-256+32x40h"),
    pytest.param(513, 65, 3, id="513+65x3h"),
    pytest.param(7, 3, 5, id="7+3x5h"),
    pytest.param(1, 1, 2, id="1+1x2h"),
    pytest.param(8, 0, 4, id="rope0"),
    pytest.param(0, 8, 4, id="nope0"),
]
TOKENS = [0, 1, 300]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("nope_dim, rope_dim, heads", GEOMETRIES)
def test_contiguous_matches_cat(device, dtype, tokens, nope_dim, rope_dim, heads):
    ql_nope = random_bits((tokens, heads, nope_dim), dtype, device)
    q_pe = random_bits((tokens, heads, rope_dim), dtype, device)
    q_out = random_bits((tokens, heads, nope_dim + rope_dim), dtype, device)
    check_writes_reference(ql_nope, q_pe, q_out)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("tokens", [1, 300])
@pytest.mark.parametrize("heads", [16, 128])
def test_decode_layout_matches_cat(device, dtype, tokens, heads):
    """ql_nope = bmm output [H, T, 512] transposed; q_pe = q[..., 128:192] of q = [T, H, 192]."""
    ql_nope = heads_major((tokens, heads, 512), dtype, device)
    q_pe = split_of_wider((tokens, heads, 64), dtype, device)
    assert ql_nope.stride() == (512, tokens * 512, 1) and q_pe.stride() == (heads * 192, 192, 1)
    q_out = random_bits((tokens, heads, 576), dtype, device)
    check_writes_reference(ql_nope, q_pe, q_out)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("out_layout", layout_params(OUT_LAYOUTS))
@pytest.mark.parametrize("pe_layout", layout_params(PE_LAYOUTS))
@pytest.mark.parametrize("nope_layout", layout_params(NOPE_LAYOUTS))
@pytest.mark.parametrize("nope_dim, rope_dim", [(512, 64), (7, 3)], ids=["512+64", "7+3"])
def test_any_strides_match_cat(device, dtype, nope_dim, rope_dim, nope_layout, pe_layout, out_layout):
    """Every combination of input and output layouts: transposed, split, last-dim stride 2, offset
    views with gaps, stride-0 tokens or heads, 1-head q_pe. Gaps in q_out's buffer stay untouched."""
    tokens, heads = 33, 16
    ql_nope = nope_layout((tokens, heads, nope_dim), dtype, device)
    q_pe = pe_layout((tokens, heads, rope_dim), dtype, device)
    q_out = out_layout((tokens, heads, nope_dim + rope_dim), dtype, device)
    check_writes_reference(ql_nope, q_pe, q_out)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize(
    "tokens, heads, pe_heads",
    [(0, 16, 16), (0, 16, 1), (5, 0, 0), (5, 0, 1), (0, 0, 1)],
)
def test_empty_writes_nothing(device, dtype, tokens, heads, pe_heads):
    """Zero tokens or zero heads: returns, and no byte of q_out's buffer (or the inputs) changes."""
    ql_nope = inside_bigger((tokens, heads, 512), dtype, device)
    q_pe = inside_bigger((tokens, pe_heads, 64), dtype, device)
    q_out = inside_bigger((tokens, heads, 576), dtype, device)
    before = snapshot(ql_nope, q_pe, q_out)
    torch.ops._C.concat_mla_q(ql_nope, q_pe, q_out)
    assert_storages(before, (ql_nope, q_pe, q_out), "an empty call wrote")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("pe_layout", layout_params([contiguous, split_of_wider]))
def test_api_allocates_contiguous_output(device, dtype, pe_layout):
    ql_nope = heads_major((37, 16, 512), dtype, device)
    q_pe = pe_layout((37, 1, 64), dtype, device)
    q_out = vllm_mla_ops.concat_mla_q(ql_nope, q_pe)
    assert q_out.shape == (37, 16, 576) and q_out.dtype == dtype and q_out.device == ql_nope.device
    assert q_out.is_contiguous()
    assert torch.equal(bits(q_out), reference(ql_nope, q_pe))


@pytest.mark.parametrize("call", ENTRY_POINTS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_api_writes_into_given_output(device, dtype, call):
    ql_nope = random_bits((9, 4, 512), dtype, device)
    q_pe = random_bits((9, 4, 64), dtype, device)
    q_out = inside_bigger((9, 4, 576), dtype, device)
    result = check_writes_reference(ql_nope, q_pe, q_out, call=call)
    if call.__name__ == "call_api":
        assert result is q_out
