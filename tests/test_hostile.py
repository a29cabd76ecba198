"""Hostile arguments: views that carry torch's negative bit, views whose storage shrank after they were made, widths whose sum overflows int64,
nested tensors, strides built to defeat the overlap search, randomized views of one shared buffer
checked against a brute-force byte-set oracle, and torch.compile's functionalization hiding an
overlap. Every rejection raises the message of docs/errors.md and writes nothing anywhere."""

from __future__ import annotations

import re
import time

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from mla_helpers import (
    ENTRY_POINTS,
    FP8,
    HALF_DTYPES,
    assert_storages,
    call_op,
    check_rejected,
    check_writes_reference,
    scalar,
    snapshot,
)
from vllm_mla_ops.testing import assert_bitwise_equal, random_bits, reference

T, H, N, R = 3, 4, 6, 2
W = N + R
OPS = ["concat_mla_q", "concat_mla_q_fp8"]


def _args(op, device, dtype=torch.bfloat16, tokens=T, heads=H, nope_dim=N, rope_dim=R):
    """Valid arguments of `op` in schema order: (ql_nope, q_pe, q_out) or (..., q_out, scale)."""
    ql_nope = random_bits((tokens, heads, nope_dim), dtype, device)
    q_pe = random_bits((tokens, heads, rope_dim), dtype, device)
    if op == "concat_mla_q":
        return ql_nope, q_pe, random_bits((tokens, heads, nope_dim + rope_dim), dtype, device)
    return ql_nope, q_pe, random_bits((tokens, heads, nope_dim + rope_dim), FP8, device), scalar(0.37, device)


def _timed(call, times: list):
    """`call`, recording each call's host time in `times` (seconds)."""
    def run(*args):
        start = time.perf_counter()
        try:
            return call(*args)
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


# (op, how q_out gets its negative bit): float16 from complex32's conj().imag, bfloat16 and
# float8_e4m3fn through torch._neg_view (which takes any dtype).
NEG_OUTS = [
    pytest.param("concat_mla_q", "conj-imag-fp16", id="concat_mla_q-conj-imag-fp16"),
    pytest.param("concat_mla_q", "neg-view-bf16", id="concat_mla_q-neg-view-bf16"),
    pytest.param("concat_mla_q_fp8", "neg-view-fp8", id="concat_mla_q_fp8-neg-view-fp8"),
]
GRAD_MODES = [pytest.param(torch.enable_grad, id="grad-mode"), pytest.param(torch.no_grad, id="no-grad"),
              pytest.param(torch.inference_mode, id="inference-mode")]


@pytest.mark.parametrize("call", ENTRY_POINTS)
@pytest.mark.parametrize("mode", GRAD_MODES)
@pytest.mark.parametrize("op, making", NEG_OUTS)
def test_q_out_with_the_negative_bit_is_refused_and_stays_usable(device, op, making, mode, call):
    """q_out with is_neg() (x.conj().imag of complex32, or torch._neg_view) is refused with the
    math-bit message in grad mode, under no_grad and under inference_mode, writing nothing; the
    process survives, a 16-bit q_out still resolves and sums, and the same call into a plain q_out
    (the resolved view; for float8, which torch cannot negate, the tensor under the view) is exact."""
    dtype = torch.float16 if making == "conj-imag-fp16" else torch.bfloat16
    args = list(_args(op, device, dtype))
    plain = args[2]
    if making == "conj-imag-fp16":
        args[2] = _conj_imag((T, H, W), device)
    else:
        args[2] = _neg_view(plain)
    with mode():
        check_rejected(args, NEG_OUT.format(op=op), call=call)
    if op == "concat_mla_q":
        assert args[2].sum().shape == ()
        plain = args[2].resolve_neg()
        assert not plain.is_neg() and plain.shape == (T, H, W)
    args[2] = plain
    check_writes_reference(*args, call=call)


