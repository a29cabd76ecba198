"""Hostile arguments, for every op: views that carry torch's negative bit, views whose storage shrank
after they were made, widths whose sum overflows int64, strides of 2^62 and more on size-1 dims,
nested tensors, strides built to defeat the overlap search, and torch.compile's functionalization
hiding an overlap. Every refusal raises the message of docs/errors.md and writes nothing anywhere.
(The brute-force overlap oracle is test_validation.py's.)"""

from __future__ import annotations

import re
import time

import pytest
import torch

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
    assert_refused,
    assert_storages,
    assert_writes_reference,
    call_raw,
    snapshot,
    valid_args,
)
from vllm_mla_ops.testing import random_bits


def _timed(times: list):
    """call_raw, recording each call's host time in `times` (seconds)."""
    def run(op, args):
        start = time.perf_counter()
        try:
            return call_raw(op, args)
        finally:
            times.append(time.perf_counter() - start)
    return run


# ------------------------------------------------------------------------------------ math bits
# Only the negative bit is tested: a real-dtype tensor cannot carry the conjugate bit in this torch
# (torch.conj of a real tensor returns it unchanged, torch._conj asserts on a real dtype, and the
# .real / .imag of a conjugate complex view come out plain / with the negative bit), so the ops'
# dtypes never reach the conjugate half of the check.

NEG_OUT = ("{op}: q_out must not carry the negative or conjugate bit (a view such as x.conj().imag), got one "
           "with is_neg()=True and is_conj()=False; write into a plain tensor and copy from it")


def _conj_imag(shape, device):
    """x.conj().imag of a complex32 x of random bits: a float16 view with is_neg()."""
    t, h, d = shape
    view = random_bits((t, h, 2 * d), torch.float16, device).view(torch.complex32).conj().imag
    assert view.is_neg() and not view.is_conj() and view.dtype == torch.float16
    return view


def _neg_view(t):
    view = torch._neg_view(t)
    assert view.is_neg()
    return view


# (op, how q_out gets its negative bit): torch._neg_view for every op (it takes any dtype, float8
# included), and x.conj().imag of complex32 for the ops with a float16 q_out.
NEG_OUTS = [pytest.param(op, making, id=f"{op.id}-{making}") for op in OP_LIST
            for making in ["neg-view"] + (["conj-imag"] if op.out_dtype(torch.float16) == torch.float16 else [])]
GRAD_MODES = [pytest.param(torch.enable_grad, id="grad-mode"), pytest.param(torch.no_grad, id="no-grad"),
              pytest.param(torch.inference_mode, id="inference-mode")]


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("mode", GRAD_MODES)
@pytest.mark.parametrize("op, making", NEG_OUTS)
def test_q_out_with_the_negative_bit_is_refused_and_stays_usable(device, op, making, mode, call):
    """q_out with is_neg() (torch._neg_view of the op's q_out for bfloat16 inputs, or x.conj().imag
    of complex32 for a float16 q_out) is refused with the math-bit message in grad mode, under
    no_grad and under inference_mode, writing nothing; the process survives, a 16-bit q_out still
    resolves and sums, and the same call into a plain q_out (the resolved view; for float8, which
    torch cannot negate, the tensor under the view) is exact."""
    args = valid_args(op, device, dtype=torch.float16 if making == "conj-imag" else torch.bfloat16)
    plain = args["q_out"]
    args["q_out"] = _conj_imag((T, H, W), device) if making == "conj-imag" else _neg_view(plain)
    with mode():
        assert_refused(op, args, NEG_OUT.format(op=op.name), call=call)
    if args["q_out"].dtype != FP8:
        assert args["q_out"].sum().shape == ()
        plain = args["q_out"].resolve_neg()
        assert not plain.is_neg() and plain.shape == (T, H, W)
    args["q_out"] = plain
    assert_writes_reference(op, args, call=call)


# (op, the inputs given as negative-bit views): each alone, and all together.
NEG_INPUTS = [pytest.param(op, negated, id=f"{op.id}-{'+'.join(negated)}") for op in OP_LIST
              for negated in [(name,) for name in op.inputs] + [tuple(op.inputs)]]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("op, negated", NEG_INPUTS)
def test_inputs_with_the_negative_bit_are_read_through_their_resolved_values(device, op, negated, dtype):
    """Inputs as negative-bit views (torch._neg_view; a float16 ql_nope is x.conj().imag of
    complex32): q_out holds exactly the reference of the resolved inputs, and no byte of any storage
    (the views' own storages included) changes but q_out's elements."""
    args = valid_args(op, device, dtype=dtype)
    views = {name: _neg_view(t) if name in negated else t for name, t in args.items()}
    if dtype == torch.float16 and "ql_nope" in negated:
        views["ql_nope"] = _conj_imag((T, H, N), device)
    resolved = {name: t.resolve_neg() if name != op.out else t for name, t in views.items()}
    originals = snapshot(*views.values())
    assert_writes_reference(op, resolved, call=lambda op, _: call_raw(op, views))
    assert_storages(originals, [t for name, t in views.items() if name != op.out], "an input's storage changed")


