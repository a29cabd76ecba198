"""The ops' contract on valid inputs, for every op on every device: q_out[t, h] holds the op's
reference of [ql_nope[t, h] | q_pe[t, h or 0]] (torch.cat's bits; for the fp8 op, their static
per-tensor float8_e4m3fn quantization, up to the sign of a NaN) for any strides, and no byte outside
q_out's elements changes; the Python functions follow torch's conventions (a keyword-only ``out=``,
allocated contiguous when not given, returned). CUDA-only promises are in test_cuda.py."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from mla_helpers import (
    CALLS,
    FP8_OPS,
    HALF_DTYPES,
    LAYOUTS,
    MODEL_GEOMETRIES,
    OPS,
    assert_writes_reference,
    call_function_allocating,
    poison,
    scalar,
    valid_args,
)
from vllm_mla_ops.testing import (
    bits,
    contiguous,
    heads_major,
    inside_bigger,
    one_head,
    random_bits,
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


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("tokens", [0, 1, 300])
@pytest.mark.parametrize("nope_dim, rope_dim, heads", GEOMETRIES)
@pytest.mark.parametrize("op", OPS)
def test_contiguous_matches_reference(device, op, nope_dim, rope_dim, heads, tokens, dtype):
    args = valid_args(op, device, dtype=dtype, tokens=tokens, heads=heads, nope_dim=nope_dim, rope_dim=rope_dim)
    assert_writes_reference(op, args)


# (engine layout, nope_dim, rope_dim, heads, tokens): the decode layout at the widths and head
# counts of public MLA models, at 1 and 33 tokens, and at 300 for DeepSeek's 128 heads and their TP8
# share; SGLang's prefill K side at 128 heads.
ENGINE_CASES = [pytest.param("decode", *p.values, tokens, id=f"decode-{p.id}-{tokens}")
                for p in MODEL_GEOMETRIES for tokens in (1, 33, 300)
                if tokens < 300 or p.values[2] in (16, 128)] + [
    pytest.param("k_side", 128, 64, 128, tokens, id=f"k_side-128+64x128h-{tokens}") for tokens in (1, 33, 300)]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case, nope_dim, rope_dim, heads, tokens", ENGINE_CASES)
@pytest.mark.parametrize("op", OPS)
def test_engine_layouts_match_reference(device, op, case, nope_dim, rope_dim, heads, tokens, dtype):
    """decode: ql_nope = the bmm output [H, T, nope] transposed, q_pe = q[..., 128:] of the projected
    q = [T, H, 128 + rope]; k_side: k_nope = kv[..., :128] of kv = [T, H, 256], k_pe =
    latent[..., 512:] of [T, 1, 512 + rope]."""
    args = valid_args(op, device, case=case, dtype=dtype, tokens=tokens, heads=heads, nope_dim=nope_dim,
                      rope_dim=rope_dim)
    if case == "decode":
        assert args["ql_nope"].stride() == (nope_dim, tokens * nope_dim, 1)
        assert args["q_pe"].stride() == (heads * (128 + rope_dim), 128 + rope_dim, 1)
    else:
        assert args["ql_nope"].stride() == (heads * 256, 256, 1) and args["q_pe"].stride() == (576, 576, 1)
    assert_writes_reference(op, args)


# Scales the layout test runs each layout at (q_out re-poisoned for each), for the ops that quantize.
FEW_SCALES = (1.0, 0.0037, 100.0, 1e-40)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("nope_layout, pe_layout, out_layout", LAYOUTS)
@pytest.mark.parametrize("nope_dim, rope_dim", [(512, 64), (7, 3)], ids=["512+64", "7+3"])
@pytest.mark.parametrize("op", OPS)
def test_layouts_match_reference(device, op, nope_dim, rope_dim, nope_layout, pe_layout, out_layout, dtype):
    """The engines' layouts and one of each stride kind (transposed, split, last-dim stride 2,
    offset views with gaps, stride-0 tokens or heads, 1-head q_pe); gaps in q_out's buffer stay
    untouched. The ops that quantize run each layout at a few scales. tests/test_properties.py
    draws the other combinations."""
    args = valid_args(op, device, dtype=dtype, tokens=33, heads=16, nope_dim=nope_dim, rope_dim=rope_dim,
                      layouts=(nope_layout, pe_layout, out_layout))
    for value in FEW_SCALES if op.scale else (None,):
        if value is not None:
            args[op.scale] = scalar(value, device)
            poison(args[op.out])
        assert_writes_reference(op, args)


def _last_level_cache_bytes() -> int:
    """The size of the L3 that CPU 0 belongs to, as Linux reports it in sysfs (what the CPU kernels'
    size rules compare against); 32 MiB where it lists none."""
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "level").read_text().strip() == "3":
                size = (index / "size").read_text().strip()
                return int(size[:-1]) << {"K": 10, "M": 20}[size[-1]]
        except (OSError, ValueError, KeyError):
            break
    return 32 << 20


@pytest.mark.parametrize("case, nope_dim, rope_dim, out_layout", [
    pytest.param("decode", 512, 64, contiguous, id="decode"),
    pytest.param("contiguous", 510, 66, shifted(1), id="rows-off-16-bytes"),
])
@pytest.mark.parametrize("op", OPS)
def test_calls_past_the_last_level_cache_match_reference(device, op, case, nope_dim, rope_dim, out_layout):
    """Calls past the last-level cache, the sizes of the CPU kernels' two size rules: a call whose
    reads and writes outgrow it walks the decode layout's rows in ql_nope's memory order, and a copy
    (q_out of the inputs' dtype) whose output alone outgrows it writes with 16-byte streaming
    stores: rows on 16-byte boundaries, and rows that start 2 bytes past one and end off one (the
    bytes around the aligned stores). One dtype: the copy moves bytes, and the quantizing ops'
    conversion of each dtype is the other tests'."""
    heads, dtype = 128, torch.bfloat16
    out_dtype = op.out_dtype(dtype)
    width = nope_dim + rope_dim
    row_bytes = heads * width * out_dtype.itemsize
    if out_dtype != dtype:  # no streaming stores: the reads and writes together pass the cache
        row_bytes += heads * width * dtype.itemsize
    tokens = _last_level_cache_bytes() // row_bytes + 8
    args = valid_args(op, device, case=case, dtype=dtype, tokens=tokens, heads=heads, nope_dim=nope_dim,
                      rope_dim=rope_dim)
    args[op.out] = out_layout((tokens, heads, width), out_dtype, device)
    assert tokens * row_bytes > _last_level_cache_bytes()
    assert_writes_reference(op, args)


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("nope_dim, rope_dim", [(0, 5), (6, 0), (1, 1), (12, 4)])
@pytest.mark.parametrize("op", OPS)
def test_degenerate_widths(device, op, nope_dim, rope_dim, call):
    """Empty or one-element halves, into a q_out with gaps around it."""
    args = valid_args(op, device, tokens=5, heads=3, nope_dim=nope_dim, rope_dim=rope_dim,
                      layouts=(random_bits, random_bits, inside_bigger))
    assert_writes_reference(op, args, call=call)


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("tokens, heads, pe_heads", [(0, 16, 16), (0, 16, 1), (5, 0, 0), (5, 0, 1), (0, 0, 1)])
@pytest.mark.parametrize("op", OPS)
def test_empty_writes_nothing(device, op, tokens, heads, pe_heads, dtype, call):
    """Zero tokens or zero heads: returns, and no byte of q_out's buffer (or the inputs) changes,
    whatever the scale (NaN here)."""
    args = valid_args(op, device, dtype=dtype, tokens=tokens, heads=heads, nope_dim=512, rope_dim=64,
                      pe_heads=pe_heads, layouts=(inside_bigger, inside_bigger, inside_bigger), scale=float("nan"))
    assert_writes_reference(op, args, call=call)


# ---------------------------------------------------------------------------- the Python functions


@pytest.mark.parametrize("op", OPS)
def test_function_signature_follows_torch(op):
    """The tensors the op reads, positional in schema order, then a keyword-only ``out=None``, as
    torch.cat(tensors, dim, *, out=None) has it."""
    parameters = list(inspect.signature(op.function).parameters.values())
    assert [p.name for p in parameters] == [name for name in op.arg_names if name != op.out] + ["out"]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in parameters[:-1])
    assert parameters[-1].kind is parameters[-1].KEYWORD_ONLY and parameters[-1].default is None