NEG_INPUTS = [pytest.param(op, which, id=f"{op}-{'+'.join(which)}") for op, which in [
    ("concat_mla_q", ("ql_nope",)), ("concat_mla_q", ("q_pe",)), ("concat_mla_q", ("ql_nope", "q_pe")),
    ("concat_mla_q_fp8", ("ql_nope",)), ("concat_mla_q_fp8", ("q_pe",)), ("concat_mla_q_fp8", ("scale",)),
    ("concat_mla_q_fp8", ("ql_nope", "q_pe", "scale")),
]]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("op, negated", NEG_INPUTS)
def test_inputs_with_the_negative_bit_are_read_through_their_resolved_values(device, op, negated, dtype):
    """ql_nope, q_pe or scale as negative-bit views (torch._neg_view; a float16 ql_nope is
    x.conj().imag of complex32): q_out holds exactly reference / reference_fp8 of the resolved inputs, and no
    byte of any storage (the views' own storages included) changes but q_out's elements."""
    names = ("ql_nope", "q_pe", "q_out", "scale")
    args = list(_args(op, device, dtype))
    views = [_neg_view(a) if name in negated else a for name, a in zip(names, args)]
    if dtype == torch.float16 and "ql_nope" in negated:
        views[0] = _conj_imag((T, H, N), device)
    resolved = [v.resolve_neg() for v in views]
    originals = snapshot(*views)
    check_writes_reference(*resolved, call=lambda *_: call_op(*views))
    assert_storages(originals, [v for i, v in enumerate(views) if i != 2], "an input's storage changed")


# ------------------------------------------------------------------------------- storage bounds


def _past_the_end(op, name, t, held):
    extent = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 1) + 1
    return (f"{op}: {name} addresses bytes past the end of its storage (shape {list(t.shape)}, strides "
            f"{list(t.stride())}, storage offset {t.storage_offset()}: needs {extent * t.element_size()} bytes, "
            f"the storage holds {held}); was the storage resized after the view was made?")


SHRUNK = [pytest.param(op, name, id=f"{op}-{name}") for op in OPS
          for name in ("ql_nope", "q_pe", "q_out") + (("scale",) if op == "concat_mla_q_fp8" else ())]


@pytest.mark.parametrize("held", [0, 3])
@pytest.mark.parametrize("op, name", SHRUNK)
def test_view_of_a_storage_shrunk_after_it_was_made_is_refused(device, op, name, held):
    """One argument is a view (with a storage offset) whose storage was resized to 0 or 3 bytes after
    the view was made: the storage-bounds message with its exact shape, strides, offset and byte
    counts, and no byte of any storage written."""
    names = ("ql_nope", "q_pe", "q_out", "scale")
    args = list(_args(op, device))
    i = names.index(name)
    if name != "scale":
        t, h, d = args[i].shape
        args[i] = random_bits((t + 1, h, d + 2), args[i].dtype, device)[1:, :, 1 : 1 + d]
    args[i].untyped_storage().resize_(held)
    check_rejected(args, _past_the_end(op, name, args[i], held))


# -------------------------------------------------------------------------------- huge sizes


@pytest.mark.parametrize("call", ENTRY_POINTS)
@pytest.mark.parametrize("nope_dim, rope_dim", [(2**62, 2**62), (2**63 - 1, 1)], ids=["2^62+2^62", "2^63-1+1"])
@pytest.mark.parametrize("op", OPS)
def test_width_overflowing_int64_is_refused(device, op, nope_dim, rope_dim, call):
    """0 tokens, ql_nope and q_pe expanded (stride 0) to last dims whose sum exceeds int64: the
    overflow message with both widths, nothing written."""
    args = list(_args(op, device, tokens=1, heads=1, nope_dim=1, rope_dim=1))
    args[0] = args[0].expand(0, 1, nope_dim)
    args[1] = args[1].expand(0, 1, rope_dim)
    args[2] = args[2][:0]
    check_rejected(args, f"{op}: nope_dim + rope_dim = {nope_dim} + {rope_dim} overflows int64", call=call)


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
    args = list(_args(op, device, tokens=tokens, heads=heads))
    for i, strides in enumerate((nope_strides, pe_strides, out_strides)):
        args[i] = args[i].as_strided(args[i].shape, strides)
        assert args[i].stride() == strides
    check_writes_reference(*args)


# ---------------------------------------------------------------------------------- nested


NESTED = "{op}: nested tensors are not supported; pass dense [tokens, heads, dim] tensors (for example nt.to_padded_tensor(0))"


def _nested(dense, layout):
    """A nested tensor of `dense`'s dtype and device with two pieces of its trailing shape (token
    counts 2 and 1); built in float32 and converted, as torch cannot build a strided float8 one."""
    piece = torch.zeros((1, *dense.shape[1:]), dtype=torch.float32, device=dense.device)
    nested = torch.nested.nested_tensor([piece.expand(2, *dense.shape[1:]).clone(), piece], layout=layout)
    return nested.to(dense.dtype)