# ------------------------------------------------------------------------------- storage bounds


def _past_the_end(op, name, t, held):
    extent = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 1) + 1
    return (f"{op.name}: {name} addresses bytes past the end of its storage (shape {list(t.shape)}, strides "
            f"{list(t.stride())}, storage offset {t.storage_offset()}: needs {extent * t.element_size()} bytes, "
            f"the storage holds {held}); was the storage resized after the view was made?")


SHRUNK = [pytest.param(op, name, id=f"{op.id}-{name}") for op in OP_LIST for name in op.tensor_args]


@pytest.mark.parametrize("held", [0, 3])
@pytest.mark.parametrize("op, name", SHRUNK)
def test_view_of_a_storage_shrunk_after_it_was_made_is_refused(device, op, name, held):
    """One argument is a view (a 3-D one with a storage offset) whose storage was resized to 0 or 3
    bytes after the view was made: the storage-bounds message with its exact shape, strides, offset
    and byte counts, and no byte of any storage written."""
    args = valid_args(op, device)
    if args[name].dim() == 3:
        t, h, d = args[name].shape
        args[name] = random_bits((t + 1, h, d + 2), args[name].dtype, device)[1:, :, 1 : 1 + d]
    args[name].untyped_storage().resize_(held)
    assert_refused(op, args, _past_the_end(op, name, args[name], held))


# -------------------------------------------------------------------------------- huge sizes


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("nope_dim, rope_dim", [(2**62, 2**62), (2**63 - 1, 1)], ids=["2^62+2^62", "2^63-1+1"])
@pytest.mark.parametrize("op", OPS)
def test_width_overflowing_int64_is_refused(device, op, nope_dim, rope_dim, call):
    """0 tokens, ql_nope and q_pe expanded (stride 0) to last dims whose sum exceeds int64: the
    overflow message with both widths, nothing written."""
    args = valid_args(op, device, tokens=1, heads=1, nope_dim=1, rope_dim=1)
    args["ql_nope"] = args["ql_nope"].expand(0, 1, nope_dim)
    args["q_pe"] = args["q_pe"].expand(0, 1, rope_dim)
    args["q_out"] = args["q_out"][:0]
    assert_refused(op, args, f"{op.name}: nope_dim + rope_dim = {nope_dim} + {rope_dim} overflows int64", call=call)


# (tokens, heads, strides of ql_nope, q_pe, q_out): the huge strides sit on size-1 dims only.
HUGE_STRIDES = [
    pytest.param(1, 1, (2**62, 2**62 + 1, 1), (2**63 - 1, 2**62, 1), (2**62, 2**63 - 1, 1), id="1-token-1-head"),
    pytest.param(T, 1, (N, 2**63 - 1, 1), (R, 2**62, 1), (W, 2**62 + 3, 1), id="size-1-heads"),
    pytest.param(1, H, (2**63 - 1, N, 1), (2**62, R, 1), (2**62, W, 1), id="size-1-tokens"),
]


@pytest.mark.parametrize("tokens, heads, nope_strides, pe_strides, out_strides", HUGE_STRIDES)
@pytest.mark.parametrize("op", OPS)
def test_size_1_dims_with_strides_of_2_62_and_more_are_accepted(device, op, tokens, heads, nope_strides,
                                                                pe_strides, out_strides):
    """Strides >= 2^62 on dims of size 1 address nothing beyond the first index: accepted, exact,
    nothing outside q_out's elements written."""
    args = valid_args(op, device, tokens=tokens, heads=heads)
    for name, strides in (("ql_nope", nope_strides), ("q_pe", pe_strides), ("q_out", out_strides)):
        args[name] = args[name].as_strided(args[name].shape, strides)
        assert args[name].stride() == strides
    assert_writes_reference(op, args)


# ---------------------------------------------------------------------------------- nested


NESTED = "{op}: nested tensors are not supported; pass dense [tokens, heads, dim] tensors (for example nt.to_padded_tensor(0))"


def _nested(dense, layout):
    """A nested tensor of `dense`'s dtype and device with two pieces of its trailing shape (token
    counts 2 and 1); built in float32 and converted, as torch cannot build a strided float8 one."""
    piece = torch.zeros((1, *dense.shape[1:]), dtype=torch.float32, device=dense.device)
    nested = torch.nested.nested_tensor([piece.expand(2, *dense.shape[1:]).clone(), piece], layout=layout)
    return nested.to(dense.dtype)


