"""The ops under PyTorch's tooling, for every op: torch.library.opcheck's checks that run the op
(schema, fake tensors, AOT dispatch), and torch.compile with dynamic shapes: one compile for every
token count, eager's bits, and Inductor code that calls the op in place on q_out (no clone, no copy
back). The fakes' checks on bad arguments are test_validation.py's; the ops under autograd,
test_inference_only.py's."""

from __future__ import annotations

import re

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
from torch._inductor.utils import run_and_get_code

from mla_helpers import (
    OPS,
    opcheck,
    assert_refused,
    assert_writes_reference,
    inductor_call_body,
    valid_args,
)
from vllm_mla_ops.testing import (
    contiguous,
    heads_major,
    inside_bigger,
    last_dim_stride_2,
    one_head,
    random_bits,
    split_of_wider,
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------- opcheck

# (tokens, pe_heads, layouts of ql_nope, q_pe and q_out): decode-sized, 512 / 64 wide, 16 heads.
OPCHECK_SAMPLES = {
    "contiguous": (5, 16, (contiguous, contiguous, contiguous)),
    "decode": (5, 16, (heads_major, split_of_wider, contiguous)),
    "rope-1-head": (5, 1, (contiguous, one_head, contiguous)),
    "strided": (5, 16, (last_dim_stride_2, last_dim_stride_2, last_dim_stride_2)),
    "out-in-bigger-buffer": (3, 16, (contiguous, contiguous, inside_bigger)),
    # Fresh zero-size tensors: opcheck cannot clone a zero-size view with a storage offset (a
    # PyTorch bug), so this sample is never sliced out of a bigger tensor.
    "0-tokens": (0, 16, (contiguous, contiguous, contiguous)),
}
# opcheck's checks that run the op. Its fourth, test_autograd_registration, returns before running
# anything for these ops: their Autograd key falls through to the backend kernel, which opcheck
# counts as a registration. The ops' autograd contract is test_inference_only.py's.
OPCHECK_TESTS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")

@pytest.mark.parametrize("sample", list(OPCHECK_SAMPLES))
@pytest.mark.parametrize("op", OPS)
def test_opcheck_runs_the_op(device, op, sample):
    """opcheck's checks that run the op: test_schema runs it under SchemaCheckMode (it may write only
    the arguments its schema marks as written, and returns no alias of them), test_faketensor runs
    the fake on fake copies (the shapes, dtypes and strides it promises match), and
    test_aot_dispatch_dynamic runs it eagerly and through AOTAutograd with dynamic shapes (same
    results, same mutations)."""
    tokens, pe_heads, layouts = OPCHECK_SAMPLES[sample]
    args = valid_args(op, device, tokens=tokens, heads=16, nope_dim=512, rope_dim=64, pe_heads=pe_heads,
                      layouts=layouts, scale=0.0037)
    opcheck(op.raw, tuple(args.values()), OPCHECK_TESTS)


# ------------------------------------------------------------------------------ torch.compile

def _assert_op_runs_in_place(body: str, op) -> str:
    """Asserts that the op is called once and that nothing clones or copies a buffer; returns the
    name of the tensor the op writes."""
    calls = re.findall(rf"torch\.ops\._C\.{op.name}\.default\(([^)]*)\)", body)
    assert len(calls) == 1, body
    for forbidden in ("clone", "copy_", "aten.copy", "as_strided_scatter"):
        assert forbidden not in body, f"{forbidden!r} in generated code:\n{body}"
    return [a.strip() for a in calls[0].split(",")][op.arg_names.index(op.out)]


@pytest.mark.parametrize("op", OPS)
def test_compiled_allocating_function(device, op):
    """fullgraph + dynamic: compiled once for 2..300 tokens (and a new scale value each call for the
    ops that quantize), eager's bits, and generated code that allocates q_out and hands that very
    buffer to the op, which it returns."""
    allocating = op.allocating(op.out_dtype(torch.bfloat16))
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(allocating, backend=counter, fullgraph=True, dynamic=True)
    for i, (tokens, value) in enumerate(((2, 0.0037), (3, 1.0), (17, 100.0), (300, 1e-40))):
        args = valid_args(op, device, case="decode", tokens=tokens, heads=16, scale=value)
        inputs = [t for name, t in args.items() if name != op.out]
        if i == 0:
            q_out, codes = run_and_get_code(compiled, *inputs)
            body = inductor_call_body(codes)
            written = _assert_op_runs_in_place(body, op)
            assert re.search(rf"\b{written} = empty_strided", body), body
            assert re.search(rf"return \({written}, \)", body), body
        else:
            q_out = compiled(*inputs)
        op.compare(q_out, allocating(*inputs), f"tokens={tokens}: compiled vs eager")
        op.compare(q_out, op.reference(args)[op.out], f"tokens={tokens}: compiled vs reference")
    assert counter.frame_count == 1


@pytest.mark.parametrize("op", OPS)
def test_compiled_function_writes_callers_output(device, op):
    """A compiled function that fills a caller's q_out (a view with gaps inside a bigger buffer):
    the caller's tensor holds the result, the gaps are untouched, the op writes the argument itself."""
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(op.filling(), backend=counter, fullgraph=True, dynamic=True)
    for i, tokens in enumerate((2, 5, 64)):
        args = valid_args(op, device, dtype=torch.float16, tokens=tokens, heads=16, nope_dim=512, rope_dim=64,
                          pe_heads=1, layouts=(random_bits, one_head, inside_bigger))
        if i == 0:
            codes = []

            def call(op, a):
                nonlocal codes
                result, codes = run_and_get_code(compiled, *a.values())
                return result

            assert_writes_reference(op, args, call=call)
            written = _assert_op_runs_in_place(inductor_call_body(codes), op)
            assert re.fullmatch(r"arg\d+_1", written), f"the op writes {written}, not the caller's q_out"
        else:
            assert_writes_reference(op, args, call=lambda op, a: compiled(*a.values()))
    assert counter.frame_count == 1


@pytest.mark.parametrize("op", OPS)
def test_compiled_bad_input_raises_at_trace_time(device, op):
    """A q_out of the wrong dtype in a compiled function: Dynamo's tracing on fake tensors raises the
    validator's message (TorchRuntimeError), so no graph is compiled, nothing runs, q_out is
    untouched. A fake that let it through would compile a graph whose kernel raised at run time."""
    args = valid_args(op, device, dtype=torch.float16, tokens=4, heads=16, nope_dim=512, rope_dim=64,
                      layouts=(random_bits, random_bits, inside_bigger))
    args[op.out] = inside_bigger(args[op.out].shape, torch.bfloat16, device)
    message = f"{op.name}: " + op.out_dtype_error.format(dtype=torch.float16, bad=torch.bfloat16)
    counter = CompileCounter()
    compiled = torch.compile(op.filling(), backend=counter, fullgraph=True, dynamic=True)
    assert_refused(op, args, message, call=lambda op, a: compiled(*a.values()),
                   error=torch._dynamo.exc.TorchRuntimeError)
    assert counter.frame_count == 0