@pytest.mark.parametrize("op", OPS)
def test_function_refuses_out_given_positionally(op):
    """``out`` is keyword-only: passing it in the old positional slot is a TypeError, not a tensor
    silently taken for another argument."""
    args = valid_args(op)
    with pytest.raises(TypeError):
        op.function(*(value for name, value in args.items() if name != op.out), args[op.out])


@pytest.mark.parametrize("pe_layout, pe_heads", [
    pytest.param(one_head, 1, id="pe-1-head"),
    pytest.param(split_of_wider, 1, id="pe-1-head-split"),
    pytest.param(split_of_wider, 16, id="pe-split"),
])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_function_allocates_a_contiguous_output(device, op, dtype, pe_layout, pe_heads):
    """out=None: a new contiguous [T, H, nope + rope] tensor of the op's q_out dtype on the inputs'
    device, holding the reference."""
    args = valid_args(op, device, dtype=dtype, tokens=37, heads=16, nope_dim=512, rope_dim=64, pe_heads=pe_heads,
                      layouts=(heads_major, pe_layout, random_bits))
    result = call_function_allocating(op, args)
    assert result.shape == (37, 16, 576) and result.dtype == op.out_dtype(dtype)
    assert result.device == args["ql_nope"].device and result.is_contiguous()
    op.compare(result, op.reference(args)[op.out], "the allocated out")


@pytest.mark.parametrize("pe_heads", [4, 1])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_function_writes_into_the_given_out_and_returns_it(device, op, dtype, pe_heads):
    args = valid_args(op, device, dtype=dtype, tokens=9, heads=4, nope_dim=512, rope_dim=64, pe_heads=pe_heads,
                      layouts=(random_bits, random_bits, inside_bigger))
    assert assert_writes_reference(op, args, call=CALLS[1].values[0]) is args[op.out]


