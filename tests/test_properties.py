"""Property tests, for every op: hypothesis draws token counts, head counts, nope and rope widths, a
dtype, a scale and, for each of the three tensors, its own layout (contiguous, token/head-transposed
storage, a slice of a wider buffer at a random element offset, a strided last dim; for q_pe also one
head or heads expanded with stride 0).

* Valid draws: q_out holds the op's reference (random bit patterns, NaNs included; q_out poisoned
  with random bits beforehand), and no byte outside q_out's elements changes (gaps, inputs).
* Invalid draws, one test per kind of fault (a dtype, a size, q_out overlapping itself or an input
  through a shared buffer, a tensor on another device): RuntimeError with the validator's message,
  and every byte of every storage involved unchanged.

Examples per test come from the hypothesis profile (tests/conftest.py; HYPOTHESIS_PROFILE=ci|gpu):
"ci" runs a fixed derandomized set (per device: 150 valid draws, 25 of each kind of invalid one),
"gpu" a long randomized hunt (2000 valid, 333 of each invalid kind). Every example seeds torch from
a drawn seed, so a failure replays with its bits.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from mla_helpers import (
    CALLS,
    FP8,
    OPS,
    OP_LIST,
    assert_refused,
    assert_writes_reference,
    is_nope_half_of,
    valid_args,
)
from vllm_mla_ops.testing import (
    contiguous,
    heads_major,
    heads_stride_0,
    inside_bigger,
    one_head,
    random_bits,
    shifted,
    strided_last_dim,
    token_stride_0,
)

# Elements of all three tensors' buffers together, per example (tens of ms on 2 CPU cores);
# the token count shrinks to fit, down to 1.
ELEMENT_BUDGET = 2_000_000
MAX_TOKENS = 300
HALF = (torch.float16, torch.bfloat16)

VALID_EXAMPLES = settings.default.max_examples
# Each kind of invalid input is its own test, so every kind is drawn: 25 a kind and op in "ci".
PER_MUTATION_EXAMPLES = max(10, settings.default.max_examples // 6)


# ---------------------------------------------------------------------------------- layouts
# The layout builders of vllm_mla_ops.testing, with drawn offsets, row pitches and steps.


@st.composite
def _shifted(draw):
    """Columns [col, col + dim) of a [tokens, heads, dim + pad] buffer `offset` elements into its
    allocation (odd offsets and columns misalign every row)."""
    pad = draw(st.one_of(st.integers(1, 16), st.sampled_from([64, 128, 512])))
    col = draw(st.one_of(st.integers(0, pad), st.just(pad)))
    return shifted(draw(st.integers(0, 67)), pad, col)


LAYOUTS = [
    st.just(contiguous),
    st.just(heads_major),
    st.just(inside_bigger),
    _shifted(),
    st.builds(strided_last_dim, st.integers(2, 3), st.integers(0, 67)),
]
INPUT_ONLY_LAYOUTS = [st.just(token_stride_0)]  # q_out would address its elements twice
PE_ONLY_LAYOUTS = [st.just(one_head), st.just(heads_stride_0)]
# Scales with an inf, zero or subnormal reciprocal, NaN, negative, and any float32.
SCALES = st.one_of(st.sampled_from([1.0, 1 / 448, 0.0037, 100.0, 1e-40, 3e38, 0.0, float("inf"), float("nan"),
                                    -2.5]), st.floats(width=32))


def _kind(layout) -> str:
    return layout.__name__.split("(")[0]


def _elements_per_token(layout, heads: int, dim: int) -> int:
    return layout((1, heads, dim), torch.uint8, "cpu").untyped_storage().nbytes()


# --------------------------------------------------------------------------------- problems

# Widths 1..1100, with extra weight on multiples of 8 (the vectorized paths) and MLA's widths.
WIDTHS = st.one_of(st.sampled_from([512, 64, 256, 32]), st.integers(1, 1100 // 8).map(lambda k: 8 * k),
                   st.integers(1, 1100))


@dataclasses.dataclass(frozen=True)
class Problem:
    tokens: int
    heads: int
    nope_dim: int
    rope_dim: int
    dtype: torch.dtype
    nope_layout: Callable
    pe_layout: Callable
    out_layout: Callable
    scale: float
    seed: int
    op: object = None  # an mla_helpers.Op, set by the test

    @property
    def width(self) -> int:
        return self.nope_dim + self.rope_dim

    @property
    def out_dtype(self) -> torch.dtype:
        return self.op.out_dtype(self.dtype)

    def nope(self, device, dtype=None, shape=None):
        return self.nope_layout(shape or (self.tokens, self.heads, self.nope_dim), dtype or self.dtype, device)

    def pe(self, device, dtype=None, shape=None, layout=None):
        return (layout or self.pe_layout)(shape or (self.tokens, self.heads, self.rope_dim), dtype or self.dtype,
                                          device)

    def out(self, device, dtype=None, shape=None):
        return self.out_layout(shape or (self.tokens, self.heads, self.width), dtype or self.out_dtype, device)

    def args(self, device, **given) -> dict:
        """The op's arguments (mla_helpers.valid_args with the drawn sizes, layouts and scale), but
        for those `given` by name."""
        args = valid_args(self.op, device, dtype=self.dtype, tokens=self.tokens, heads=self.heads,
                          nope_dim=self.nope_dim, rope_dim=self.rope_dim,
                          layouts=(self.nope_layout, self.pe_layout, self.out_layout), scale=self.scale)
        args.update(given)
        return args

    def record(self) -> None:
        """Statistics for --hypothesis-show-statistics: which layouts and sizes the run covered."""
        for name, layout in (("ql_nope", self.nope_layout), ("q_pe", self.pe_layout), ("q_out", self.out_layout)):
            event(f"{name} layout", _kind(layout))
        event("widths", "512/64" if (self.nope_dim, self.rope_dim) == (512, 64) else
              "256/32" if (self.nope_dim, self.rope_dim) == (256, 32) else
              "both multiples of 8" if self.nope_dim % 8 == 0 and self.rope_dim % 8 == 0 else "other")
        elements = self.tokens * self.heads * self.width
        event("q_out elements", "0" if elements == 0 else "<10k" if elements < 10_000 else
              "10k..100k" if elements < 100_000 else ">=100k")
        event("tokens", "0" if self.tokens == 0 else "1" if self.tokens == 1 else
              "2..31" if self.tokens < 32 else "32..300")


@st.composite
def problems(draw) -> Problem:
    nope_dim, rope_dim = draw(st.one_of(st.just((512, 64)), st.just((256, 32)), st.tuples(WIDTHS, WIDTHS)))
    heads = draw(st.one_of(st.sampled_from([1, 16, 128]), st.integers(1, 130)))
    dtype = draw(st.sampled_from(HALF))
    nope_layout = draw(st.one_of(LAYOUTS + INPUT_ONLY_LAYOUTS))
    pe_layout = draw(st.one_of(LAYOUTS + INPUT_ONLY_LAYOUTS + PE_ONLY_LAYOUTS))
    out_layout = draw(st.one_of(LAYOUTS))
    per_token = (_elements_per_token(nope_layout, heads, nope_dim) + _elements_per_token(pe_layout, heads, rope_dim)
                 + _elements_per_token(out_layout, heads, nope_dim + rope_dim))
    max_tokens = max(1, min(MAX_TOKENS, ELEMENT_BUDGET // max(1, per_token)))
    # Zero tokens in about 1 draw of 16 (hypothesis would otherwise favour the bound).
    tokens = 0 if draw(st.integers(0, 15)) == 15 else draw(st.integers(1, max_tokens))
    return Problem(tokens, heads, nope_dim, rope_dim, dtype, nope_layout, pe_layout, out_layout, draw(SCALES),
                   draw(st.integers(0, 2**31 - 1)))


ENTRY = st.sampled_from([p.values[0] for p in CALLS])


def _seed(problem: Problem) -> None:
    torch.manual_seed(problem.seed)  # all devices: the example's bits replay with it


# ------------------------------------------------------------------------------------ valid


@pytest.mark.parametrize("op", OPS)
@settings(max_examples=VALID_EXAMPLES)
@given(problem=problems(), call=ENTRY)
def test_valid_draws_match_the_reference(device, op, problem, call):
    """The op's reference (concat_mla_q: torch.cat's bits; concat_mla_q_fp8: the quantized reference
    at the drawn scale)."""
    problem = dataclasses.replace(problem, op=op)
    problem.record()
    _seed(problem)
    assert_writes_reference(op, problem.args(device), call=call)


# ---------------------------------------------------------------------------------- invalid


def _pick_other(draw, lo: int, hi: int, avoid) -> int:
    """An integer in [lo, hi] outside `avoid` (drawn without a filter, which small ranges defeat)."""
    return draw(st.sampled_from([v for v in range(lo, hi + 1) if v not in avoid]))


def _wrong_dtype(draw, p: Problem, device, which: str):
    if which == "ql_nope":
        bad = draw(st.sampled_from([torch.float32, torch.float64, torch.int16, torch.uint8, torch.int32]))
        return (p.args(device, ql_nope=p.nope(device, dtype=bad)),
                f"{p.op.name}: ql_nope must be float16 or bfloat16 dtype, got {bad}")
    other_half = HALF[1 - HALF.index(p.dtype)]
    if which == "q_pe":
        bad = draw(st.sampled_from([other_half, torch.float32, torch.int16, torch.uint8]))
        return (p.args(device, q_pe=p.pe(device, dtype=bad)),
                f"{p.op.name}: q_pe must have ql_nope's dtype {p.dtype}, got {bad}")
    candidates = [p.dtype, other_half, torch.float32, torch.int16, torch.uint8, FP8, torch.float8_e5m2]
    bad = draw(st.sampled_from([t for t in candidates if t != p.out_dtype]))
    message = f"{p.op.name}: " + p.op.out_dtype_error.format(dtype=p.dtype, bad=bad)
    return p.args(device, q_out=p.out(device, dtype=bad)), message


def _wrong_size(draw, p: Problem, device, what: str):
    t, h, w = p.tokens, p.heads, p.width
    if what.startswith("q_pe"):
        layout = None
        if what == "q_pe tokens":
            shape = (_pick_other(draw, 0, t + 3, {t}), h, p.rope_dim)
        else:  # heads neither `heads` nor 1; a one-head layout becomes an expanded one
            shape = (t, _pick_other(draw, 0, h + 3, {h, 1}), p.rope_dim)
            layout = heads_stride_0 if p.pe_layout is one_head else None
        q_pe = p.pe(device, shape=shape, layout=layout)
        message = (f"{p.op.name}: q_pe must be [tokens, heads or 1, rope_dim] with tokens={t} and heads={h} "
                   f"from ql_nope, got shape {list(q_pe.shape)}")
        return p.args(device, q_pe=q_pe), message
    shape = {
        "q_out tokens": lambda: (_pick_other(draw, 0, t + 3, {t}), h, w),
        "q_out heads": lambda: (t, _pick_other(draw, 0, h + 3, {h}), w),
        "q_out width": lambda: (t, h, _pick_other(draw, 0, w + 8, {w})),
    }[what]()
    message = (f"{p.op.name}: q_out must be [tokens, heads, nope_dim + rope_dim] = [{t}, {h}, {w}], "
               f"got shape {list(shape)}")
    return p.args(device, q_out=p.out(device, shape=shape)), message


def _wrong_scale(draw, p: Problem, device, what: str):
    if what == "scale dtype":
        bad = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32]))
        scale = torch.tensor([p.scale], device=device).to(bad)
        return p.args(device, scale=scale), f"{p.op.name}: scale must be a torch.float32 tensor, got {bad}"
    shape = draw(st.sampled_from([(0,), (2,), (p.tokens + 2,), (1, 3), (2, 1, 1)]))
    scale = torch.full(shape, p.scale, device=device)
    return p.args(device, scale=scale), (f"{p.op.name}: scale must have one element (a per-tensor scale), "
                                         f"got shape {list(shape)}")


def _overlap(p: Problem, name: str) -> str:
    return f"{p.op.name}: q_out must not overlap {name} in memory, got views that share bytes"


def _input_inside_out(draw, p: Problem, device, which: str):
    """The input is a view of some of q_out's own elements (q_out in its drawn layout)."""
    q_out = p.out(device)
    if which == "ql_nope":  # not q_out[..., :nope_dim], which the ops accept (see is_nope_half_of)
        col = draw(st.integers(1, p.rope_dim))
        return p.args(device, ql_nope=q_out[..., col : col + p.nope_dim], q_out=q_out), _overlap(p, "ql_nope")
    col = draw(st.integers(0, p.nope_dim))
    form = draw(st.sampled_from(["all heads", "one head", "one head expanded"]))
    if form == "all heads":
        q_pe = q_out[..., col : col + p.rope_dim]
    else:
        head = draw(st.integers(0, p.heads - 1))
        q_pe = q_out[:, head : head + 1, col : col + p.rope_dim]
        if form == "one head expanded":
            q_pe = q_pe.expand(p.tokens, p.heads, p.rope_dim)
    return p.args(device, q_pe=q_pe, q_out=q_out), _overlap(p, "q_pe")


