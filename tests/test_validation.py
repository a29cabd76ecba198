"""Bad inputs: each one raises RuntimeError with the validator's message before anything is written
(every byte of q_out's buffer and of the inputs stays as it was). Memory overlap is decided exactly:
q_out overlapping itself or an input is refused, distinct regions of one buffer are accepted."""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest
import torch

import vllm_mla_ops
from mla_helpers import ENTRY_POINTS, HALF_DTYPES, check_rejected, check_writes_reference
from vllm_mla_ops.testing import random_bits

T, H, N, R = 6, 4, 12, 4
W = N + R


def _other(dtype):
    return torch.bfloat16 if dtype == torch.float16 else torch.float16


def _name(dtype):
    return str(dtype)  # "torch.float16", the spelling of the messages


def _valid(device, dtype):
    return (random_bits((T, H, N), dtype, device), random_bits((T, H, R), dtype, device),
            random_bits((T, H, W), dtype, device))


# Each case: (device, dtype) -> (ql_nope, q_pe, q_out, message that the error must contain).
def _nope_dtype(bad):
    def case(device, dtype):
        return (random_bits((T, H, N), bad, device), random_bits((T, H, R), bad, device),
                random_bits((T, H, W), bad, device),
                f"concat_mla_q: ql_nope must be float16 or bfloat16 dtype, got {_name(bad)}")
    return case


def _nope_dtype_alone(bad):
    """Only ql_nope has the bad dtype; the guard names it even though q_pe and q_out are half."""
    def case(device, dtype):
        ql_nope, q_pe, q_out = _valid(device, dtype)
        return (random_bits((T, H, N), bad, device), q_pe, q_out,
                f"ql_nope must be float16 or bfloat16 dtype, got {_name(bad)}")
    return case


def _partner_dtype(name, bad):
    """q_pe or q_out (name) of a bad dtype (None: the other half dtype); the rest valid."""
    index, shape = {"q_pe": (1, (T, H, R)), "q_out": (2, (T, H, W))}[name]

    def case(device, dtype):
        bad_dtype = _other(dtype) if bad is None else bad
        args = list(_valid(device, dtype))
        args[index] = random_bits(shape, bad_dtype, device)
        return (*args, f"concat_mla_q: {name} must have ql_nope's dtype {_name(dtype)}, got {_name(bad_dtype)}")
    return case


def _rank(which, shape):
    dims = {"ql_nope": "[tokens, heads, nope_dim]", "q_pe": "[tokens, heads or 1, rope_dim]",
            "q_out": "[tokens, heads, nope_dim + rope_dim]"}[which]

    def case(device, dtype):
        args = dict(zip(("ql_nope", "q_pe", "q_out"), _valid(device, dtype)))
        args[which] = random_bits(shape, dtype, device)
        return (*args.values(), f"concat_mla_q: {which} must be 3-D {dims}, got {len(shape)}-D with shape")
    return case


def _pe_shape(shape):
    def case(device, dtype):
        ql_nope, _, q_out = _valid(device, dtype)
        return (ql_nope, random_bits(shape, dtype, device), q_out,
                f"concat_mla_q: q_pe must be [tokens, heads or 1, rope_dim] with tokens={T} and heads={H} "
                f"from ql_nope, got shape [{shape[0]}, {shape[1]}, {shape[2]}]")
    return case


def _out_shape(shape):
    def case(device, dtype):
        ql_nope, q_pe, _ = _valid(device, dtype)
        return (ql_nope, q_pe, random_bits(shape, dtype, device),
                f"concat_mla_q: q_out must be [tokens, heads, nope_dim + rope_dim] = [{T}, {H}, {W}], "
                f"got shape [{shape[0]}, {shape[1]}, {shape[2]}]")
    return case


SELF = "concat_mla_q: q_out must not overlap itself"
WITH_NOPE = "concat_mla_q: q_out must not overlap ql_nope in memory"
WITH_PE = "concat_mla_q: q_out must not overlap q_pe in memory"