# ------------------------------------------------------------------------------- quantization
# The ops with a static fp8 scale: every input bit pattern and every kind of output, at scales whose
# reciprocal is inexact, infinite, subnormal or NaN, and any one-element float32 tensor as the scale.

# The reference's scale.reciprocal() may be inf (tiny scales: then 0 * inf gives NaN) or subnormal
# (huge scales); the contract is the reference whatever it gives. Scale 1 is test_every_output_kind's.
SCALES = [
    pytest.param(1 / 448, id="1_448"),           # |x| > 1 saturates
    pytest.param(0.0037, id="0.0037"),           # inexact reciprocal, many saturate
    pytest.param(100.0, id="100"),               # many e4m3 subnormals and zeros
    pytest.param(1e-30, id="1e-30"),             # reciprocal 1e30: nearly all saturate
    pytest.param(2.0 ** -126, id="min-normal"),  # reciprocal 2^126
    pytest.param(1e-40, id="subnormal"),         # reciprocal inf: zeros become NaN
    pytest.param(3e-39, id="subnormal-finite"),  # reciprocal 3.3e38: a flushed-to-zero scale would differ
    pytest.param(3e38, id="huge"),               # reciprocal subnormal
    pytest.param(0.0, id="zero"),                # reciprocal inf
    pytest.param(float("inf"), id="inf"),        # reciprocal 0: NaN for inf inputs
    pytest.param(-2.5, id="negative"),
    pytest.param(float("nan"), id="nan"),        # everything NaN
]


def _every_bit_pattern(dtype, device) -> torch.Tensor:
    """The 65536 bit patterns of a 16-bit dtype as a [64, 2, 512] tensor."""
    patterns = torch.arange(-32768, 32768, dtype=torch.int32, device=device).to(torch.int16)
    return patterns.view(dtype).view(64, 2, 512)


@pytest.mark.parametrize("scale_value", SCALES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("op", FP8_OPS)
def test_every_bit_pattern(device, op, dtype, scale_value):
    """All 65536 bit patterns of the input dtype (NaNs, infs, subnormals, saturating values) as
    ql_nope, random bits as q_pe, q_out of random bits."""
    args = valid_args(op, device, dtype=dtype, tokens=64, heads=2, nope_dim=512, rope_dim=64, scale=scale_value)
    args["ql_nope"] = _every_bit_pattern(dtype, device)
    assert_writes_reference(op, args)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("op", FP8_OPS)
def test_every_output_kind(device, op, dtype):
    """At scale 1 the op turns the 65536 input patterns into each kind of e4m3 output, hundreds of
    times each: saturated +-448, NaN, +-0 and subnormals, all of them the reference's bytes."""
    args = valid_args(op, device, dtype=dtype, tokens=64, heads=2, nope_dim=512, rope_dim=0, scale=1.0)
    args["ql_nope"] = _every_bit_pattern(dtype, device)
    assert_writes_reference(op, args)
    magnitude = bits(args[op.out]) & 0x7F
    for name, mask in (("saturated", magnitude == 0x7E), ("NaN", magnitude == 0x7F), ("zero", magnitude == 0),
                       ("subnormal", (magnitude > 0) & (magnitude < 8))):
        assert int(mask.sum()) > 100, name


@pytest.mark.parametrize("make", [
    pytest.param(lambda d: torch.tensor(0.0037, device=d), id="0-dim"),
    pytest.param(lambda d: torch.full((1, 1, 1), 0.0037, device=d), id="1x1x1"),
    pytest.param(lambda d: torch.tensor([7.0, 0.0037, 5.0], device=d)[1:2], id="offset-view"),
    pytest.param(lambda d: torch.tensor([7.0, 0.0037], device=d).as_strided((1, 1), (0, 0), 1), id="stride-0-offset"),
])
@pytest.mark.parametrize("op", FP8_OPS)
def test_scale_forms(device, op, make):
    """Any one-element float32 tensor is a scale: 0-dim, several dims, a view with an offset."""
    args = valid_args(op, device, tokens=9, heads=16, nope_dim=512, rope_dim=64)
    args[op.scale] = make(device)
    assert args[op.scale].numel() == 1 and args[op.scale].item() == pytest.approx(0.0037)
    assert_writes_reference(op, args)


@pytest.mark.parametrize("op", FP8_OPS)
def test_scale_in_a_gap_of_q_out(device, op):
    """The scale may live in bytes of q_out's buffer that q_out does not address (a gap between its
    rows): accepted, and the scale's bytes survive."""
    args = valid_args(op, device, dtype=torch.float16)
    tokens, heads, width = args[op.out].shape
    row_bytes = width * args[op.out].element_size()
    buf = random_bits((tokens * heads * 2 * row_bytes,), torch.uint8, device)
    args[op.out] = buf.view(args[op.out].dtype).view(tokens, heads, 2 * width)[..., :width]
    args[op.scale] = buf[row_bytes : row_bytes + 4].view(torch.float32)  # the gap after row 0
    args[op.scale].fill_(0.0037)
    assert_writes_reference(op, args)