NESTED_CASES = [pytest.param(op, name, id=f"{op}-{name}") for op in OPS
                for name in ("ql_nope", "q_pe", "q_out") + (("scale",) if op == "concat_mla_q_fp8" else ())]


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("layout", [torch.jagged, torch.strided], ids=["jagged", "strided"])
@pytest.mark.parametrize("op, name", NESTED_CASES)
def test_nested_tensor_argument_is_refused(device, op, name, layout):
    """A jagged or strided nested tensor as any one argument: the nested-tensor message, and no byte
    of the dense arguments' storages or of the nested tensor's values changed. (A jagged tensor's
    own storage cannot be read, so the snapshot takes its values() buffer.)"""
    names = ("ql_nope", "q_pe", "q_out", "scale")
    args = list(_args(op, device))
    i = names.index(name)
    dense = args[i]
    args[i] = _nested(dense, layout)
    assert args[i].is_nested and args[i].dtype == dense.dtype and args[i].layout == layout
    storages = [a.values() if a.is_nested else a for a in args]
    before = snapshot(*storages)
    with pytest.raises(RuntimeError, match=re.escape(NESTED.format(op=op))):
        call_op(*args)
    assert_storages(before, storages, "a rejected call wrote")


# ------------------------------------------------------------------------ bounded overlap search

ADVERSARIAL_R = 64
ADVERSARIAL_M = 6 * ADVERSARIAL_R * ADVERSARIAL_R
SEARCH_BOUND_S = 0.050  # generous: the bound exists to catch a search that runs away, on a loaded CI host


