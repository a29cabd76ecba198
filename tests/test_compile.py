"""The ops under PyTorch's tooling: opcheck (schema, fake impl, autograd registration, AOT dispatch),
the fake implementations' checks on fake tensors, and torch.compile with dynamic shapes: one compile
for every token count, eager's bits, and Inductor code that calls the op in place on q_out (no clone,
no copy back)."""

from __future__ import annotations

import re

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
from torch._inductor.utils import run_and_get_code
from torch._subclasses.fake_tensor import FakeTensorMode

from mla_helpers import FP8, check_rejected, check_writes_reference, expected_output, inductor_call_body, scalar
from vllm_mla_ops.testing import (
    assert_bitwise_equal,
    contiguous,
    engine_inputs,
    heads_major,
    inside_bigger,
    last_dim_stride_2,
    one_head,
    random_bits,
    split_of_wider,
)

OPS = ["concat_mla_q", "concat_mla_q_fp8"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------- opcheck


def _sample(op, device, tokens, nope_layout, pe_layout, out_layout, pe_heads=16, heads=16):
    out_dtype = torch.bfloat16 if op == "concat_mla_q" else FP8
    args = (nope_layout((tokens, heads, 512), torch.bfloat16, device),
            pe_layout((tokens, pe_heads, 64), torch.bfloat16, device),
            out_layout((tokens, heads, 576), out_dtype, device))
    return args if op == "concat_mla_q" else (*args, scalar(0.0037, device))


OPCHECK_SAMPLES = {
    "contiguous": lambda op, d: _sample(op, d, 5, contiguous, contiguous, contiguous),
    "decode": lambda op, d: _sample(op, d, 5, heads_major, split_of_wider, contiguous),
    "rope-1-head": lambda op, d: _sample(op, d, 5, contiguous, one_head, contiguous, pe_heads=1),
    "strided": lambda op, d: _sample(op, d, 5, last_dim_stride_2, last_dim_stride_2, last_dim_stride_2),
    "out-in-bigger-buffer": lambda op, d: _sample(op, d, 3, contiguous, contiguous, inside_bigger),
    # Fresh zero-size tensors: opcheck cannot clone a zero-size view with a storage offset (a
    # PyTorch bug), so this sample is never sliced out of a bigger tensor.
    "0-tokens": lambda op, d: _sample(op, d, 0, contiguous, contiguous, contiguous),
}


@pytest.mark.parametrize("sample", list(OPCHECK_SAMPLES))
@pytest.mark.parametrize("op", OPS)
def test_opcheck(device, op, sample):
    """All of opcheck's checks. The inputs require grad, without which opcheck skips its autograd
    registration check; no_grad is how engines call the inference-only ops with such tensors.
    The fp8 op skips test_schema, whose mutation check compares float8 tensors with an op that
    has no float8 kernel on CPU."""
    args = OPCHECK_SAMPLES[sample](op, device)
    for t in args[:2]:
        t.requires_grad_()
    test_utils = ["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    if op == "concat_mla_q_fp8":
        test_utils.remove("test_schema")
    with torch.no_grad():
        torch.library.opcheck(getattr(torch.ops._C, op).default, args, test_utils=test_utils)


# ---------------------------------------------------------------------------------------- fakes

T, H, N, R = 6, 4, 12, 4
W = N + R


F16 = torch.float16
PE_SHAPE = f"q_pe must be [tokens, heads or 1, rope_dim] with tokens={T} and heads={H} from ql_nope, got shape "
OUT_SHAPE = f"q_out must be [tokens, heads, nope_dim + rope_dim] = [{T}, {H}, {W}], got shape "

# (id, ops, argument, its replacement given the op's q_out dtype, message): one case per check of
# the validator but overlap, and each clause of the shape checks.
_FAKE_CASES = [
    ("nope-dtype", OPS, "ql_nope", lambda o: torch.empty(T, H, N), "ql_nope must be float16 or bfloat16 dtype, got torch.float32"),
    ("nope-rank", OPS, "ql_nope", lambda o: torch.empty(T * H, N, dtype=F16),
     "ql_nope must be 3-D [tokens, heads, nope_dim], got 2-D with shape [24, 12]"),
    ("pe-rank", OPS, "q_pe", lambda o: torch.empty(1, T, H, R, dtype=F16),
     "q_pe must be 3-D [tokens, heads or 1, rope_dim], got 4-D with shape [1, 6, 4, 4]"),
    ("out-rank", OPS, "q_out", lambda o: torch.empty(T, H * W, dtype=o),
     "q_out must be 3-D [tokens, heads, nope_dim + rope_dim], got 2-D with shape [6, 64]"),
    ("pe-dtype", OPS, "q_pe", lambda o: torch.empty(T, H, R, dtype=torch.bfloat16),
     "q_pe must have ql_nope's dtype torch.float16, got torch.bfloat16"),
    ("out-dtype", OPS[:1], "q_out", lambda o: torch.empty(T, H, W, dtype=torch.bfloat16),
     "q_out must have ql_nope's dtype torch.float16, got torch.bfloat16"),
    ("out-dtype", OPS[1:], "q_out", lambda o: torch.empty(T, H, W, dtype=F16),
     "q_out must be torch.float8_e4m3fn, got torch.float16"),
    ("pe-device", OPS, "q_pe", lambda o: torch.empty(T, H, R, dtype=F16, device="meta"),
     "q_pe must be on ql_nope's device cpu, got meta"),
    ("out-device", OPS, "q_out", lambda o: torch.empty(T, H, W, dtype=o, device="meta"),
     "q_out must be on ql_nope's device cpu, got meta"),
    ("pe-tokens", OPS, "q_pe", lambda o: torch.empty(T + 1, H, R, dtype=F16), PE_SHAPE + f"[{T + 1}, {H}, {R}]"),
    ("pe-heads", OPS, "q_pe", lambda o: torch.empty(T, 2, R, dtype=F16), PE_SHAPE + f"[{T}, 2, {R}]"),
    ("out-tokens", OPS, "q_out", lambda o: torch.empty(T - 1, H, W, dtype=o), OUT_SHAPE + f"[{T - 1}, {H}, {W}]"),
    ("out-heads", OPS, "q_out", lambda o: torch.empty(T, H + 1, W, dtype=o), OUT_SHAPE + f"[{T}, {H + 1}, {W}]"),
    ("out-width", OPS, "q_out", lambda o: torch.empty(T, H, W + 1, dtype=o), OUT_SHAPE + f"[{T}, {H}, {W + 1}]"),
    ("scale-dtype", OPS[1:], "scale", lambda o: torch.tensor([0.5], dtype=F16),
     "scale must be a torch.float32 tensor, got torch.float16"),
    ("scale-numel", OPS[1:], "scale", lambda o: torch.tensor([0.5, 0.5]),
     "scale must have one element (a per-tensor scale), got shape [2]"),
    ("scale-device", OPS[1:], "scale", lambda o: torch.tensor([0.5], device="meta"),
     "scale must be on ql_nope's device cpu, got meta"),
]
FAKE_CASES = [pytest.param(op, which, make, message, id=f"{op}-{name}")
              for name, ops, which, make, message in _FAKE_CASES for op in ops]


def _fake_args(op, mode, which, make):
    """Fake valid arguments of `op`, with `which` replaced by make(the op's q_out dtype)."""
    out_dtype = F16 if op == "concat_mla_q" else FP8
    args = {"ql_nope": torch.empty(T, H, N, dtype=F16), "q_pe": torch.empty(T, H, R, dtype=F16),
            "q_out": torch.empty(T, H, W, dtype=out_dtype)}
    if op == "concat_mla_q_fp8":
        args["scale"] = torch.tensor([0.5])
    args[which] = make(out_dtype)
    return [mode.from_tensor(t) for t in args.values()]


@pytest.mark.parametrize("op, which, make, message", FAKE_CASES)
def test_fake_raises_the_validators_message(op, which, make, message):
    """On fake tensors (torch.compile's tracing), where no kernel can run, the op's fake refuses
    each kind of bad argument the C++ validator refuses, with its message. Overlap is the one
    check a fake cannot make: fake tensors have no addresses."""
    mode = FakeTensorMode()
    args = _fake_args(op, mode, which, make)
    with mode, pytest.raises(RuntimeError, match=re.escape(f"{op}: {message}")):
        getattr(torch.ops._C, op).default(*args)


@pytest.mark.parametrize("pe_heads", [H, 1])
@pytest.mark.parametrize("op", OPS)
def test_fake_accepts_valid_arguments(op, pe_heads):
    mode = FakeTensorMode()
    args = _fake_args(op, mode, "q_pe", lambda o: torch.empty(T, pe_heads, R, dtype=F16))
    with mode:
        getattr(torch.ops._C, op).default(*args)


# ------------------------------------------------------------------------------ torch.compile

def _assert_op_runs_in_place(body: str, op: str = "concat_mla_q") -> str:
    """Asserts that the op is called once and that nothing clones or copies a buffer; returns the
    name of the tensor the op writes."""
    calls = re.findall(rf"torch\.ops\._C\.{op}\.default\((\w+), (\w+), (\w+)", body)
    assert len(calls) == 1, body
    for forbidden in ("clone", "copy_", "aten.copy", "as_strided_scatter"):
        assert forbidden not in body, f"{forbidden!r} in generated code:\n{body}"
    return calls[0][2]


def _build_query(ql_nope, q_pe, scale=None):
    shape = (ql_nope.shape[0], ql_nope.shape[1], ql_nope.shape[2] + q_pe.shape[2])
    if scale is None:
        q_out = ql_nope.new_empty(shape)
        torch.ops._C.concat_mla_q(ql_nope, q_pe, q_out)
    else:
        q_out = ql_nope.new_empty(shape, dtype=FP8)
        torch.ops._C.concat_mla_q_fp8(ql_nope, q_pe, q_out, scale)
    return q_out


def _fill_query(ql_nope, q_pe, q_out):
    torch.ops._C.concat_mla_q(ql_nope, q_pe, q_out)


@pytest.mark.parametrize("op", OPS)
def test_compiled_allocating_function(device, op):
    """fullgraph + dynamic: compiled once for 2..300 tokens (and a new scale value each call for the
    fp8 op), eager's bits, and generated code that allocates q_out and hands that very buffer to
    the op, which it returns."""
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(_build_query, backend=counter, fullgraph=True, dynamic=True)
    for i, (tokens, value) in enumerate(((2, 0.0037), (3, 1.0), (17, 100.0), (300, 1e-40))):
        ql_nope, q_pe, _ = engine_inputs("decode", tokens, 16, torch.bfloat16, device)
        args = (ql_nope, q_pe) if op == "concat_mla_q" else (ql_nope, q_pe, scalar(value, device))
        if i == 0:
            q_out, codes = run_and_get_code(compiled, *args)
            body = inductor_call_body(codes)
            written = _assert_op_runs_in_place(body, op)
            assert re.search(rf"\b{written} = empty_strided", body), body
            assert re.search(rf"return \({written}, \)", body), body
        else:
            q_out = compiled(*args)
        assert_bitwise_equal(q_out, _build_query(*args), f"tokens={tokens}: compiled vs eager")
        expected, compare = expected_output(*args)
        compare(q_out, expected, f"tokens={tokens}: compiled vs reference")
    assert counter.frame_count == 1


def test_compiled_function_writes_callers_output(device):
    """A compiled function that fills a caller's q_out (a view with gaps inside a bigger buffer):
    the caller's tensor holds the result, the gaps are untouched, the op writes the argument itself."""
    dtype = torch.float16
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(_fill_query, backend=counter, fullgraph=True, dynamic=True)
    for i, tokens in enumerate((2, 5, 64)):
        ql_nope = random_bits((tokens, 16, 512), dtype, device)
        q_pe = one_head((tokens, 1, 64), dtype, device)
        q_out = inside_bigger((tokens, 16, 576), dtype, device)
        if i == 0:
            codes = []

            def call(a, b, c):
                nonlocal codes
                result, codes = run_and_get_code(compiled, a, b, c)
                return result

            check_writes_reference(ql_nope, q_pe, q_out, call=call)
            written = _assert_op_runs_in_place(inductor_call_body(codes))
            assert re.fullmatch(r"arg\d+_1", written), f"the op writes {written}, not the caller's q_out"
        else:
            check_writes_reference(ql_nope, q_pe, q_out, call=compiled)
    assert counter.frame_count == 1


@pytest.mark.parametrize("op", OPS)
def test_compiled_bad_input_raises_at_trace_time(device, op):
    """A q_out of the wrong dtype in a compiled function: Dynamo's tracing on fake tensors raises the
    validator's message (TorchRuntimeError), so no graph is compiled, nothing runs, q_out is
    untouched. A fake that let it through would compile a graph whose kernel raised at run time."""
    args = (random_bits((4, 16, 512), torch.float16, device), random_bits((4, 16, 64), torch.float16, device),
            inside_bigger((4, 16, 576), torch.bfloat16, device))
    if op == "concat_mla_q":
        message = "concat_mla_q: q_out must have ql_nope's dtype torch.float16, got torch.bfloat16"
    else:
        args, message = (*args, scalar(0.5, device)), "concat_mla_q_fp8: q_out must be torch.float8_e4m3fn, got torch.bfloat16"

    def fill(*a):
        getattr(torch.ops._C, op)(*a)

    counter = CompileCounter()
    compiled = torch.compile(fill, backend=counter, fullgraph=True, dynamic=True)
    check_rejected(args, message, call=compiled, error=torch._dynamo.exc.TorchRuntimeError)
    assert counter.frame_count == 0