def _self_overlap(make_out, nope_dim=N, rope_dim=R, heads=H):
    def case(device, dtype):
        q_out = make_out(device, dtype)
        tokens = q_out.shape[0]
        return (random_bits((tokens, heads, nope_dim), dtype, device),
                random_bits((tokens, heads, rope_dim), dtype, device), q_out, SELF)
    return case


def _buffer_view(size, stride, offset=0, numel=None):
    def make(device, dtype):
        extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        return random_bits((numel or extent,), dtype, device).as_strided(size, stride, offset)
    return make


def _nope_inside_out(device, dtype):
    q_out = random_bits((T, H, W), dtype, device)
    return q_out[..., :N], random_bits((T, H, R), dtype, device), q_out, WITH_NOPE


def _nope_touches_last_out_element(device, dtype):
    """Rows of [q_out | ql_nope] interleave in one buffer, ql_nope starting at q_out's last column."""
    buf = random_bits((T, H, W + N - 1), dtype, device)
    return buf[..., W - 1 :], random_bits((T, H, R), dtype, device), buf[..., :W], WITH_NOPE


def _nope_broadcast_from_out(device, dtype):
    q_out = random_bits((T, H, W), dtype, device)
    return q_out[-1:, :, 2 : 2 + N].expand(T, H, N), random_bits((T, H, R), dtype, device), q_out, WITH_NOPE


def _pe_inside_contiguous_out(device, dtype):
    """q_pe = q_out[..., N:]: the rope half of a contiguous q_out, a classic in-place mistake."""
    q_out = random_bits((T, H, W), dtype, device)
    return random_bits((T, H, N), dtype, device), q_out[..., N:], q_out, WITH_PE


def _pe_one_head_inside_out(device, dtype):
    q_out = random_bits((T, H, W), dtype, device)
    return random_bits((T, H, N), dtype, device), q_out[:, 1:2, 3 : 3 + R], q_out, WITH_PE


def _pe_touches_last_out_element(device, dtype):
    buf = random_bits((T, H, W + R - 1), dtype, device)
    return random_bits((T, H, N), dtype, device), buf[..., W - 1 :], buf[..., :W], WITH_PE


def _pe_is_all_of_a_dense_out(device, dtype):
    """A dense q_out and a dense q_pe view over the same bytes (ATen's fast path says Partial)."""
    flat = random_bits((T * H * W,), dtype, device)
    return random_bits((T, H, N), dtype, device), flat[: T * H * R].view(T, H, R), flat.view(T, H, W), WITH_PE


