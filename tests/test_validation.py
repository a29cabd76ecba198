"""Validation, for every op: each bad argument raises RuntimeError with the validator's message before
anything is written (every byte of every storage involved stays as it was), eagerly and, for every
check but memory overlap, on fake tensors (the fake implementation mirrors the validator); a tensor
argument that is None or not a tensor is refused by name; memory overlap is decided exactly against
a brute-force oracle: q_out overlapping itself or another argument is refused, distinct regions of one
buffer are accepted."""

from __future__ import annotations

import dataclasses
import random
import re
import time
from typing import Callable

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mla_helpers import (
    CALLS,
    FP8,
    H,
    HALF_DTYPES,
    N,
    OPS,
    OP_LIST,
    R,
    SAME_DTYPE_OPS,
    T,
    W,
    Op,
    assert_refused,
    assert_writes_reference,
    byte_span,
    call_function,
    call_function_allocating,
    call_raw,
    overlap_message,
    valid_args,
)
from vllm_mla_ops.testing import contiguous, inside_bigger, last_dim_stride_2, random_bits

HALF = (torch.float16, torch.bfloat16)


def _other_half(dtype: torch.dtype) -> torch.dtype:
    return HALF[1 - HALF.index(dtype)]


@dataclasses.dataclass(frozen=True)
class Bad:
    """One kind of bad argument: ``build(op, device, dtype) -> (args, message)``; ``kind`` says
    which check refuses it ("dtype", "rank", "shape" and "scale" ones the fake makes too;
    "overlap" needs addresses); ``needs`` is what the op must have for the case to apply: "scale"
    (a scale argument) or "same-dtype" (q_out of the inputs' dtype, so inputs can be views of its
    elements)."""

    id: str
    kind: str
    build: Callable
    needs: str | None = None

    def applies_to(self, op: Op) -> bool:
        if self.needs == "scale":
            return op.scale is not None
        if self.needs == "same-dtype":
            return op.out_dtype(torch.bfloat16) == torch.bfloat16
        return self.needs is None or self.needs(op)


def _replacing(name: str, make: Callable, message: Callable) -> Callable:
    """A case that replaces argument `name` by make(args, device, dtype); message(op, args, dtype)."""

    def build(op, device, dtype):
        args = valid_args(op, device, dtype=dtype)
        args[name] = make(args, device, dtype)
        return args, f"{op.name}: {message(op, args, dtype)}"

    return build


# ----------------------------------------------------------------------------------- dtypes


def _inputs_of_dtype(bad):
    """Every argument of the inputs' dtype (ql_nope, q_pe, and q_out where it shares it) gets `bad`."""

    def build(op, device, dtype):
        args = valid_args(op, device, dtype=dtype)
        for name, t in args.items():
            if t.dtype == dtype:
                args[name] = random_bits(t.shape, bad, device)
        return args, f"{op.name}: ql_nope must be float16 or bfloat16 dtype, got {bad}"

    return build


_RANK_DIMS = {"ql_nope": "[tokens, heads, nope_dim]", "q_pe": "[tokens, heads or 1, rope_dim]",
              "q_out": "[tokens, heads, nope_dim + rope_dim]"}


def _rank(name, shape):
    return _replacing(name, lambda a, d, t: random_bits(shape, a[name].dtype, d),
                      lambda op, a, t: (f"{name} must be 3-D {_RANK_DIMS[name]}, got {len(shape)}-D "
                                        f"with shape {list(shape)}"))


def _pe_shape(shape):
    return _replacing("q_pe", lambda a, d, t: random_bits(shape, t, d),
                      lambda op, a, t: (f"q_pe must be [tokens, heads or 1, rope_dim] with tokens={T} and "
                                        f"heads={H} from ql_nope, got shape {list(shape)}"))


def _out_shape(shape):
    return _replacing("q_out", lambda a, d, t: random_bits(shape, a["q_out"].dtype, d),
                      lambda op, a, t: (f"q_out must be [tokens, heads, nope_dim + rope_dim] = [{T}, {H}, {W}], "
                                        f"got shape {list(shape)}"))


# Wrong q_out dtypes, resolved against the inputs' dtype: the inputs' own, the other half dtype, or
# a fixed one; each op gets those that are not its q_out's dtype.
_OUT_DTYPES = {"input-dtype": lambda t: t, "other-half": _other_half, "float32": lambda t: torch.float32,
               "int16": lambda t: torch.int16, "uint8": lambda t: torch.uint8,
               "e5m2": lambda t: torch.float8_e5m2, "e4m3fn": lambda t: FP8}


