"""The op under PyTorch's tooling: opcheck (schema, fake impl, autograd registration, AOT dispatch), and
torch.compile with dynamic shapes: one compile for every token count, eager's bits, and Inductor code
that calls the op in place on q_out (no clone, no copy back)."""

from __future__ import annotations

import re

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.utils import run_and_get_code

from mla_helpers import (
    bits,
    check_rejected,
    check_writes_reference,
    contiguous,
    heads_major,
    inductor_call_body,
    inside_bigger,
    last_dim_stride_2,
    one_head,
    random_bits,
    reference,
    split_of_wider,
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _sample(device, dtype, tokens, nope_layout, pe_layout, out_layout, pe_heads=16, heads=16):
    return (nope_layout((tokens, heads, 512), dtype, device), pe_layout((tokens, pe_heads, 64), dtype, device),
            out_layout((tokens, heads, 576), dtype, device))


OPCHECK_SAMPLES = {
    "contiguous": lambda d, t: _sample(d, t, 5, contiguous, contiguous, contiguous),
    "decode": lambda d, t: _sample(d, t, 5, heads_major, split_of_wider, contiguous),
    "rope-1-head": lambda d, t: _sample(d, t, 5, contiguous, one_head, contiguous, pe_heads=1),
    "strided": lambda d, t: _sample(d, t, 5, last_dim_stride_2, last_dim_stride_2, last_dim_stride_2),
    "out-in-bigger-buffer": lambda d, t: _sample(d, t, 3, contiguous, contiguous, inside_bigger),
    # Fresh zero-size tensors: opcheck cannot clone a zero-size view with a storage offset (a
    # PyTorch bug), so this sample is never sliced out of a bigger tensor.
    "0-tokens": lambda d, t: (random_bits((0, 16, 512), t, d), random_bits((0, 16, 64), t, d),
                              random_bits((0, 16, 576), t, d)),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("sample", list(OPCHECK_SAMPLES))
def test_opcheck(device, dtype, sample):
    args = OPCHECK_SAMPLES[sample](device, dtype)
    assert not any(a.requires_grad for a in args)
    torch.library.opcheck(torch.ops._C.concat_mla_q.default, args)


# ------------------------------------------------------------------------------ torch.compile

OP_CALL = re.compile(r"torch\.ops\._C\.concat_mla_q\.default\((\w+), (\w+), (\w+)\)")


def _assert_op_runs_in_place(body: str) -> str:
    """Asserts that the op is called once and that nothing clones or copies a buffer; returns the
    name of the tensor the op writes."""
    calls = OP_CALL.findall(body)
    assert len(calls) == 1, body
    for forbidden in ("clone", "copy_", "aten.copy", "as_strided_scatter"):
        assert forbidden not in body, f"{forbidden!r} in generated code:\n{body}"
    return calls[0][2]


def _build_query(ql_nope, q_pe):
    q_out = ql_nope.new_empty(ql_nope.shape[0], ql_nope.shape[1], ql_nope.shape[2] + q_pe.shape[2])
    torch.ops._C.concat_mla_q(ql_nope, q_pe, q_out)
    return q_out


def _fill_query(ql_nope, q_pe, q_out):
    torch.ops._C.concat_mla_q(ql_nope, q_pe, q_out)


def test_compiled_allocating_function(device):
    """fullgraph + dynamic: compiled once for 2..300 tokens, bit-exact with eager, and the generated
    code allocates q_out and hands that very buffer to the op, which it returns."""
    dtype = torch.bfloat16
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(_build_query, backend=counter, fullgraph=True, dynamic=True)
    for i, tokens in enumerate((2, 3, 17, 300)):
        ql_nope = heads_major((tokens, 16, 512), dtype, device)
        q_pe = split_of_wider((tokens, 16, 64), dtype, device)
        if i == 0:
            q_out, codes = run_and_get_code(compiled, ql_nope, q_pe)
            body = inductor_call_body(codes)
            written = _assert_op_runs_in_place(body)
            assert re.search(rf"\b{written} = empty_strided", body), body
            assert re.search(rf"return \({written}, \)", body), body
        else:
            q_out = compiled(ql_nope, q_pe)
        assert q_out.shape == (tokens, 16, 576)
        assert torch.equal(bits(q_out), bits(_build_query(ql_nope, q_pe))), f"tokens={tokens}: differs from eager"
        assert torch.equal(bits(q_out), reference(ql_nope, q_pe)), f"tokens={tokens}: differs from torch.cat"
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


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(lambda d: (random_bits((4, 16, 512), torch.float32, d), random_bits((4, 16, 64), torch.float16, d),
                                "ql_nope must be float16 or bfloat16 dtype, got torch.float32"), id="nope-float32"),
        pytest.param(lambda d: (random_bits((4, 16, 512), torch.float16, d), random_bits((4, 2, 64), torch.float16, d),
                                "q_pe must be [tokens, heads or 1, rope_dim] with tokens="),
                     id="pe-2-of-16-heads"),
    ],
)
def test_compiled_bad_input_raises_at_trace_time(device, case):
    """The fake implementation raises the validator's error while tracing; q_out is untouched."""
    ql_nope, q_pe, message = case(device)
    q_out = inside_bigger((4, 16, 576), torch.float16, device)
    compiled = torch.compile(_fill_query, fullgraph=True, dynamic=True)
    check_rejected(ql_nope, q_pe, q_out, message, call=compiled)