BAD_INPUTS = [
    pytest.param(_nope_dtype(torch.float32), id="nope-float32"),
    pytest.param(_nope_dtype(torch.float64), id="nope-float64"),
    pytest.param(_nope_dtype(torch.int16), id="nope-int16"),
    pytest.param(_nope_dtype(torch.uint8), id="nope-uint8"),
    pytest.param(_nope_dtype_alone(torch.float32), id="nope-float32-others-half"),
    pytest.param(_nope_dtype_alone(torch.int16), id="nope-int16-others-half"),
    pytest.param(_partner_dtype("q_pe", None), id="pe-other-half-dtype"),
    pytest.param(_partner_dtype("q_pe", torch.float32), id="pe-float32"),
    pytest.param(_partner_dtype("q_pe", torch.int16), id="pe-int16"),
    pytest.param(_partner_dtype("q_out", None), id="out-other-half-dtype"),
    pytest.param(_partner_dtype("q_out", torch.float32), id="out-float32"),
    pytest.param(_partner_dtype("q_out", torch.int16), id="out-int16"),
    pytest.param(_rank("ql_nope", (T * H, N)), id="nope-2d"),
    pytest.param(_rank("ql_nope", (1, T, H, N)), id="nope-4d"),
    pytest.param(_rank("q_pe", (T, R)), id="pe-2d"),
    pytest.param(_rank("q_pe", (1, T, H, R)), id="pe-4d"),
    pytest.param(_rank("q_out", (T, H * W)), id="out-2d"),
    pytest.param(_rank("q_out", (1, T, H, W)), id="out-4d"),
    pytest.param(_rank("q_out", ()), id="out-0d"),
    pytest.param(_pe_shape((T + 1, H, R)), id="pe-more-tokens"),
    pytest.param(_pe_shape((T - 1, H, R)), id="pe-fewer-tokens"),
    pytest.param(_pe_shape((T, 2, R)), id="pe-2-of-4-heads"),
    pytest.param(_pe_shape((T, H + 1, R)), id="pe-more-heads"),
    pytest.param(_pe_shape((T, 0, R)), id="pe-0-heads"),
    pytest.param(_out_shape((T + 1, H, W)), id="out-more-tokens"),
    pytest.param(_out_shape((T - 1, H, W)), id="out-fewer-tokens"),
    pytest.param(_out_shape((T, H + 1, W)), id="out-more-heads"),
    pytest.param(_out_shape((T, 1, W)), id="out-1-head"),
    pytest.param(_out_shape((T, H, W + 1)), id="out-wider"),
    pytest.param(_out_shape((T, H, W - 1)), id="out-narrower"),
    pytest.param(_out_shape((T, H, N)), id="out-nope-width"),
    pytest.param(_self_overlap(lambda d, t: random_bits((T, 1, W), t, d).expand(T, H, W)), id="self-heads-stride0"),
    pytest.param(_self_overlap(lambda d, t: random_bits((1, H, W), t, d).expand(T, H, W)), id="self-tokens-stride0"),
    pytest.param(_self_overlap(lambda d, t: random_bits((T, H, 1), t, d).expand(T, H, W)), id="self-last-stride0"),
    pytest.param(_self_overlap(_buffer_view((T, 2, 6), (8, 4, 1)), nope_dim=4, rope_dim=2, heads=2),
                 id="self-rows-overlap-(8,4,1)"),
    pytest.param(_self_overlap(_buffer_view((T, H, W), (H * W, W - 1, 1))), id="self-rows-overlap-by-one"),
    pytest.param(_self_overlap(_buffer_view((T, 4, 4), (64, 6, 2)), nope_dim=3, rope_dim=1, heads=4),
                 id="self-strided-rows-collide"),
    pytest.param(_self_overlap(_buffer_view((3, 4, 6), (5, 12, 2)), nope_dim=5, rope_dim=1, heads=4),
                 id="self-tokens-hit-other-heads"),
    pytest.param(_nope_inside_out, id="nope-inside-out"),
    pytest.param(_nope_touches_last_out_element, id="nope-touches-last-out-column"),
    pytest.param(_nope_broadcast_from_out, id="nope-broadcast-from-out"),
    pytest.param(_pe_inside_contiguous_out, id="pe-inside-contiguous-out"),
    pytest.param(_pe_one_head_inside_out, id="pe-1-head-inside-out"),
    pytest.param(_pe_touches_last_out_element, id="pe-touches-last-out-column"),
    pytest.param(_pe_is_all_of_a_dense_out, id="pe-dense-over-dense-out"),
]


@pytest.mark.parametrize("call", ENTRY_POINTS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_before_writing(device, dtype, case, call):
    ql_nope, q_pe, q_out, message = case(device, dtype)
    check_rejected((ql_nope, q_pe, q_out), message, call=call)


API_CASES = ["nope-float32", "nope-int16", "pe-other-half-dtype", "nope-2d", "nope-4d", "pe-2d", "pe-4d",
             "pe-more-tokens", "pe-2-of-4-heads"]


@pytest.mark.parametrize("case", [p for p in BAD_INPUTS if p.id in API_CASES])
def test_api_without_output_raises(device, case):
    """vllm_mla_ops.concat_mla_q with no q_out still raises the op's dtype and rank errors."""
    ql_nope, q_pe, _, message = case(device, torch.float16)
    check_rejected((ql_nope, q_pe), message, call=vllm_mla_ops.concat_mla_q)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "nope_dev, pe_dev, out_dev, message",
    [
        ("cpu", "cuda", "cuda", "concat_mla_q: q_pe must be on ql_nope's device cpu, got cuda:0"),
        ("cuda", "cpu", "cuda", "concat_mla_q: q_pe must be on ql_nope's device cuda:0, got cpu"),
        ("cuda", "cuda", "cpu", "concat_mla_q: q_out must be on ql_nope's device cuda:0, got cpu"),
        ("cpu", "cpu", "cuda", "concat_mla_q: q_out must be on ql_nope's device cpu, got cuda:0"),
        ("cuda", "cpu", "cpu", "concat_mla_q: q_pe must be on ql_nope's device cuda:0, got cpu"),
    ],
)
@pytest.mark.parametrize("call", ENTRY_POINTS)
def test_mixed_devices_raise_before_writing(nope_dev, pe_dev, out_dev, message, call):
    ql_nope = random_bits((T, H, N), torch.bfloat16, nope_dev)
    q_pe = random_bits((T, H, R), torch.bfloat16, pe_dev)
    q_out = random_bits((T, H, W), torch.bfloat16, out_dev)
    with torch.cuda.device(0):
        check_rejected((ql_nope, q_pe, q_out), message, call=call)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("tokens", [1, 300])