def _dense_views_of_one_buffer(draw, p: Problem, device, which: str):
    """q_out and the input are dense views of one flat buffer whose element ranges intersect (the
    input possibly token/head transposed): they share at least one element."""
    t, h = p.tokens, p.heads
    dim = p.nope_dim if which == "ql_nope" else p.rope_dim
    n_out, n_in = t * h * p.width, t * h * dim
    shift = draw(st.integers(-(n_in - 1), n_out - 1))  # input start relative to q_out's
    out_start = n_in
    flat = random_bits((out_start + max(n_out, shift + n_in),), p.dtype, device)
    q_out = flat[out_start : out_start + n_out].view(t, h, p.width)
    piece = flat[out_start + shift : out_start + shift + n_in]
    if draw(st.booleans()):
        view = piece.view(h, t, dim).transpose(0, 1)
    else:
        view = piece.view(t, h, dim)
    if which == "ql_nope":
        assume(not is_nope_half_of(view, q_out))  # the ops accept it (see is_nope_half_of)
    return p.args(device, **{which: view, "q_out": q_out}), _overlap(p, which)


def _out_overlaps_itself(draw, p: Problem, device):
    """q_out's strides address some element from two indices: along tokens or heads with a stride
    below the row width (0 included), or along the last dim with stride 0."""
    t, h, w = p.tokens, p.heads, p.width
    dims = [d for d, size in ((0, t), (1, h)) if size >= 2] + [2]  # w >= 2 always
    dim = draw(st.sampled_from(dims))
    if dim == 2:
        strides = (h, 1, 0)
    elif dim == 1:
        strides = (h * w, draw(st.integers(0, w - 1)), 1)
    else:
        strides = (draw(st.integers(0, w - 1)), w, 1)
    offset = draw(st.integers(0, 67))
    extent = offset + sum((n - 1) * s for n, s in zip((t, h, w), strides)) + 1
    q_out = random_bits((extent,), p.out_dtype, device).as_strided((t, h, w), strides, offset)
    return p.args(device, q_out=q_out), f"{p.op.name}: q_out must not overlap itself, got shape "