NESTED_CASES = [pytest.param(op, name, id=f"{op.id}-{name}") for op in OP_LIST for name in op.tensor_args]


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("layout", [torch.jagged, torch.strided], ids=["jagged", "strided"])
@pytest.mark.parametrize("op, name", NESTED_CASES)
def test_nested_tensor_argument_is_refused(device, op, name, layout):
    """A jagged or strided nested tensor as any one argument: the nested-tensor message, and no byte
    of the dense arguments' storages or of the nested tensor's values changed. (A jagged tensor's
    own storage cannot be read, so the snapshot takes its values() buffer.)"""
    args = valid_args(op, device)
    dense = args[name]
    args[name] = _nested(dense, layout)
    assert args[name].is_nested and args[name].dtype == dense.dtype and args[name].layout == layout
    storages = [a.values() if a.is_nested else a for a in args.values()]
    before = snapshot(*storages)
    with pytest.raises(RuntimeError, match=re.escape(NESTED.format(op=op.name))):
        call_raw(op, args)
    assert_storages(before, storages, "a refused call wrote")


# ------------------------------------------------------------------------ bounded overlap search

ADVERSARIAL_R = 64
ADVERSARIAL_M = 6 * ADVERSARIAL_R * ADVERSARIAL_R
SEARCH_BOUND_S = 0.050  # generous: the bound exists to catch a search that runs away, on a loaded CI host


