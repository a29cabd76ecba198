"""concat_mla_q_fp8: the concat fused with static per-tensor float8_e4m3fn quantization.

The contract is bit-exact against the reference
``(torch.cat((ql_nope, q_pe.expand(T, H, R)), -1).float() * scale.reciprocal()).clamp(-448, 448)
.to(torch.float8_e4m3fn)`` compared as raw bytes; the one freedom is the sign bit of a NaN output
(where the reference is NaN, ours must be NaN too). Every check also asserts that no byte outside
q_out's elements changed (gaps of a strided q_out, the inputs, the scale), and every rejected call
that nothing changed at all. The scale is read on the device at run time (CUDA graphs replay with
its value of the moment)."""

from __future__ import annotations

import pytest
import torch

import vllm_mla_ops
from mla_helpers import (
    ALIGNMENTS,
    ENTRY_POINTS,
    FP8,
    HALF_DTYPES,
    LAUNCH_PATHS,
    LAYOUTS,
    MODEL_GEOMETRIES,
    ROW_COUNTS,
    WIDTHS,
    call_api,
    call_op,
    check_rejected,
    check_writes_reference,
    scalar,
    tokens_for,
)
from vllm_mla_ops.testing import (
    assert_fp8_equal,
    bits,
    contiguous,
    engine_inputs,
    heads_major,
    inside_bigger,
    one_head,
    random_bits,
    reference_fp8,
    split_of_wider,
)


def poison(q_out: torch.Tensor) -> None:
    """Fresh random bytes in q_out's elements (written as raw bytes: no float8 arithmetic involved)."""
    bits(q_out).copy_(random_bits(q_out.shape, torch.uint8, q_out.device))

# ------------------------------------------------------------------------------ scales

# Scales and what they exercise. The reference's scale.reciprocal() may be inf (tiny scales: then
# 0 * inf gives NaN) or subnormal (huge scales); the contract is the reference whatever it gives.
# Scale 1 is test_every_output_kind's.
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
FEW_SCALES = (1.0, 0.0037, 100.0, 1e-40)