def _mixed_devices(draw, p: Problem, device):
    """One tensor argument moved to the CPU: the first argument (after ql_nope, in schema order) on
    another device than ql_nope is named."""
    args = p.args(device)
    which = draw(st.sampled_from(p.op.tensor_args))
    args[which] = args[which].cpu()
    first = next(name for name in p.op.tensor_args[1:] if args[name].device != args["ql_nope"].device)
    message = f"{p.op.name}: {first} must be on ql_nope's device {args['ql_nope'].device}, got {args[first].device}"
    return args, message


MUTATIONS = {
    "ql_nope dtype": lambda draw, p, d: _wrong_dtype(draw, p, d, "ql_nope"),
    "q_pe dtype": lambda draw, p, d: _wrong_dtype(draw, p, d, "q_pe"),
    "q_out dtype": lambda draw, p, d: _wrong_dtype(draw, p, d, "q_out"),
    "q_pe tokens": lambda draw, p, d: _wrong_size(draw, p, d, "q_pe tokens"),
    "q_pe heads": lambda draw, p, d: _wrong_size(draw, p, d, "q_pe heads"),
    "q_out tokens": lambda draw, p, d: _wrong_size(draw, p, d, "q_out tokens"),
    "q_out heads": lambda draw, p, d: _wrong_size(draw, p, d, "q_out heads"),
    "q_out width": lambda draw, p, d: _wrong_size(draw, p, d, "q_out width"),
    "ql_nope inside q_out": lambda draw, p, d: _input_inside_out(draw, p, d, "ql_nope"),
    "q_pe inside q_out": lambda draw, p, d: _input_inside_out(draw, p, d, "q_pe"),
    "ql_nope shares q_out's buffer": lambda draw, p, d: _dense_views_of_one_buffer(draw, p, d, "ql_nope"),
    "q_pe shares q_out's buffer": lambda draw, p, d: _dense_views_of_one_buffer(draw, p, d, "q_pe"),
    "q_out overlaps itself": _out_overlaps_itself,
    "mixed devices": _mixed_devices,
    "scale dtype": lambda draw, p, d: _wrong_scale(draw, p, d, "scale dtype"),
    "scale size": lambda draw, p, d: _wrong_scale(draw, p, d, "scale size"),
}
# Inputs as views of q_out's elements need q_out of the inputs' dtype; overlaps between tensors of
# different element sizes are test_validation.py's (its enumerated cases and its brute-force draws).
SAME_DTYPE_ONLY = {"ql_nope inside q_out", "q_pe inside q_out", "ql_nope shares q_out's buffer",
                   "q_pe shares q_out's buffer"}