def _out_dtype(spec):
    resolve = _OUT_DTYPES[spec]

    def build(op, device, dtype):
        args = valid_args(op, device, dtype=dtype)
        bad = resolve(dtype)
        args["q_out"] = random_bits(args["q_out"].shape, bad, device)
        return args, f"{op.name}: " + op.out_dtype_error.format(dtype=dtype, bad=bad)

    return build


def _out_dtype_is_wrong(spec):
    return lambda op: all(_OUT_DTYPES[spec](t) != op.out_dtype(t) for t in HALF)


# ---------------------------------------------------------------------------------- overlap


def _self_overlap(make_out, nope_dim=N, rope_dim=R, heads=H):
    """q_out from make_out(dtype, device); inputs to match its tokens."""

    def build(op, device, dtype):
        out = make_out(op.out_dtype(dtype), device)
        args = valid_args(op, device, dtype=dtype, tokens=out.shape[0], heads=heads, nope_dim=nope_dim,
                          rope_dim=rope_dim)
        args["q_out"] = out
        return args, f"{op.name}: q_out must not overlap itself"

    return build


def _buffer_view(size, stride, offset=0):
    def make(dtype, device):
        extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        return random_bits((extent,), dtype, device).as_strided(size, stride, offset)

    return make


def _input_of_out(name, view):
    """Argument `name` is view(q_out, buffer) (same dtype); the buffer holds q_out."""

    def build(op, device, dtype):
        args = valid_args(op, device, dtype=dtype)
        buf, args["q_out"] = view.buffer(dtype, device)
        args[name] = view(args["q_out"], buf)
        return args, f"{op.name}: q_out must not overlap {name} in memory"

    return build


class _View:
    def __init__(self, view, buffer_shape=None, out_of_buffer=None):
        self.view, self.buffer_shape, self.out_of_buffer = view, buffer_shape, out_of_buffer

    def buffer(self, dtype, device):
        if self.buffer_shape is None:
            out = random_bits((T, H, W), dtype, device)
            return out, out
        buf = random_bits(self.buffer_shape, dtype, device)
        return buf, self.out_of_buffer(buf)

    def __call__(self, out, buf):
        return self.view(out, buf)


def _out_over_last_nope_element(op, device, dtype):
    """q_out starts one of its elements before the end of ql_nope's bytes, in one byte buffer."""
    args = valid_args(op, device, dtype=dtype)
    out_dtype = args["q_out"].dtype
    nope_bytes, out_bytes = T * H * N * dtype.itemsize, T * H * W * out_dtype.itemsize
    buf = random_bits((nope_bytes + out_bytes,), torch.uint8, device)
    args["ql_nope"] = buf[:nope_bytes].view(dtype).view(T, H, N)
    start = nope_bytes - out_dtype.itemsize
    args["q_out"] = buf[start : start + out_bytes].view(out_dtype).view(T, H, W)
    return args, f"{op.name}: q_out must not overlap ql_nope in memory"


def _expanded_pe_inside_out(op, device, dtype):
    """q_pe is R elements of q_out's bytes (row [2, 1], 8 bytes in), expanded to every token."""
    args = valid_args(op, device, dtype=dtype)
    row = args["q_out"].view(torch.uint8)[2, 1]
    args["q_pe"] = row[8 : 8 + R * dtype.itemsize].view(dtype).view(1, 1, R).expand(T, 1, R)
    return args, f"{op.name}: q_out must not overlap q_pe in memory"


def _scale_on_out(offset_elements):
    """scale is bytes [0, 4) of a byte buffer; q_out starts `offset_elements` of its elements before
    byte 4 (sharing that many elements' bytes with the scale)."""

    def build(op, device, dtype):
        args = valid_args(op, device, dtype=dtype)
        out_dtype = args["q_out"].dtype
        start = 4 - offset_elements * out_dtype.itemsize
        buf = random_bits((4 + T * H * W * out_dtype.itemsize,), torch.uint8, device)
        args[op.scale] = buf[:4].view(torch.float32)
        args[op.scale].fill_(0.5)
        args["q_out"] = buf[start : start + T * H * W * out_dtype.itemsize].view(out_dtype).view(T, H, W)
        return args, f"{op.name}: q_out must not overlap {op.scale} in memory"

    return build