@pytest.mark.parametrize("scale_value", SCALES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_every_bit_pattern(device, dtype, scale_value):
    """All 65536 bit patterns of the input dtype (NaNs, infs, subnormals, saturating values) as
    ql_nope, random bits as q_pe, q_out poisoned."""
    ql_nope = torch.arange(-32768, 32768, dtype=torch.int32, device=device).to(torch.int16)
    ql_nope = ql_nope.view(dtype).view(64, 2, 512)
    q_pe = random_bits((64, 2, 64), dtype, device)
    q_out = contiguous((64, 2, 576), FP8, device)
    check_writes_reference(ql_nope, q_pe, q_out, scalar(scale_value, device))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_every_output_kind(device, dtype):
    """At scale 1 the op turns the 65536 input patterns into each kind of e4m3 output, hundreds of
    times each: saturated +-448, NaN, +-0 and subnormals, all of them the reference's bytes."""
    ql_nope = torch.arange(-32768, 32768, dtype=torch.int32, device=device).to(torch.int16)
    ql_nope = ql_nope.view(dtype).view(64, 2, 512)
    q_out = contiguous((64, 2, 512), FP8, device)
    check_writes_reference(ql_nope, ql_nope[..., :0], q_out, scalar(1.0, device))
    magnitude = bits(q_out) & 0x7F
    for name, mask in (("saturated", magnitude == 0x7E), ("NaN", magnitude == 0x7F), ("zero", magnitude == 0),
                       ("subnormal", (magnitude > 0) & (magnitude < 8))):
        assert int(mask.sum()) > 100, name

# ------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("nope_layout, pe_layout, out_layout", LAYOUTS)
@pytest.mark.parametrize("nope_dim, rope_dim", [(512, 64), (7, 3)], ids=["512+64", "7+3"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_layouts_match_reference(device, dtype, nope_dim, rope_dim, nope_layout, pe_layout, out_layout):
    """The engines' layouts and one of each stride kind, at a few scales (q_out re-poisoned for
    each); tests/test_properties.py draws the other combinations."""
    tokens, heads = 33, 16
    ql_nope = nope_layout((tokens, heads, nope_dim), dtype, device)
    q_pe = pe_layout((tokens, heads, rope_dim), dtype, device)
    q_out = out_layout((tokens, heads, nope_dim + rope_dim), FP8, device)
    for value in FEW_SCALES:
        poison(q_out)
        check_writes_reference(ql_nope, q_pe, q_out, scalar(value, device))


@pytest.mark.parametrize("tokens", [1, 33])
@pytest.mark.parametrize("nope_dim, rope_dim, heads", MODEL_GEOMETRIES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_model_geometries_match_reference(device, dtype, nope_dim, rope_dim, heads, tokens):
    """The decode layout at the widths and head counts of public MLA models."""
    ql_nope, q_pe, q_out = engine_inputs("decode", tokens, heads, dtype, device, nope_dim, rope_dim, out_dtype=FP8)
    check_writes_reference(ql_nope, q_pe, q_out, scalar(0.0037, device))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("nope_dim, rope_dim", [(0, 5), (6, 0), (1, 1), (12, 4)])
def test_degenerate_widths(device, entry, nope_dim, rope_dim):
    ql_nope = random_bits((5, 3, nope_dim), torch.bfloat16, device)
    q_pe = random_bits((5, 3, rope_dim), torch.bfloat16, device)
    q_out = inside_bigger((5, 3, nope_dim + rope_dim), FP8, device)
    check_writes_reference(ql_nope, q_pe, q_out, scalar(0.0037, device), call=entry)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("shape", [(0, 16), (7, 0), (0, 0)], ids=["0-tokens", "0-heads", "0-both"])
def test_empty_writes_nothing(device, entry, shape):
    """Zero tokens or heads: no error, no byte written anywhere (q_out is a view into a buffer)."""
    tokens, heads = shape
    ql_nope = heads_major((tokens, heads, 512), torch.float16, device)
    q_pe = one_head((tokens, heads, 64), torch.float16, device)
    q_out = inside_bigger((tokens, heads, 576), FP8, device)
    check_writes_reference(ql_nope, q_pe, q_out, scalar(float("nan"), device), call=entry)


@pytest.mark.parametrize("make", [
    pytest.param(lambda d: torch.tensor(0.0037, device=d), id="0-dim"),
    pytest.param(lambda d: torch.full((1, 1, 1), 0.0037, device=d), id="1x1x1"),
    pytest.param(lambda d: torch.tensor([7.0, 0.0037, 5.0], device=d)[1:2], id="offset-view"),
    pytest.param(lambda d: torch.tensor([7.0, 0.0037], device=d).as_strided((1, 1), (0, 0), 1), id="stride-0-offset"),
])
def test_scale_forms(device, make):
    """Any one-element float32 tensor is a scale: 0-dim, several dims, a view with an offset."""
    scale = make(device)
    assert scale.numel() == 1 and scale.item() == pytest.approx(0.0037)
    ql_nope = random_bits((9, 16, 512), torch.bfloat16, device)
    q_pe = random_bits((9, 16, 64), torch.bfloat16, device)
    q_out = contiguous((9, 16, 576), FP8, device)
    check_writes_reference(ql_nope, q_pe, q_out, scale)


def test_scale_in_a_gap_of_q_out(device):
    """The scale may live in bytes of q_out's buffer that q_out does not address (a gap between its
    rows): accepted, and the scale's bytes survive."""
    tokens, heads, nope_dim, rope_dim = 6, 4, 12, 4
    width = nope_dim + rope_dim
    buf = random_bits((tokens * heads * 2 * width,), torch.uint8, device)
    q_out = buf.view(FP8).view(tokens, heads, 2 * width)[..., :width]
    scale = buf[width : width + 4].view(torch.float32)  # the gap after row 0
    scale.fill_(0.0037)
    ql_nope = random_bits((tokens, heads, nope_dim), torch.float16, device)
    q_pe = random_bits((tokens, heads, rope_dim), torch.float16, device)
    check_writes_reference(ql_nope, q_pe, q_out, scale)


def test_q_out_shares_a_buffer_with_the_inputs(device):
    """q_out in distinct bytes of the inputs' own buffer: accepted, the inputs survive."""
    tokens, heads, nope_dim, rope_dim = 5, 3, 16, 8
    n_bytes, p_bytes = tokens * heads * nope_dim * 2, tokens * heads * rope_dim * 2
    buf = random_bits((n_bytes + p_bytes + tokens * heads * (nope_dim + rope_dim),), torch.uint8, device)
    ql_nope = buf[:n_bytes].view(torch.bfloat16).view(tokens, heads, nope_dim)
    q_pe = buf[n_bytes : n_bytes + p_bytes].view(torch.bfloat16).view(tokens, heads, rope_dim)
    q_out = buf[n_bytes + p_bytes :].view(FP8).view(tokens, heads, nope_dim + rope_dim)
    scale = scalar(0.5, device)
    check_writes_reference(ql_nope, q_pe, q_out, scale)

# ------------------------------------------------------------------------------ Python API


def test_api_allocates_float8_output(device):
    ql_nope = heads_major((7, 16, 512), torch.bfloat16, device)
    q_pe = split_of_wider((7, 16, 64), torch.bfloat16, device)
    scale = scalar(0.0037, device)
    q_out = vllm_mla_ops.concat_mla_q_fp8(ql_nope, q_pe, scale)
    assert q_out.dtype == FP8 and q_out.shape == (7, 16, 576) and q_out.device == ql_nope.device
    assert_fp8_equal(q_out, reference_fp8(ql_nope, q_pe, scale))


def test_api_returns_given_output(device):
    ql_nope = random_bits((3, 4, 12), torch.float16, device)
    q_pe = one_head((3, 4, 4), torch.float16, device)
    q_out = inside_bigger((3, 4, 16), FP8, device)
    check_writes_reference(ql_nope, q_pe, q_out, scalar(2.0, device), call=call_api)


def test_api_bad_rank_raises_the_ops_error(device):
    """With q_out=None and a bad rank, the allocation does not mask the op's rank error."""
    args = (random_bits((3, 12), torch.float16, device), random_bits((3, 4, 4), torch.float16, device),
            scalar(1.0, device))
    check_rejected(args, "concat_mla_q_fp8: ql_nope must be 3-D", call=vllm_mla_ops.concat_mla_q_fp8)

# ------------------------------------------------------------------------------ guards

T, H, N, R = 6, 4, 12, 4
W = N + R


def _valid(device, dtype=torch.float16):
    return (random_bits((T, H, N), dtype, device), random_bits((T, H, R), dtype, device),
            inside_bigger((T, H, W), FP8, device), scalar(0.5, device))


def _replace(which, make, message):
    def case(device):
        args = dict(zip(("ql_nope", "q_pe", "q_out", "scale"), _valid(device)))
        args[which] = make(device)
        return (*args.values(), message)
    return case


def _overlap_out_nope(device):
    """q_out (fp8) over the last bytes of ql_nope (fp16), in one uint8 buffer."""
    buf = random_bits((T * H * N * 2 + T * H * W,), torch.uint8, device)
    ql_nope = buf[: T * H * N * 2].view(torch.float16).view(T, H, N)
    q_out = buf[T * H * N * 2 - 1 : -1].view(FP8).view(T, H, W)
    return (ql_nope, random_bits((T, H, R), torch.float16, device), q_out, scalar(0.5, device),
            "concat_mla_q_fp8: q_out must not overlap ql_nope in memory")


def _overlap_out_pe_expanded(device):
    """q_out's storage holds an expanded 1-head q_pe row: shared bytes through a stride-0 view."""
    q_out = contiguous((T, H, W), FP8, device)
    q_pe = q_out.view(torch.uint8)[2, 1, 8 : 8 + 2 * R].view(torch.float16).view(1, 1, R).expand(T, 1, R)
    return (random_bits((T, H, N), torch.float16, device), q_pe, q_out, scalar(0.5, device),
            "concat_mla_q_fp8: q_out must not overlap q_pe in memory")


def _overlap_out_scale(offset):
    """scale (float32) is bytes [0, 4) of a uint8 buffer; q_out (fp8) starts at byte `offset` of it,
    so they share 4 - offset bytes (offset 3: one byte)."""
    def case(device):
        buf = random_bits((4 + T * H * W,), torch.uint8, device)
        scale = buf[:4].view(torch.float32)
        scale.fill_(0.5)
        q_out = buf[offset : offset + T * H * W].view(FP8).view(T, H, W)
        return (random_bits((T, H, N), torch.float16, device), random_bits((T, H, R), torch.float16, device),
                q_out, scale, "concat_mla_q_fp8: q_out must not overlap scale in memory")
    return case


def _overlap_out_scale_strided(device):
    """q_out strided (every other byte), scale's 4 bytes straddle one of q_out's elements."""
    buf = random_bits((8 + 2 * T * H * W,), torch.uint8, device)
    q_out = buf[4:].view(FP8)[: 2 * T * H * W : 2].view(T, H, W)  # bytes 4, 6, 8, ...
    scale = buf[8:12].view(torch.float32)  # bytes 8..11: q_out's elements 2 and 3
    scale.fill_(0.5)
    return (random_bits((T, H, N), torch.float16, device), random_bits((T, H, R), torch.float16, device),
            q_out, scale, "concat_mla_q_fp8: q_out must not overlap scale in memory")


F = "concat_mla_q_fp8: "
GUARDS = [
    pytest.param(_replace("ql_nope", lambda d: random_bits((T, H, N), torch.float32, d),
                          F + "ql_nope must be float16 or bfloat16 dtype, got torch.float32"), id="nope-float32"),
    pytest.param(_replace("ql_nope", lambda d: random_bits((T, H, N), FP8, d),
                          F + "ql_nope must be float16 or bfloat16 dtype, got torch.float8_e4m3fn"),
                 id="nope-float8"),
    pytest.param(_replace("q_pe", lambda d: random_bits((T, H, R), torch.bfloat16, d),
                          F + "q_pe must have ql_nope's dtype torch.float16, got torch.bfloat16"), id="pe-bf16"),
    pytest.param(_replace("q_out", lambda d: random_bits((T, H, W), torch.float16, d),
                          F + "q_out must be torch.float8_e4m3fn, got torch.float16"), id="out-fp16"),
    pytest.param(_replace("q_out", lambda d: random_bits((T, H, W), torch.bfloat16, d),
                          F + "q_out must be torch.float8_e4m3fn, got torch.bfloat16"), id="out-bf16"),
    pytest.param(_replace("q_out", lambda d: random_bits((T, H, W), torch.float8_e5m2, d),
                          F + "q_out must be torch.float8_e4m3fn, got torch.float8_e5m2"), id="out-e5m2"),
    pytest.param(_replace("q_out", lambda d: random_bits((T, H, W), torch.uint8, d),
                          F + "q_out must be torch.float8_e4m3fn, got torch.uint8"), id="out-uint8"),
    pytest.param(_replace("scale", lambda d: torch.tensor([0.5], dtype=torch.float16, device=d),
                          F + "scale must be a torch.float32 tensor, got torch.float16"), id="scale-fp16"),
    pytest.param(_replace("scale", lambda d: torch.tensor([0.5], dtype=torch.float64, device=d),
                          F + "scale must be a torch.float32 tensor, got torch.float64"), id="scale-fp64"),
    pytest.param(_replace("scale", lambda d: torch.tensor([0.5, 0.25], device=d),
                          F + "scale must have one element (a per-tensor scale), got shape [2]"), id="scale-2"),
    pytest.param(_replace("scale", lambda d: torch.empty(0, device=d),
                          F + "scale must have one element (a per-tensor scale), got shape [0]"), id="scale-0"),
    pytest.param(_replace("scale", lambda d: torch.full((T,), 0.5, device=d),
                          F + "scale must have one element (a per-tensor scale), got shape [6]"),
                 id="scale-per-token"),
    pytest.param(_replace("ql_nope", lambda d: random_bits((T, N), torch.float16, d),
                          F + "ql_nope must be 3-D [tokens, heads, nope_dim], got 2-D with shape [6, 12]"),
                 id="nope-2d"),
    pytest.param(_replace("q_out", lambda d: random_bits((T, H, 1, W), FP8, d),
                          F + "q_out must be 3-D [tokens, heads, nope_dim + rope_dim], got 4-D"), id="out-4d"),
    pytest.param(_replace("q_pe", lambda d: random_bits((T, 2, R), torch.float16, d),
                          F + f"q_pe must be [tokens, heads or 1, rope_dim] with tokens={T} and heads={H} "
                          "from ql_nope, got shape [6, 2, 4]"), id="pe-2-heads"),
    pytest.param(_replace("q_out", lambda d: random_bits((T, H, W - 1), FP8, d),
                          F + f"q_out must be [tokens, heads, nope_dim + rope_dim] = [{T}, {H}, {W}], "
                          f"got shape [{T}, {H}, {W - 1}]"), id="out-narrow"),
    pytest.param(_replace("q_out", lambda d: random_bits((T + 1, H, W), FP8, d),
                          F + f"q_out must be [tokens, heads, nope_dim + rope_dim] = [{T}, {H}, {W}], "
                          f"got shape [{T + 1}, {H}, {W}]"), id="out-more-tokens"),
    pytest.param(_replace("q_out", lambda d: random_bits((1, H, W), FP8, d).expand(T, H, W),
                          F + "q_out must not overlap itself"), id="out-self-overlap"),
    pytest.param(_overlap_out_nope, id="out-overlaps-nope"),
    pytest.param(_overlap_out_pe_expanded, id="out-overlaps-expanded-pe"),
    pytest.param(_overlap_out_scale(0), id="out-overlaps-scale"),
    pytest.param(_overlap_out_scale(3), id="out-overlaps-scale-by-1-byte"),
    pytest.param(_overlap_out_scale_strided, id="strided-out-overlaps-scale"),
]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case", GUARDS)
def test_guard_rejects_and_writes_nothing(device, case, entry):
    *args, message = case(device)
    check_rejected(args, message, call=entry)


def test_scale_just_outside_q_out_is_accepted(device):
    """Byte-exact overlap: scale in bytes [0, 4), q_out from byte 4 on (adjacent) is fine."""
    buf = random_bits((4 + T * H * W,), torch.uint8, device)
    scale = buf[:4].view(torch.float32)
    scale.fill_(0.0037)
    q_out = buf[4:].view(FP8).view(T, H, W)
    check_writes_reference(random_bits((T, H, N), torch.float16, device),
                           random_bits((T, H, R), torch.float16, device), q_out, scale)


@pytest.mark.cuda
@pytest.mark.parametrize("where", ["scale-on-cpu", "inputs-on-cpu"])
def test_scale_on_another_device_raises(where):
    if where == "scale-on-cpu":
        ql_nope, q_pe, q_out, _ = _valid("cuda")
        scale, message = scalar(0.5, "cpu"), F + "scale must be on ql_nope's device cuda:0, got cpu"
    else:
        ql_nope, q_pe, q_out, _ = _valid("cpu")
        scale, message = scalar(0.5, "cuda"), F + "scale must be on ql_nope's device cpu, got cuda:0"
    check_rejected((ql_nope, q_pe, q_out, scale), message)


def test_schema():
    assert str(torch.ops._C.concat_mla_q_fp8.default._schema) == (
        "_C::concat_mla_q_fp8(Tensor ql_nope, Tensor q_pe, Tensor(a!) q_out, Tensor scale) -> ()")


# ------------------------------------------------------------------------------ CUDA only


@pytest.mark.cuda
@pytest.mark.parametrize("pe_layout", [split_of_wider, one_head], ids=["pe-split", "pe-1-head"])
def test_cuda_graph_reads_scale_at_replay(pe_layout):
    """Captured once; each replay uses the value scale holds then (changed in place with fill_) and
    the values then in the input buffers; q_out re-poisoned before every replay."""
    tokens, heads, dtype = 64, 16, torch.bfloat16
    ql_nope = heads_major((tokens, heads, 512), dtype, "cuda")
    q_pe = pe_layout((tokens, heads, 64), dtype, "cuda")
    q_out = inside_bigger((tokens, heads, 576), FP8, "cuda")
    scale = scalar(1.0, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture
        call_op(ql_nope, q_pe, q_out, scale)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call_op(ql_nope, q_pe, q_out, scale)

    def replay(*_):
        graph.replay()
        torch.cuda.synchronize()

    for i, value in enumerate((0.0037, 100.0, 1.0, 1e-40, 1 / 448)):
        scale.fill_(value)
        if i % 2:
            ql_nope.copy_(random_bits(ql_nope.shape, dtype, "cuda"))
            q_pe.copy_(random_bits(q_pe.shape, dtype, "cuda"))
        poison(q_out)
        check_writes_reference(ql_nope, q_pe, q_out, scale, call=replay)


@pytest.mark.cuda
def test_runs_on_the_current_stream_without_syncing():
    """With the default stream held busy, the op issued on a side stream has run once that stream is
    done (queued there, not on the default stream); it used the scale value written just before it
    on that stream; and issuing both made no synchronizing call (the scale is not read on the host)."""
    ql_nope, q_pe, q_out = engine_inputs("decode", 300, 16, torch.float16, "cuda", out_dtype=FP8)
    scale = scalar(1.0, "cuda")
    expected = reference_fp8(ql_nope, q_pe, scalar(0.0037, "cuda"))
    landed = torch.empty(expected.shape, dtype=torch.uint8, pin_memory=True)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(1 << 30)  # about half a second of GPU clock cycles, on the default stream
    with torch.cuda.stream(side):
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            torch.cuda._sleep(1 << 24)  # the side stream is busy too when the scale update is queued
            scale.fill_(0.0037)
            call_op(ql_nope, q_pe, q_out, scale)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        landed.copy_(q_out.view(torch.uint8), non_blocking=True)
    side.synchronize()
    default_still_busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert_fp8_equal(landed.view(FP8), expected.cpu())
    if not default_still_busy:  # e.g. under compute-sanitizer, where the side stream ran slower
        pytest.skip("inconclusive: the default stream finished first, so this run cannot tell the streams apart")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("elements", LAUNCH_PATHS)
@pytest.mark.parametrize("nope_dim, rope_dim", WIDTHS)
@pytest.mark.parametrize("nope_layout, pe_layout, out_layout", ALIGNMENTS)
def test_misaligned_and_odd_widths(nope_layout, pe_layout, out_layout, nope_dim, rope_dim, elements, dtype):
    """Every pack width that alignment and widths select, at a small and a large q_out, for both
    input dtypes (each converts to e4m3 its own way)."""
    heads = 128
    tokens = tokens_for(elements, heads, nope_dim + rope_dim)
    ql_nope = nope_layout((tokens, heads, nope_dim), dtype, "cuda")
    q_pe = pe_layout((tokens, heads, rope_dim), dtype, "cuda")
    q_out = out_layout((tokens, heads, nope_dim + rope_dim), FP8, "cuda")
    check_writes_reference(ql_nope, q_pe, q_out, scalar(0.0037, "cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("tokens, heads", ROW_COUNTS)
@pytest.mark.parametrize("case", ["decode", "k_side"])
def test_row_counts_match_reference(case, tokens, heads, dtype):
    """Every launch path and the boundaries between them (ROW_COUNTS), in the engines' layouts."""
    ql_nope, q_pe, q_out = engine_inputs(case, tokens, heads, dtype, "cuda", out_dtype=FP8)
    check_writes_reference(ql_nope, q_pe, q_out, scalar(0.0037, "cuda"))