SCALE_ONLY = {"scale dtype", "scale size"}


def _applies(op, mutation: str) -> bool:
    if mutation in SAME_DTYPE_ONLY:
        return op.out_dtype(torch.bfloat16) == torch.bfloat16
    return mutation not in SCALE_ONLY or op.scale is not None


INVALID_CASES = [pytest.param(op, mutation, id=f"{op.id}-{mutation}") for op in OP_LIST for mutation in MUTATIONS
                 if _applies(op, mutation)]
NEEDS_ELEMENTS = {"ql_nope inside q_out", "q_pe inside q_out", "ql_nope shares q_out's buffer",
                  "q_pe shares q_out's buffer", "q_out overlaps itself"}


@pytest.mark.parametrize("op, mutation", INVALID_CASES)
@settings(max_examples=PER_MUTATION_EXAMPLES)
@given(problem=problems(), call=ENTRY, data=st.data())
def test_invalid_draws_raise_and_write_nothing(device, op, mutation, problem, call, data):
    if mutation == "mixed devices" and device != "cuda":
        pytest.skip("mixed devices need CUDA")
    problem = dataclasses.replace(problem, op=op)
    problem.record()
    if mutation in NEEDS_ELEMENTS and problem.tokens == 0:
        problem = dataclasses.replace(problem, tokens=1)  # an empty q_out overlaps nothing, not even itself
    if mutation == "ql_nope inside q_out" and problem.rope_dim == 0:
        problem = dataclasses.replace(problem, rope_dim=1)  # room for a ql_nope that is not q_out's nope half
    _seed(problem)
    args, message = MUTATIONS[mutation](data.draw, problem, device)
    assert_refused(op, args, message, call=call)