def _adversarial(op, device, which):
    """Views of ONE buffer whose byte sets the search cannot settle within its bound: q_out
    [R+1, R+1, R+2] with strides (M, M+R+1, M+2R+3) and, per `which`, ql_nope [R+1, R+1, R+1] with
    strides (M+1, M+2, M+3) at M/2 and/or q_pe [R+1, R+1, 1] with strides (M+5, M+7, 1) at M/3
    (M = 6 R^2, R = 64; element units of bfloat16). The fp8 op's q_out is the same bytes as
    float8_e4m3fn (strides doubled). Inputs not in `which` are separate contiguous tensors."""
    r, m = ADVERSARIAL_R, ADVERSARIAL_M
    out_layout = ((r + 1, r + 1, r + 2), (m, m + r + 1, m + 2 * r + 3), 0)
    nope_layout = ((r + 1, r + 1, r + 1), (m + 1, m + 2, m + 3), m // 2)
    pe_layout = ((r + 1, r + 1, 1), (m + 5, m + 7, 1), m // 3)
    extent = max(offset + sum((n - 1) * s for n, s in zip(size, strides)) + 1
                 for size, strides, offset in (out_layout, nope_layout, pe_layout))
    buf = random_bits((extent,), torch.bfloat16, device)
    args = list(_args(op, device, tokens=r + 1, heads=r + 1, nope_dim=r + 1, rope_dim=1))
    if op == "concat_mla_q":
        args[2] = buf.as_strided(*out_layout)
    else:
        size, strides, offset = out_layout
        args[2] = buf.view(FP8).as_strided(size, tuple(2 * s for s in strides), 2 * offset)
    if "ql_nope" in which:
        args[0] = buf.as_strided(*nope_layout)
    if "q_pe" in which:
        args[1] = buf.as_strided(*pe_layout)
    return args


def _undecided(op, name, q_out, other):
    return (f"{op}: could not decide within the search bound whether q_out and {name} share bytes (q_out "
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
    check_rejected(args, _undecided(op, named, args[2], args[0 if named == "ql_nope" else 1]), call=_timed(call_op, times))
    print(f"{op} adversarial {'+'.join(which)}: {times[0] * 1e3:.3f} ms")
    assert times[0] < SEARCH_BOUND_S, times


# q_out [s, s, s] with strides (M, M+1, M+s), M = s(s+1)+1: no two indices share an element, but
# the exact search enumerates ~1.5 s^2 candidate differences, past its step bound from s ~ 255.
SELF_S = 260
SELF_M = SELF_S * (SELF_S + 1) + 1


def test_q_out_whose_self_overlap_the_search_cannot_settle_is_refused_quickly(device):
    """A float8 q_out [260, 260, 260] with strides (M, M+1, M+260), M = 260*261+1, for
    concat_mla_q_fp8: refused with the "could not decide ... addresses an element twice" message
    in under 50 ms of host time, and nothing written. (The fp8 op's 1-byte q_out keeps the storage
    half the size of a 16-bit one.)"""
    s, m = SELF_S, SELF_M
    strides = (m, m + 1, m + s)
    buf = torch.zeros(sum((s - 1) * x for x in strides) + 1, dtype=FP8, device=device)
    q_out = buf.as_strided((s, s, s), strides)
    ql_nope = random_bits((1, 1, s - 1), torch.bfloat16, device).expand(s, s, s - 1)
    q_pe = random_bits((1, 1, 1), torch.bfloat16, device).expand(s, s, 1)
    times = []
    message = (f"concat_mla_q_fp8: could not decide within the search bound whether q_out (shape [{s}, {s}, {s}], "
               f"strides {list(strides)}) addresses an element twice; pass a contiguous q_out")
    check_rejected((ql_nope, q_pe, q_out, scalar(1.0, device)), message, call=_timed(call_op, times))
    print(f"concat_mla_q_fp8 adversarial self overlap: {times[0] * 1e3:.3f} ms")
    assert times[0] < SEARCH_BOUND_S, times


# ------------------------------------------------------- shared-buffer property test (brute force)

CALL_BOUND_S = 0.020
PRIMES = [1, 2, 3, 5, 7, 11, 13, 17, 19, 23]


@st.composite
def _strides(draw, shape, base):
    """Element strides for `shape`: near `base`, near multiples of it, from a pairwise coprime set,
    or dense in a random dim order."""
    family = draw(st.sampled_from(["near", "multiples", "coprime", "dense"]))
    if family == "dense":
        order = draw(st.permutations(range(3)))
        strides, step = [0, 0, 0], 1
        for d in reversed(order):
            strides[d] = step
            step *= shape[d]
        return tuple(strides)
    if family == "near":
        return tuple(max(0, base + draw(st.integers(-2, 2))) for _ in range(3))
    if family == "multiples":
        return tuple(max(0, base * draw(st.integers(0, 4)) + draw(st.integers(-1, 1))) for _ in range(3))
    return tuple(draw(st.sampled_from(PRIMES)) for _ in range(3))


@st.composite
def _shared_buffer_problem(draw, op):
    """Shapes (each dim <= 6, width <= 8), and for q_out, ql_nope, q_pe (and the fp8 op's scale,
    sometimes) a (dtype, shape, strides, element offset) into one shared byte buffer."""
    tokens, heads = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    nope_dim = draw(st.integers(0, 6))
    rope_dim = draw(st.integers(0, 8 - nope_dim))
    pe_heads = draw(st.sampled_from([heads, 1]))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    out_dtype = dtype if op == "concat_mla_q" else FP8
    base = draw(st.integers(1, 24))
    views = []
    for view_dtype, shape in ((dtype, (tokens, heads, nope_dim)), (dtype, (tokens, pe_heads, rope_dim)),
                              (out_dtype, (tokens, heads, nope_dim + rope_dim))):
        views.append((view_dtype, shape, draw(_strides(shape, base)), draw(st.integers(0, 48))))
    if op == "concat_mla_q_fp8" and draw(st.booleans()):
        out_bytes = [b for element in _byte_offsets(*views[2]) for b in element]
        if out_bytes and draw(st.booleans()):  # on a byte of q_out, so that the scale check gets its turn
            offset = draw(st.sampled_from(out_bytes)) // 4
        else:
            offset = draw(st.integers(0, 24))
        views.append((torch.float32, (1,), (1,), offset))
    return views, draw(st.integers(0, 2**31 - 1))


def _byte_offsets(dtype, shape, strides, offset):
    """The bytes each element of the view covers, per element (brute force over its indices)."""
    if 0 in shape:
        return []
    extent = offset + sum((n - 1) * s for n, s in zip(shape, strides)) + 1
    elements = torch.arange(extent).as_strided(shape, strides, offset).flatten().tolist()
    size = dtype.itemsize
    return [range(e * size, (e + 1) * size) for e in elements]


def _expected_message(op, views):
    """What the validator must decide, from byte sets: None (accept) or the first failed check's message."""
    out = _byte_offsets(*views[2])
    out_bytes = set().union(*map(set, out)) if out else set()
    if len(out_bytes) < sum(len(b) for b in out):
        _, shape, strides, _ = views[2]
        return (f"{op}: q_out must not overlap itself, got shape {list(shape)} with strides {list(strides)}, "
                "which address one element from two indices")
    for name, view in zip(("ql_nope", "q_pe", "scale"), views[:2] + views[3:]):
        if any(b in out_bytes for element in _byte_offsets(*view) for b in element):
            return f"{op}: q_out must not overlap {name} in memory, got views that share bytes"
    return None


def _check_shared_buffer_draw(device, op, problem):
    views, seed = problem
    torch.manual_seed(seed)
    extent = max(offset + sum((n - 1) * s for n, s in zip(shape, strides)) + 1 for _, shape, strides, offset in views)
    buf = random_bits((8 * extent + 8,), torch.uint8, device)
    args = [buf.view(dtype).as_strided(shape, strides, offset) for dtype, shape, strides, offset in views]
    if len(args) == 3 and op == "concat_mla_q_fp8":
        args.append(scalar(0.37, device))
    message = _expected_message(op, views)
    times = []

    def call(*a):
        try:
            return call_op(*a)
        except RuntimeError as error:
            assert "could not decide" not in str(error), error
            raise

    timed = _timed(call, times)
    what = "; ".join(f"{tuple(t.shape)} {t.stride()} +{t.storage_offset()} {t.dtype}" for t in args)
    try:
        if message is None:
            event("accepted")
            check_writes_reference(*args, call=timed)
        else:
            event(message.split(": ", 1)[1][:30])
            check_rejected(args, message, call=timed)
    except BaseException as error:
        raise AssertionError(f"{what}: expected {message or 'success'}") from error
    if times[0] >= CALL_BOUND_S:  # one retry: a preempted call on a busy machine is not a slow search
        try:
            timed(*args)
        except RuntimeError:
            pass
    assert min(times) < CALL_BOUND_S, (what, times)


@pytest.mark.parametrize("op", OPS)
@settings(max_examples=300)
@given(data=st.data())
def test_shared_buffer_views_are_decided_like_brute_force(device, op, data):
    """q_out, ql_nope, q_pe (and sometimes the fp8 op's scale) drawn as strided views of ONE small
    byte buffer, with strides near a common value, near multiples of it, coprime or dense, and random
    offsets: the op accepts exactly when brute-force byte sets find q_out addressing no byte twice and
    sharing none with an input (then bit-exact, nothing else written), otherwise raises the first
    failed check's message writing nothing; never "could not decide"; each call under 20 ms."""
    _check_shared_buffer_draw(device, op, data.draw(_shared_buffer_problem(op)))


# ---------------------------------------------------------------- torch.compile functionalization


def _fill(ql_nope, q_pe, q_out):
    torch.ops._C.concat_mla_q(ql_nope, q_pe, q_out)
    return q_out


class _Fill(torch.nn.Module):
    def forward(self, ql_nope, q_pe, q_out):
        return _fill(ql_nope, q_pe, q_out)


def _q_pe_inside_q_out(device):
    """q_out contiguous [T, H, N + R] and q_pe = q_out[..., N:], its last R columns."""
    q_out = random_bits((T, H, W), torch.bfloat16, device)
    return random_bits((T, H, N), torch.bfloat16, device), q_out[..., N:], q_out


def _compiled(backend):
    def call(*args):
        torch._dynamo.reset()
        try:
            return torch.compile(_fill, backend=backend, fullgraph=True)(*args)
        finally:
            torch._dynamo.reset()
    return call


def _exported(*args):
    return torch.export.export(_Fill(), args).module()(*args)


@pytest.mark.parametrize("call", [pytest.param(_fill, id="eager"), pytest.param(_compiled("inductor"), id="inductor"),
                                  pytest.param(_exported, id="export")])
def test_q_pe_inside_q_out_is_refused_eager_compiled_and_exported(device, call):
    """q_pe = q_out[..., N:]: eager, torch.compile with Inductor and a torch.export'ed module all
    raise the q_pe overlap message and write nothing."""
    with torch.no_grad():
        check_rejected(_q_pe_inside_q_out(device), "concat_mla_q: q_out must not overlap q_pe in memory", call=call)


def test_aot_eager_hides_q_pe_inside_q_out(device):
    """Documents a torch limitation, not a promise: under torch.compile(backend="aot_eager"),
    functionalization hands the op a copy of the mutated q_out, so q_pe = q_out[..., N:] no longer
    shares bytes with what the op writes. The call is accepted, and q_out ends up holding
    cat(ql_nope, q_pe's values from before the call); ql_nope is unchanged."""
    ql_nope, q_pe, q_out = _q_pe_inside_q_out(device)
    expected = reference(ql_nope, q_pe.clone())
    nope_before = snapshot(ql_nope)
    with torch.no_grad():
        _compiled("aot_eager")(ql_nope, q_pe, q_out)
    assert_bitwise_equal(q_out, expected)
    assert_storages(nope_before, [ql_nope], "ql_nope changed")