def _scale_on_strided_out(op, device, dtype):
    """q_out takes every other element from byte 4 on; the scale's bytes 8..11 hold one of them."""
    args = valid_args(op, device, dtype=dtype)
    out_dtype = args["q_out"].dtype
    buf = random_bits((8 + 2 * T * H * W * out_dtype.itemsize,), torch.uint8, device)
    args["q_out"] = buf[4 : 4 + 2 * T * H * W * out_dtype.itemsize].view(out_dtype)[::2].view(T, H, W)
    args[op.scale] = buf[8:12].view(torch.float32)
    args[op.scale].fill_(0.5)
    return args, f"{op.name}: q_out must not overlap {op.scale} in memory"


BAD = [
    # dtypes
    *(Bad(f"inputs-{name}", "dtype", _inputs_of_dtype(bad))
      for name, bad in [("float32", torch.float32), ("float64", torch.float64), ("int16", torch.int16),
                        ("uint8", torch.uint8)]),
    *(Bad(f"nope-{name}-others-valid", "dtype", _replacing(
        "ql_nope", lambda a, d, t, bad=bad: random_bits((T, H, N), bad, d),
        lambda op, a, t, bad=bad: f"ql_nope must be float16 or bfloat16 dtype, got {bad}"))
      for name, bad in [("float32", torch.float32), ("int16", torch.int16), ("float8", FP8)]),
    *(Bad(f"pe-{name}", "dtype", _replacing(
        "q_pe", lambda a, d, t, bad=bad: random_bits((T, H, R), bad(t), d),
        lambda op, a, t, bad=bad: f"q_pe must have ql_nope's dtype {t}, got {bad(t)}"))
      for name, bad in [("other-half", _other_half), ("float32", lambda t: torch.float32),
                        ("int16", lambda t: torch.int16)]),
    *(Bad(f"out-{spec}", "dtype", _out_dtype(spec), needs=_out_dtype_is_wrong(spec)) for spec in _OUT_DTYPES),
    *(Bad(f"scale-{name}", "scale", _replacing(
        "scale", lambda a, d, t, bad=bad: torch.tensor([0.5], dtype=bad, device=d),
        lambda op, a, t, bad=bad: f"scale must be a torch.float32 tensor, got {bad}"), needs="scale")
      for name, bad in [("fp16", torch.float16), ("fp64", torch.float64), ("int32", torch.int32)]),
    *(Bad(f"scale-{name}", "scale", _replacing(
        "scale", lambda a, d, t, shape=shape: torch.full(shape, 0.5, device=d),
        lambda op, a, t, shape=shape: f"scale must have one element (a per-tensor scale), got shape {list(shape)}"),
        needs="scale")
      for name, shape in [("2", (2,)), ("0", (0,)), ("per-token", (T,)), ("1x3", (1, 3))]),
    # ranks
    Bad("nope-2d", "rank", _rank("ql_nope", (T * H, N))),
    Bad("nope-2d-tokens", "rank", _rank("ql_nope", (T, N))),
    Bad("nope-4d", "rank", _rank("ql_nope", (1, T, H, N))),
    Bad("pe-2d", "rank", _rank("q_pe", (T, R))),
    Bad("pe-4d", "rank", _rank("q_pe", (1, T, H, R))),
    Bad("out-2d", "rank", _rank("q_out", (T, H * W))),
    Bad("out-4d", "rank", _rank("q_out", (1, T, H, W))),
    Bad("out-4d-heads", "rank", _rank("q_out", (T, H, 1, W))),
    Bad("out-0d", "rank", _rank("q_out", ())),
    # shapes
    Bad("pe-more-tokens", "shape", _pe_shape((T + 1, H, R))),
    Bad("pe-fewer-tokens", "shape", _pe_shape((T - 1, H, R))),
    Bad("pe-2-of-4-heads", "shape", _pe_shape((T, 2, R))),
    Bad("pe-more-heads", "shape", _pe_shape((T, H + 1, R))),
    Bad("pe-0-heads", "shape", _pe_shape((T, 0, R))),
    Bad("out-more-tokens", "shape", _out_shape((T + 1, H, W))),
    Bad("out-fewer-tokens", "shape", _out_shape((T - 1, H, W))),
    Bad("out-more-heads", "shape", _out_shape((T, H + 1, W))),
    Bad("out-1-head", "shape", _out_shape((T, 1, W))),
    Bad("out-wider", "shape", _out_shape((T, H, W + 1))),
    Bad("out-narrower", "shape", _out_shape((T, H, W - 1))),
    Bad("out-nope-width", "shape", _out_shape((T, H, N))),
    # q_out overlapping itself
    Bad("self-heads-stride0", "overlap", _self_overlap(lambda t, d: random_bits((T, 1, W), t, d).expand(T, H, W))),
    Bad("self-tokens-stride0", "overlap", _self_overlap(lambda t, d: random_bits((1, H, W), t, d).expand(T, H, W))),
    Bad("self-last-stride0", "overlap", _self_overlap(lambda t, d: random_bits((T, H, 1), t, d).expand(T, H, W))),
    Bad("self-rows-overlap-(8,4,1)", "overlap",
        _self_overlap(_buffer_view((T, 2, 6), (8, 4, 1)), nope_dim=4, rope_dim=2, heads=2)),
    Bad("self-rows-overlap-by-one", "overlap", _self_overlap(_buffer_view((T, H, W), (H * W, W - 1, 1)))),
    Bad("self-strided-rows-collide", "overlap",
        _self_overlap(_buffer_view((T, 4, 4), (64, 6, 2)), nope_dim=3, rope_dim=1, heads=4)),
    Bad("self-tokens-hit-other-heads", "overlap",
        _self_overlap(_buffer_view((3, 4, 6), (5, 12, 2)), nope_dim=5, rope_dim=1, heads=4)),
    # an input sharing bytes with q_out
    Bad("nope-inside-out-one-column-in", "overlap", _input_of_out("ql_nope", _View(lambda o, b: o[..., 1 : 1 + N])),
        "same-dtype"),
    Bad("nope-half-of-out-with-other-head-stride", "overlap", _input_of_out("ql_nope", _View(
        lambda o, b: b.as_strided((T, H, N), (H * W, W + 1, 1)), (T * H * (W + 1),),
        lambda b: b.as_strided((T, H, W), (H * W, W, 1)))), "same-dtype"),
    Bad("nope-touches-last-out-column", "overlap", _input_of_out("ql_nope", _View(
        lambda o, b: b[..., W - 1 :], (T, H, W + N - 1), lambda b: b[..., :W])), "same-dtype"),
    Bad("nope-broadcast-from-out", "overlap", _input_of_out(
        "ql_nope", _View(lambda o, b: o[-1:, :, 2 : 2 + N].expand(T, H, N))), "same-dtype"),
    Bad("pe-inside-contiguous-out", "overlap", _input_of_out("q_pe", _View(lambda o, b: o[..., N:])), "same-dtype"),
    Bad("pe-1-head-inside-out", "overlap", _input_of_out("q_pe", _View(lambda o, b: o[:, 1:2, 3 : 3 + R])),
        "same-dtype"),
    Bad("pe-touches-last-out-column", "overlap", _input_of_out("q_pe", _View(
        lambda o, b: b[..., W - 1 :], (T, H, W + R - 1), lambda b: b[..., :W])), "same-dtype"),
    Bad("pe-dense-over-dense-out", "overlap", _input_of_out("q_pe", _View(
        lambda o, b: b[: T * H * R].view(T, H, R), (T * H * W,), lambda b: b.view(T, H, W))), "same-dtype"),
    Bad("out-over-last-nope-element", "overlap", _out_over_last_nope_element),
    Bad("expanded-pe-inside-out", "overlap", _expanded_pe_inside_out),
    Bad("out-overlaps-scale", "overlap", _scale_on_out(4), "scale"),
    Bad("out-overlaps-scale-by-1-element", "overlap", _scale_on_out(1), "scale"),
    Bad("strided-out-overlaps-scale", "overlap", _scale_on_strided_out, "scale"),
]
BAD_CASES = [pytest.param(op, case, id=f"{op.id}-{case.id}") for op in OP_LIST for case in BAD if case.applies_to(op)]


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("op, case", BAD_CASES)
def test_bad_input_raises_before_writing(device, op, case, dtype, call):
    args, message = case.build(op, device, dtype)
    assert_refused(op, args, message, call=call)


