"""The op's contract on valid inputs, on every device: q_out[t, h] = [ql_nope[t, h] | q_pe[t, h or 0]],
bit for bit as torch.cat gives it, for any strides, and nothing written outside q_out's elements."""

from __future__ import annotations

import pytest
import torch

import vllm_mla_ops
from mla_helpers import ENTRY_POINTS, HALF_DTYPES, LAYOUTS, MODEL_GEOMETRIES, check_writes_reference
from vllm_mla_ops.testing import (
    assert_bitwise_equal,
    contiguous,
    engine_inputs,
    heads_major,
    inside_bigger,
    random_bits,
    reference,
    shifted,
    split_of_wider,
)

# (nope_dim, rope_dim, heads)
GEOMETRIES = MODEL_GEOMETRIES + [
    pytest.param(512, 64, 1, id="512+64x1h"),
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
@pytest.mark.parametrize("case, heads", [("decode", 16), ("decode", 128), ("k_side", 128)])
def test_engine_layouts_match_cat(device, dtype, tokens, case, heads):
    """decode: ql_nope = bmm output [H, T, 512] transposed, q_pe = q[..., 128:192] of q = [T, H, 192];
    k_side: k_nope = kv[..., :128] of kv = [T, H, 256], k_pe = latent[..., 512:] of [T, 1, 576]."""
    ql_nope, q_pe, q_out = engine_inputs(case, tokens, heads, dtype, device)
    if case == "decode":
        assert ql_nope.stride() == (512, tokens * 512, 1) and q_pe.stride() == (heads * 192, 192, 1)
    else:
        assert ql_nope.stride() == (heads * 256, 256, 1) and q_pe.stride() == (576, 576, 1)
    check_writes_reference(ql_nope, q_pe, q_out)


@pytest.mark.parametrize("case, nope_dim, rope_dim, out_layout", [
    pytest.param("decode", 512, 64, contiguous, id="decode"),
    pytest.param("contiguous", 510, 66, shifted(1), id="rows-off-16-bytes"),
])
def test_outputs_over_32_mib_match_cat(device, case, nope_dim, rope_dim, out_layout):
    """q_out of 35 MB, past the size from which the CPU kernel writes with 16-byte streaming stores:
    rows on 16-byte boundaries, and rows that start 2 bytes past one and end off one (the bytes
    around the aligned stores). One dtype: the copy moves bytes."""
    tokens, heads, dtype = 240, 128, torch.bfloat16
    ql_nope, q_pe, _ = engine_inputs(case, tokens, heads, dtype, device, nope_dim=nope_dim, rope_dim=rope_dim)
    q_out = out_layout((tokens, heads, nope_dim + rope_dim), dtype, device)
    assert q_out.numel() * q_out.element_size() > 2**25
    check_writes_reference(ql_nope, q_pe, q_out)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("nope_layout, pe_layout, out_layout", LAYOUTS)
@pytest.mark.parametrize("nope_dim, rope_dim", [(512, 64), (7, 3)], ids=["512+64", "7+3"])
def test_layouts_match_cat(device, dtype, nope_dim, rope_dim, nope_layout, pe_layout, out_layout):
    """The engines' layouts and one of each stride kind (transposed, split, last-dim stride 2,
    offset views with gaps, stride-0 tokens or heads, 1-head q_pe); gaps in q_out's buffer stay
    untouched. tests/test_properties.py draws the other combinations."""
    tokens, heads = 33, 16
    ql_nope = nope_layout((tokens, heads, nope_dim), dtype, device)
    q_pe = pe_layout((tokens, heads, rope_dim), dtype, device)
    q_out = out_layout((tokens, heads, nope_dim + rope_dim), dtype, device)
    check_writes_reference(ql_nope, q_pe, q_out)


@pytest.mark.parametrize("call", ENTRY_POINTS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize(
    "tokens, heads, pe_heads",
    [(0, 16, 16), (0, 16, 1), (5, 0, 0), (5, 0, 1), (0, 0, 1)],
)
def test_empty_writes_nothing(device, dtype, tokens, heads, pe_heads, call):
    """Zero tokens or zero heads: returns, and no byte of q_out's buffer (or the inputs) changes."""
    ql_nope = inside_bigger((tokens, heads, 512), dtype, device)
    q_pe = inside_bigger((tokens, pe_heads, 64), dtype, device)
    q_out = inside_bigger((tokens, heads, 576), dtype, device)
    check_writes_reference(ql_nope, q_pe, q_out, call=call)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("pe_layout", [contiguous, split_of_wider], ids=["pe-1-head", "pe-1-head-split"])
def test_api_allocates_contiguous_output(device, dtype, pe_layout):
    """q_out=None: a new contiguous [T, H, nope + rope] tensor of the inputs' dtype and device."""
    ql_nope = heads_major((37, 16, 512), dtype, device)
    q_pe = pe_layout((37, 1, 64), dtype, device)
    q_out = vllm_mla_ops.concat_mla_q(ql_nope, q_pe)
    assert q_out.shape == (37, 16, 576) and q_out.dtype == dtype and q_out.device == ql_nope.device
    assert q_out.is_contiguous()
    assert_bitwise_equal(q_out, reference(ql_nope, q_pe))


@pytest.mark.parametrize("call", ENTRY_POINTS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_api_writes_into_given_output(device, dtype, call):
    ql_nope = random_bits((9, 4, 512), dtype, device)
    q_pe = random_bits((9, 4, 64), dtype, device)
    q_out = inside_bigger((9, 4, 576), dtype, device)
    check_writes_reference(ql_nope, q_pe, q_out, call=call)