def test_distinct_regions_of_one_buffer_accepted(device, dtype, tokens):
    """q_out = buf[..., :576], q_pe = buf[..., 576:640], ql_nope = buf[..., 640:]: rows interleave
    but share no element, so the call succeeds, bit-exact, with the input regions unchanged."""
    buf = random_bits((tokens, 16, 1152), dtype, device)
    check_writes_reference(buf[..., 640:], buf[..., 576:640], buf[..., :576])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_adjacent_regions_of_one_buffer_accepted(device, dtype):
    """Dense neighbours: q_pe starts at the element right after q_out's last one, ql_nope ends at the
    element right before q_out's first one."""
    flat = random_bits((T * H * (N + W + R),), dtype, device)
    ql_nope = flat[: T * H * N].view(T, H, N)
    q_out = flat[T * H * N : T * H * (N + W)].view(T, H, W)
    q_pe = flat[T * H * (N + W) :].view(T, H, R)
    check_writes_reference(ql_nope, q_pe, q_out)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_out_interleaved_between_input_columns_accepted(device, dtype):
    """Last-dim stride 2: q_out takes the even columns of a buffer whose odd columns hold the inputs."""
    buf = random_bits((T, H, 2 * W), dtype, device)
    odd = buf[..., 1::2]
    check_writes_reference(odd[..., :N], odd[..., N:], buf[..., ::2])


# ---------------------------------------------------------------------- randomized exactness