# The cases whose argument the Python function reads (not q_out, which it allocates when not given).
INPUT_CASES = [p for p in BAD_CASES if p.values[1].kind != "overlap" and "out-" not in p.values[1].id]


@pytest.mark.parametrize("op, case", INPUT_CASES)
def test_function_without_out_raises_the_ops_errors(device, op, case):
    """The Python function with out=None (it allocates q_out from the inputs' shapes) still raises
    the op's errors for its inputs, whatever shape it allocated."""
    args, message = case.build(op, device, torch.float16)
    assert_refused(op, args, message, call=call_function_allocating)


# ------------------------------------------------------------------------------ fake tensors


FAKE_CASES = [p for p in BAD_CASES if p.values[1].kind != "overlap"]


@pytest.mark.parametrize("op, case", FAKE_CASES)
def test_fake_refuses_like_the_validator(op, case):
    """On fake tensors (torch.compile's tracing), where no kernel can run, the op's fake refuses each
    bad argument the validator refuses, with its message. Overlap is the one check a fake cannot
    make: fake tensors have no addresses."""
    args, message = case.build(op, "cpu", torch.float16)
    mode = FakeTensorMode()
    fakes = {name: mode.from_tensor(t) for name, t in args.items()}
    with mode, pytest.raises(RuntimeError, match=re.escape(message)):
        call_raw(op, fakes)