def _adversarial(op, device, which):
    """Views of ONE buffer whose byte sets the search cannot settle within its bound: q_out
    [R+1, R+1, R+2] with strides (M, M+R+1, M+2R+3) and, per `which`, ql_nope [R+1, R+1, R+1] with
    strides (M+1, M+2, M+3) at M/2 and/or q_pe [R+1, R+1, 1] with strides (M+5, M+7, 1) at M/3
    (M = 6 R^2, R = 64; element units of bfloat16). A q_out of 1-byte elements (the fp8 op's) is
    the same bytes (strides and offset doubled). Inputs not in `which` are separate tensors."""
    r, m = ADVERSARIAL_R, ADVERSARIAL_M
    out_layout = ((r + 1, r + 1, r + 2), (m, m + r + 1, m + 2 * r + 3), 0)
    nope_layout = ((r + 1, r + 1, r + 1), (m + 1, m + 2, m + 3), m // 2)
    pe_layout = ((r + 1, r + 1, 1), (m + 5, m + 7, 1), m // 3)
    extent = max(offset + sum((n - 1) * s for n, s in zip(size, strides)) + 1
                 for size, strides, offset in (out_layout, nope_layout, pe_layout))
    buf = random_bits((extent,), torch.bfloat16, device)
    args = valid_args(op, device, tokens=r + 1, heads=r + 1, nope_dim=r + 1, rope_dim=1)
    size, strides, offset = out_layout
    factor = 2 // args["q_out"].element_size()
    args["q_out"] = buf.view(args["q_out"].dtype).as_strided(size, tuple(factor * s for s in strides), factor * offset)
    if "ql_nope" in which:
        args["ql_nope"] = buf.as_strided(*nope_layout)
    if "q_pe" in which:
        args["q_pe"] = buf.as_strided(*pe_layout)
    return args


def _undecided(op, name, q_out, other):
    return (f"{op.name}: could not decide within the search bound whether q_out and {name} share bytes (q_out "
            f"strides {list(q_out.stride())}, {name} strides {list(other.stride())}); "
            f"pass a contiguous {name} ({name}.contiguous()) or a contiguous q_out")


@pytest.mark.parametrize("which, named", [(("ql_nope",), "ql_nope"), (("q_pe",), "q_pe"),
                                          (("ql_nope", "q_pe"), "ql_nope")], ids=["ql_nope", "q_pe", "both"])
@pytest.mark.parametrize("op", OPS)
def test_overlap_the_search_cannot_settle_is_refused_quickly(device, op, which, named):
    """q_out and ql_nope and/or q_pe laid out in one buffer to defeat the overlap search: refused
    with the "could not decide" message naming the first such input, in under 50 ms of host time,
    and nothing written."""
    args = _adversarial(op, device, which)
    times = []
    assert_refused(op, args, _undecided(op, named, args["q_out"], args[named]), call=_timed(times))
    print(f"{op.name} adversarial {'+'.join(which)}: {times[0] * 1e3:.3f} ms")
    assert times[0] < SEARCH_BOUND_S, times


# q_out [s, s, s] with strides (M, M+1, M+s), M = s(s+1)+1: no two indices share an element, but
# the exact search enumerates ~1.5 s^2 candidate differences, past its step bound from s ~ 255.
SELF_S = 260
SELF_M = SELF_S * (SELF_S + 1) + 1


@pytest.mark.parametrize("op", OPS)
def test_q_out_whose_self_overlap_the_search_cannot_settle_is_refused_quickly(device, op):
    """A q_out [260, 260, 260] with strides (M, M+1, M+260), M = 260*261+1 (a storage of 53 million
    elements): refused with the "could not decide ... addresses an element twice" message in under
    50 ms of host time, and nothing written."""
    s, m = SELF_S, SELF_M
    strides = (m, m + 1, m + s)
    args = valid_args(op, device, tokens=1, heads=1, nope_dim=s - 1, rope_dim=1)
    buf = torch.zeros(sum((s - 1) * x for x in strides) + 1, dtype=args["q_out"].dtype, device=device)
    args["q_out"] = buf.as_strided((s, s, s), strides)
    args["ql_nope"] = args["ql_nope"].expand(s, s, s - 1)
    args["q_pe"] = args["q_pe"].expand(s, s, 1)
    times = []
    message = (f"{op.name}: could not decide within the search bound whether q_out (shape [{s}, {s}, {s}], "
               f"strides {list(strides)}) addresses an element twice; pass a contiguous q_out")
    assert_refused(op, args, message, call=_timed(times))
    print(f"{op.name} adversarial self overlap: {times[0] * 1e3:.3f} ms")
    assert times[0] < SEARCH_BOUND_S, times


# ---------------------------------------------------------------- torch.compile functionalization


def _q_pe_inside_q_out(op, device) -> dict:
    """q_out contiguous [T, H, N + R] and q_pe its last R * 2 bytes of each row, as the inputs'
    dtype (for a q_out of the inputs' dtype: q_out[..., N:])."""
    args = valid_args(op, device)
    q_pe, q_out = args["q_pe"], args["q_out"]
    if q_out.dtype == q_pe.dtype:
        args["q_pe"] = q_out[..., N:]
    else:
        args["q_pe"] = q_out.view(torch.uint8)[..., -R * q_pe.element_size() :].view(q_pe.dtype)
    assert args["q_pe"].shape == q_pe.shape
    return args


def _compiled(backend):
    def call(op, args):
        torch._dynamo.reset()
        try:
            return torch.compile(op.filling(), backend=backend, fullgraph=True)(*args.values())
        finally:
            torch._dynamo.reset()
    return call


class _Fill(torch.nn.Module):
    def __init__(self, op):
        super().__init__()
        self.fill = op.filling()

    def forward(self, *args):
        return self.fill(*args)


def _exported(op, args):
    values = tuple(args.values())
    return torch.export.export(_Fill(op), values).module()(*values)


def _same_dtype(op) -> bool:
    return op.out_dtype(torch.bfloat16) == torch.bfloat16


# Inductor only where q_pe and q_out share a dtype: aot_autograd refuses a mutation of an input that
# has a view of another dtype before the op is reached.
INSIDE_CALLS = [pytest.param(op, call, id=f"{op.id}-{name}") for op in OP_LIST
                for name, call in (("eager", call_raw), ("inductor", _compiled("inductor")), ("export", _exported))
                if name != "inductor" or _same_dtype(op)]


@pytest.mark.parametrize("op, call", INSIDE_CALLS)
def test_q_pe_inside_q_out_is_refused_eager_compiled_and_exported(device, op, call):
    """q_pe = the last bytes of q_out's rows (q_out[..., N:] where they share a dtype): eager,
    torch.compile with Inductor and a torch.export'ed module all raise the q_pe overlap message and
    write nothing."""
    with torch.no_grad():
        assert_refused(op, _q_pe_inside_q_out(op, device), f"{op.name}: q_out must not overlap q_pe in memory",
                       call=call)


@pytest.mark.parametrize("op", SAME_DTYPE_OPS)
def test_aot_eager_hides_q_pe_inside_q_out(device, op):
    """Documents a torch limitation, not a promise: under torch.compile(backend="aot_eager"),
    functionalization hands the op a copy of the mutated q_out, so q_pe = the last bytes of q_out's
    rows no longer shares bytes with what the op writes. The call is accepted, and q_out ends up
    holding the reference of ql_nope and q_pe's values from before the call; ql_nope is unchanged.
    (Where q_pe and q_out differ in dtype, aot_autograd refuses the mutation before the op.)"""
    args = _q_pe_inside_q_out(op, device)
    expected = op.reference(dict(args, q_pe=args["q_pe"].clone()))
    inputs_before = snapshot(*(args[name] for name in op.inputs if name != "q_pe"))
    with torch.no_grad():
        _compiled("aot_eager")(op, args)
    for name, value in expected.items():
        op.compare(args[name], value, name)
    assert_storages(inputs_before, [args[name] for name in op.inputs if name != "q_pe"], "an input changed")