def _is_dense(t: torch.Tensor) -> bool:
    """ATen's is_non_overlapping_and_dense: the views ATen's own overlap checks can decide."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _draw_strides(rng: random.Random, shape, max_stride: int) -> list[int]:
    t, h, w = shape
    mode = rng.choice(["random", "random", "rows", "dense"])
    if mode == "random":
        return [rng.randint(0, max_stride) for _ in range(3)]
    if mode == "rows":  # rows with gaps or overlaps, last dim 1 or 2 apart
        s2 = rng.choice([1, 1, 2])
        s1 = max(0, w * s2 + rng.randint(-2, 4))
        return [max(0, h * s1 + rng.randint(-3, 6)), s1, s2]
    order = rng.sample(range(3), 3)  # a dense layout with a random dim order
    strides, step = [0, 0, 0], 1
    for d in reversed(order):
        strides[d] = step
        step *= shape[d]
    return strides


def _draw_view(rng, buf, index, shape, max_stride, max_offset):
    strides = _draw_strides(rng, shape, max_stride)
    offset = rng.randint(0, max_offset)
    view = buf.as_strided(shape, strides, offset)
    elements = index.as_strided(shape, strides, offset).flatten().tolist()
    return view, elements


# draws, max tokens, max heads, max nope width, max rope width, max random stride, max storage offset
SCALES = {"small": (5000, 3, 4, 4, 3, 12, 40), "medium": (2000, 12, 8, 24, 12, 300, 400)}


@pytest.mark.parametrize("scale", list(SCALES))
def test_overlap_decisions_are_exact(device, scale):
    """Random strided views of ONE buffer (interleaving, overlapping, stride 0, dense or not, random
    offsets): the op raises exactly when brute force finds q_out addressing an element twice or an
    element of an input, with the message of the first failed check, and is bit-exact otherwise."""
    draws, max_t, max_h, max_n, max_r, max_stride, max_offset = SCALES[scale]
    rng = random.Random(f"overlap-{scale}")
    # Room for the largest view: offset + sum over dims of (size - 1) * stride, strides of any mode.
    buf_len = max_offset + 1 + 3 * max_t * max_h * (max_n + max_r) * 2 + (max_t + max_h + max_n + max_r) * max_stride
    index = torch.arange(buf_len)
    seen = dict.fromkeys(["self", "nope", "pe", "accepted", "accepted_non_dense_span_overlap",
                          "rejected_non_dense_cross"], 0)
    for draw in range(draws):
        dtype = (torch.float16, torch.bfloat16)[draw % 2]
        tokens, heads = rng.randint(1, max_t), rng.randint(1, max_h)
        nope_dim, rope_dim = rng.randint(0, max_n), rng.randint(0, max_r)
        pe_heads = rng.choice([heads, 1])
        buf = random_bits((buf_len,), dtype, device)
        view = functools.partial(_draw_view, rng, buf, index, max_stride=max_stride, max_offset=max_offset)
        q_out, out_el = view((tokens, heads, nope_dim + rope_dim))
        ql_nope, nope_el = view((tokens, heads, nope_dim))
        q_pe, pe_el = view((tokens, pe_heads, rope_dim))

        out_set = set(out_el)
        message = None
        if len(out_set) < len(out_el):
            message, kind = SELF, "self"
        elif out_set & set(nope_el):
            message, kind = WITH_NOPE, "nope"
        elif out_set & set(pe_el):
            message, kind = WITH_PE, "pe"
        what = (f"draw {draw}: q_out {tuple(q_out.shape)} {q_out.stride()} +{q_out.storage_offset()}, "
                f"ql_nope {tuple(ql_nope.shape)} {ql_nope.stride()} +{ql_nope.storage_offset()}, "
                f"q_pe {tuple(q_pe.shape)} {q_pe.stride()} +{q_pe.storage_offset()}")
        try:
            if message is None:
                check_writes_reference(ql_nope, q_pe, q_out)
            else:
                check_rejected((ql_nope, q_pe, q_out), message)
        except BaseException as error:
            raise AssertionError(f"{what}: expected {message or 'success'}") from error

        non_dense = not (_is_dense(q_out) and _is_dense(ql_nope) and _is_dense(q_pe))
        if message is None:
            seen["accepted"] += 1
            spans_meet = any(
                el and out_el and min(el) <= max(out_el) and min(out_el) <= max(el) for el in (nope_el, pe_el)
            )
            seen["accepted_non_dense_span_overlap"] += non_dense and spans_meet
        else:
            seen[kind] += 1
            seen["rejected_non_dense_cross"] += non_dense and kind != "self"
    # The draws must exercise every outcome, including ATen's "too hard" cases both ways.
    assert min(seen.values()) >= draws // 100, seen


@pytest.mark.parametrize("which", ["ql_nope", "q_pe"])
def test_overlap_detected_across_storages_of_one_memory(which):
    """Two tensors with distinct storages over the same host memory (numpy slices, DLPack, from_blob):
    q_out still must not share a byte with an input."""
    memory = np.zeros(T * H * W + 64, dtype=np.float16)
    memory.view(np.int16)[:] = np.random.default_rng(0).integers(-32768, 32768, memory.size, dtype=np.int16)
    q_out = torch.from_numpy(memory[: T * H * W]).view(T, H, W)
    other = torch.from_numpy(memory[N:])  # another storage, starting inside q_out's first row
    assert q_out.untyped_storage().data_ptr() != other.untyped_storage().data_ptr()
    if which == "ql_nope":
        args = (other[: T * H * N].view(T, H, N), random_bits((T, H, R), torch.float16), q_out)
    else:
        args = (random_bits((T, H, N), torch.float16), other[: T * H * R].view(T, H, R), q_out)
    check_rejected(args, WITH_NOPE if which == "ql_nope" else WITH_PE)