@pytest.mark.parametrize("op, name", [pytest.param(op, name, id=f"{op.id}-{name}") for op in OP_LIST
                                      for name in op.tensor_args if name != "ql_nope"])
def test_fake_refuses_another_device(op, name):
    """One argument on another device than ql_nope (meta, for fake tensors on the CPU)."""
    args = valid_args(op, dtype=torch.float16)
    mode = FakeTensorMode()
    fakes = {n: mode.from_tensor(t) for n, t in args.items()}
    fakes[name] = mode.from_tensor(torch.empty_like(args[name], device="meta"))
    with mode, pytest.raises(RuntimeError, match=re.escape(f"{op.name}: {name} must be on ql_nope's device cpu, "
                                                           "got meta")):
        call_raw(op, fakes)


@pytest.mark.parametrize("pe_heads", [H, 1])
@pytest.mark.parametrize("op", OPS)
def test_fake_accepts_valid_arguments(op, pe_heads):
    args = valid_args(op, dtype=torch.float16, pe_heads=pe_heads)
    mode = FakeTensorMode()
    fakes = {name: mode.from_tensor(t) for name, t in args.items()}
    with mode:
        call_raw(op, fakes)


# ----------------------------------------------------------------------- devices, non-tensors


def _device_cases():
    """Every assignment of cpu / cuda to each op's tensor arguments but the uniform ones, with the
    message of the first argument (after ql_nope, in schema order) not on ql_nope's device."""
    cases = []
    for op in OP_LIST:
        names = op.tensor_args
        for mask in range(1, 2 ** len(names) - 1):
            devices = {name: ("cuda", "cpu")[mask >> i & 1] for i, name in enumerate(names)}
            first = next(name for name in names if devices[name] != devices["ql_nope"])
            label = {"cpu": "cpu", "cuda": "cuda:0"}
            message = (f"{op.name}: {first} must be on ql_nope's device {label[devices['ql_nope']]}, "
                       f"got {label[devices[first]]}")
            cases.append(pytest.param(op, devices, message,
                                      id=f"{op.id}-" + "-".join(f"{n}@{d}" for n, d in devices.items())))
    return cases


@pytest.mark.cuda
@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("op, devices, message", _device_cases())
def test_mixed_devices_raise_before_writing(op, devices, message, call):
    args = {name: t.to(devices[name]) for name, t in valid_args(op).items()}
    with torch.cuda.device(0):
        assert_refused(op, args, message, call=call)


NOT_TENSORS = [(None, "None"), (0.5, "float"), (np.zeros((T, H, N), dtype=np.float16), "ndarray")]
# out=None is the default (allocate), so `out` is tested with the other non-tensors only.
NOT_TENSOR_CASES = [pytest.param(op, name, value, type_name, id=f"{op.id}-{name}-{type_name}")
                    for op in OP_LIST for name in op.tensor_args for value, type_name in NOT_TENSORS
                    if not (name == op.out and value is None)]


@pytest.mark.parametrize("op, name, value, type_name", NOT_TENSOR_CASES)
def test_function_refuses_a_non_tensor_by_name(device, op, name, value, type_name, capfd):
    """None (or a float, or a numpy array) for a tensor argument of the Python function (a float or
    an array as its ``out=``): a TypeError naming the argument, raised before anything else (nothing
    written), with nothing printed."""
    args = valid_args(op, device)
    args[name] = value
    arg = "out" if name == op.out else name
    assert_refused(op, args, f"{op.name}: {arg} must be a torch.Tensor, got {type_name}", call=call_function,
                   error=TypeError)
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("op, name", [pytest.param(op, name, id=f"{op.id}-{name}") for op in OP_LIST
                                      for name in op.tensor_args])
def test_raw_op_refuses_none_by_name(device, op, name, capfd):
    """None for a tensor argument of the raw op: a RuntimeError naming the argument, nothing written,
    nothing printed (no C++ stack trace on stderr)."""
    args = valid_args(op, device)
    args[name] = None
    assert_refused(op, args, f"{op.name}: {name} must be a tensor, got None")
    assert capfd.readouterr() == ("", "")


# ------------------------------------------------------------------- overlap: accepted layouts


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("tokens", [1, 300])
@pytest.mark.parametrize("op", OPS)
def test_distinct_regions_of_one_buffer_accepted(device, op, tokens, dtype):
    """Each [token, head] row of one byte buffer holds q_out's row, then q_pe's, then ql_nope's (512 /
    64 wide): rows interleave but share no byte, so the call succeeds, bit-exact, with the input
    regions unchanged."""
    args = valid_args(op, device, dtype=dtype, tokens=tokens, heads=16, nope_dim=512, rope_dim=64)
    out_dtype = args["q_out"].dtype
    out_bytes, pe_bytes, nope_bytes = 576 * out_dtype.itemsize, 64 * dtype.itemsize, 512 * dtype.itemsize
    buf = random_bits((tokens, 16, out_bytes + pe_bytes + nope_bytes), torch.uint8, device)
    args["q_out"] = buf[..., :out_bytes].view(out_dtype)
    args["q_pe"] = buf[..., out_bytes : out_bytes + pe_bytes].view(dtype)
    args["ql_nope"] = buf[..., out_bytes + pe_bytes :].view(dtype)
    assert_writes_reference(op, args)


@pytest.mark.parametrize("order", [("ql_nope", "q_out", "q_pe"), ("ql_nope", "q_pe", "q_out")],
                         ids=["out-between-inputs", "out-after-inputs"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_adjacent_regions_of_one_buffer_accepted(device, op, dtype, order):
    """Dense neighbours in one byte buffer, in `order`: each tensor starts at the byte right after the
    one before it ends."""
    args = valid_args(op, device, dtype=dtype)
    sizes = {name: args[name].numel() * args[name].element_size() for name in order}
    buf = random_bits((sum(sizes.values()),), torch.uint8, device)
    start = 0
    for name in order:
        args[name] = buf[start : start + sizes[name]].view(args[name].dtype).view(args[name].shape)
        start += sizes[name]
    assert_writes_reference(op, args)


@pytest.mark.parametrize("layout", [contiguous, inside_bigger, last_dim_stride_2])
@pytest.mark.parametrize("op", SAME_DTYPE_OPS)
def test_nope_half_of_q_out_is_accepted(device, op, layout):
    """ql_nope exactly q_out[..., :nope_dim] (where a bmm wrote its product into q_out): accepted,
    q_out ends up holding the reference of the values before the call (its nope half as it was)."""
    args = valid_args(op, device, tokens=5, heads=3, layouts=(random_bits, random_bits, layout))
    args["ql_nope"] = args["q_out"][..., :N]
    assert_writes_reference(op, args)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("op", SAME_DTYPE_OPS)
def test_out_interleaved_between_input_columns_accepted(device, op, dtype):
    """Last-dim stride 2: q_out takes the even columns of a buffer whose odd columns hold the inputs."""
    args = valid_args(op, device, dtype=dtype)
    buf = random_bits((T, H, 2 * W), dtype, device)
    odd = buf[..., 1::2]
    args.update(ql_nope=odd[..., :N], q_pe=odd[..., N:], q_out=buf[..., ::2])
    assert_writes_reference(op, args)


@pytest.mark.parametrize("op", [p for p in OPS if p.values[0].scale is not None])
def test_scale_just_outside_q_out_is_accepted(device, op):
    """Byte-exact overlap: the scale in bytes [0, 4), q_out from byte 4 on (adjacent) is fine."""
    args = valid_args(op, device, dtype=torch.float16, scale=0.0037)
    out = args["q_out"]
    buf = random_bits((4 + out.numel() * out.element_size(),), torch.uint8, device)
    args[op.scale] = buf[:4].view(torch.float32)
    args[op.scale].fill_(0.0037)
    args["q_out"] = buf[4:].view(out.dtype).view(out.shape)
    assert_writes_reference(op, args)


@pytest.mark.parametrize("which", ["ql_nope", "q_pe"])
@pytest.mark.parametrize("op", OPS)
def test_overlap_detected_across_storages_of_one_memory(op, which):
    """Two tensors with distinct storages over the same host memory (numpy slices, DLPack, from_blob):
    q_out still must not share a byte with an input."""
    args = valid_args(op, dtype=torch.float16)
    out = args["q_out"]
    memory = np.random.default_rng(0).integers(0, 256, out.numel() * out.element_size() + 256, dtype=np.uint8)
    args["q_out"] = torch.from_numpy(memory[: out.numel() * out.element_size()]).view(out.dtype).view(out.shape)
    other = torch.from_numpy(memory[N:])  # another storage, starting inside q_out's first row
    assert args["q_out"].untyped_storage().data_ptr() != other.untyped_storage().data_ptr()
    size = args[which].numel() * 2
    args[which] = other[:size].view(torch.float16).view(args[which].shape)
    assert_refused(op, args, f"{op.name}: q_out must not overlap {which} in memory")


# ------------------------------------------------------------------ overlap: brute-force oracle


def _is_dense(t: torch.Tensor) -> bool:
    """ATen's is_non_overlapping_and_dense: the views ATen's own overlap checks can decide."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


PRIMES = [1, 2, 3, 5, 7, 11, 13, 17, 19, 23]


def _draw_strides(rng: random.Random, shape, max_stride: int, base: int) -> list[int]:
    """Element strides for a 3-D `shape`: random, rows with gaps or overlaps, near a common `base`,
    near multiples of it, from a pairwise coprime set, or dense in a random dim order."""
    t, h, w = shape
    mode = rng.choice(["random", "random", "rows", "near", "multiples", "coprime", "dense"])
    if mode == "random":
        return [rng.randint(0, max_stride) for _ in range(3)]
    if mode == "rows":  # last dim 1 or 2 apart
        s2 = rng.choice([1, 1, 2])
        s1 = max(0, w * s2 + rng.randint(-2, 4))
        return [max(0, h * s1 + rng.randint(-3, 6)), s1, s2]
    if mode == "near":
        return [max(0, base + rng.randint(-2, 2)) for _ in range(3)]
    if mode == "multiples":
        return [max(0, base * rng.randint(0, 4) + rng.randint(-1, 1)) for _ in range(3)]
    if mode == "coprime":
        return [rng.choice(PRIMES) for _ in range(3)]
    order = rng.sample(range(3), 3)
    strides, step = [0, 0, 0], 1
    for d in reversed(order):
        strides[d] = step
        step *= shape[d]
    return strides


def _empty(shape, dtype, device):
    """A layout for the shapes and dtypes only: the draw replaces every tensor by a view."""
    return torch.empty(shape, dtype=dtype, device=device)


def _extent(shape, strides, offset) -> int:
    return offset + sum((n - 1) * s for n, s in zip(shape, strides)) + 1 if 0 not in shape else offset


def _draw_shared_buffer(rng: random.Random, op: Op, device, limits) -> dict:
    """Valid-shaped arguments of `op`, every tensor a view of ONE byte buffer: the 3-D ones with drawn
    strides and element offsets; the others (a scale) contiguous, a quarter of the time on one of
    q_out's bytes."""
    max_t, max_h, max_n, max_r, max_stride, max_offset = limits
    dtype = rng.choice(HALF)
    tokens, heads = rng.randint(1, max_t), rng.randint(1, max_h)
    args = valid_args(op, "cpu", dtype=dtype, tokens=tokens, heads=heads, nope_dim=rng.randint(0, max_n),
                      rope_dim=rng.randint(0, max_r), pe_heads=rng.choice([heads, 1]), layouts=(_empty,) * 3)
    base = rng.randint(1, 2 * (max_n + max_r))
    layouts = {}
    for name in [op.out] + [n for n in op.tensor_args if n != op.out]:
        t = args[name]
        if t.dim() == 3:
            layouts[name] = (t.shape, _draw_strides(rng, t.shape, max_stride, base), rng.randint(0, max_offset))
        else:
            layouts[name] = (t.shape, t.stride(), rng.randint(0, max_offset))
            out_shape, out_strides, out_offset = layouts[op.out]
            if rng.random() < 0.25 and 0 not in out_shape:
                # a byte of q_out, rounded down to this argument's element size
                index = [rng.randrange(n) for n in out_shape]
                byte = (out_offset + sum(i * s for i, s in zip(index, out_strides))) * args[op.out].element_size()
                layouts[name] = (t.shape, t.stride(), byte // t.element_size())
    buf_bytes = max(_extent(*layouts[name]) * args[name].element_size() for name in layouts)
    buf = random_bits((buf_bytes + 8 - buf_bytes % 8,), torch.uint8, device)
    for name, (shape, strides, offset) in layouts.items():
        args[name] = buf.view(args[name].dtype).as_strided(shape, strides, offset)
    return args


# draws, max tokens, max heads, max nope width, max rope width, max random stride, max storage offset
OVERLAP_DRAWS = {"small": (5000, (3, 4, 4, 3, 12, 40)), "medium": (2000, (12, 8, 24, 12, 300, 400))}
CALL_BOUND_S = 0.020


@pytest.mark.parametrize("size", list(OVERLAP_DRAWS))
@pytest.mark.parametrize("op", OPS)
def test_overlap_decisions_match_brute_force(device, op, size):
    """Random strided views of ONE byte buffer (interleaving, overlapping, stride 0, dense or not,
    strides near a common value, its multiples or coprime, random offsets; inputs and q_out of
    different element sizes; the scale sometimes on q_out's bytes): the op raises exactly when brute
    force (mla_helpers.overlap_message) finds q_out addressing a byte twice or a byte of another
    argument, with the message of the first failed check, and is bit-exact otherwise, writing
    nothing else; never "could not decide"; each call under 20 ms of host time."""
    draws, limits = OVERLAP_DRAWS[size]
    rng = random.Random(f"overlap-{op.id}-{size}")
    seen = dict.fromkeys(["self", *op.inputs, "accepted", "accepted_non_dense_span_overlap",
                          "rejected_non_dense_cross"], 0)
    for draw in range(draws):
        args = _draw_shared_buffer(rng, op, device, limits)
        message = overlap_message(op, args)
        what = f"draw {draw}: " + "; ".join(f"{name} {tuple(t.shape)} {t.stride()} +{t.storage_offset()} {t.dtype}"
                                            for name, t in args.items())
        times = []

        def timed(op, args):
            start = time.perf_counter()
            try:
                return call_raw(op, args)
            except RuntimeError as error:
                assert "could not decide" not in str(error), error
                raise
            finally:
                times.append(time.perf_counter() - start)

        try:
            if message is None:
                assert_writes_reference(op, args, call=timed)
            else:
                assert_refused(op, args, message, call=timed)
        except BaseException as error:
            raise AssertionError(f"{what}: expected {message or 'success'}") from error
        if times[0] >= CALL_BOUND_S:  # one retry: a preempted call on a busy machine is not a slow search
            try:
                timed(op, args)
            except RuntimeError:
                pass
        assert min(times) < CALL_BOUND_S, (what, times)

        non_dense = not all(_is_dense(t) for t in args.values())
        if message is None:
            seen["accepted"] += 1
            out_lo, out_hi = byte_span(args[op.out])
            spans_meet = any(lo <= out_hi and out_lo <= hi for lo, hi in (byte_span(args[n]) for n in op.inputs))
            seen["accepted_non_dense_span_overlap"] += non_dense and spans_meet
        else:
            kind = "self" if "overlap itself" in message else re.search(r"overlap (\w+) in memory", message)[1]
            seen[kind] += 1
            seen["rejected_non_dense_cross"] += non_dense and kind != "self"
    # The draws must exercise every outcome, including ATen's "too hard" cases both ways.
    assert min(seen.values()) >= draws // 100, seen
