"""What the tests share beyond vllm_mla_ops.testing: the list of ops and how a test drives one
(valid arguments, the two ways to call it, its reference), the pytest parameters (dtypes, layout
combinations, the CUDA kernels' pack and launch paths), the brute-force overlap oracle, and the two
checks every test ends in: the op wrote exactly its reference, or it raised and wrote nothing.

Both checks compare raw bytes of whole storages, so a write outside the written tensor's elements
(into a gap of a strided q_out, an input, the scale) fails as surely as a wrong value.

An op with the concat ops' kind of arguments joins every op-parametrized test by adding its Op to
OP_LIST (see Op); concat_mla_rope's arguments are not of that kind, and tests/test_concat_mla_rope.py
makes the same checks for them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Sequence
from unittest import mock

import pytest
import torch

import vllm_mla_ops
from vllm_mla_ops.testing import (
    ENGINE_CASES,
    assert_bitwise_equal,
    assert_fp8_equal,
    bits,
    contiguous,
    heads_major,
    heads_stride_0,
    inside_bigger,
    last_dim_stride_2,
    nope_of_kv,
    one_head,
    random_bits,
    reference,
    reference_fp8,
    rope_of_latent,
    shifted,
    split_of_wider,
    token_stride_0,
)

FP8 = torch.float8_e4m3fn
HALF_DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]

# The one shape set of the small tests: tokens, heads, nope_dim, rope_dim (and q_out's width).
T, H, N, R = 6, 4, 12, 4
W = N + R


def scalar(value: float, device) -> torch.Tensor:
    """A per-tensor scale: one float32 element."""
    return torch.tensor([value], dtype=torch.float32, device=device)


def poison(t: torch.Tensor) -> None:
    """Fresh random bits in t's elements (written as raw integers: no float arithmetic involved)."""
    bits(t).copy_(random_bits(t.shape, bits(t).dtype, t.device))


# ----------------------------------------------------------------------------------------- ops


_OUT_DTYPES: dict = {}


@dataclasses.dataclass(frozen=True)
class Op:
    """One op of the package as the tests drive it; OP_LIST holds them all.

    * ``id``: its name in test ids.
    * ``name``: the op under ``torch.ops._C`` (and the prefix of its error messages).
    * ``function``: its Python function; ``out=`` fills the schema argument named by ``out``, the
      other arguments go by their schema names.
    * ``make_args(device, *, dtype, tokens, heads, nope_dim, rope_dim, pe_heads, layouts, scale)``:
      valid arguments as a dict in schema order (tests call it through valid_args).
    * ``reference(args)``: ``{written argument: what it must hold after the call}``.
    * ``compare(actual, expected, what)``: the comparison the op's contract calls for.
    * ``out_dtype_error``: the message (after ``"{op}: "``) for a q_out of dtype ``{bad}`` when the
      inputs are ``{dtype}``.
    * ``scale``: the argument holding the static fp8 scale, for ops that quantize.
    """

    id: str
    name: str
    function: Callable
    make_args: Callable[..., dict]
    reference: Callable[[dict], dict]
    compare: Callable
    out_dtype_error: str
    scale: str | None = None
    out: str = "q_out"

    @property
    def raw(self):
        return getattr(torch.ops._C, self.name).default

    @functools.cached_property
    def arg_names(self) -> list[str]:
        return [a.name for a in self.raw._schema.arguments]

    @functools.cached_property
    def tensor_args(self) -> list[str]:
        """The schema's tensor arguments, in order (optional ones included)."""
        return [a.name for a in self.raw._schema.arguments if "Tensor" in str(a.type)]

    @functools.cached_property
    def written(self) -> list[str]:
        """The arguments the schema marks as written (``Tensor(a!)``)."""
        return [a.name for a in self.raw._schema.arguments if a.alias_info is not None and a.alias_info.is_write]

    @functools.cached_property
    def inputs(self) -> list[str]:
        """The tensor arguments the op only reads."""
        return [name for name in self.tensor_args if name not in self.written]

    def out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """q_out's dtype for inputs of `dtype` (that of valid_args' q_out)."""
        key = (self.id, dtype)
        if key not in _OUT_DTYPES:
            _OUT_DTYPES[key] = valid_args(self, dtype=dtype, tokens=1, heads=1, nope_dim=1, rope_dim=1)[self.out].dtype
        return _OUT_DTYPES[key]

    def allocating(self, out_dtype: torch.dtype) -> Callable:
        """A function of the op's arguments but ``out`` (positional, schema order) that allocates
        ``out`` as ``ql_nope.new_empty([tokens, heads, nope_dim + rope_dim], dtype=out_dtype)``,
        calls the raw op and returns it: what an engine's compiled graph does."""
        raw, names = self.raw, self.arg_names  # read here, not in a traced function
        given_names = [name for name in names if name != self.out]

        def build(*values):
            given = dict(zip(given_names, values))
            ql_nope, q_pe = given["ql_nope"], given["q_pe"]
            given[self.out] = ql_nope.new_empty(
                (ql_nope.shape[0], ql_nope.shape[1], ql_nope.shape[2] + q_pe.shape[2]), dtype=out_dtype)
            raw(*(given[name] for name in names))
            return given[self.out]

        return build

    def filling(self) -> Callable:
        """A function of all the op's arguments (positional, schema order) that calls the raw op and
        returns ``out``."""
        raw, index = self.raw, self.arg_names.index(self.out)

        def fill(*values):
            raw(*values)
            return values[index]

        return fill

    def __repr__(self) -> str:
        return self.id


def _q_args(device, dtype, tokens, heads, nope_dim, rope_dim, pe_heads, layouts, out_dtype) -> dict:
    nope_layout, pe_layout, out_layout = layouts
    return {"ql_nope": nope_layout((tokens, heads, nope_dim), dtype, device),
            "q_pe": pe_layout((tokens, pe_heads, rope_dim), dtype, device),
            "q_out": out_layout((tokens, heads, nope_dim + rope_dim), out_dtype, device)}


def _concat_mla_q_args(device, *, dtype, tokens, heads, nope_dim, rope_dim, pe_heads, layouts, scale):
    return _q_args(device, dtype, tokens, heads, nope_dim, rope_dim, pe_heads, layouts, dtype)


def _concat_mla_q_fp8_args(device, *, dtype, tokens, heads, nope_dim, rope_dim, pe_heads, layouts, scale):
    args = _q_args(device, dtype, tokens, heads, nope_dim, rope_dim, pe_heads, layouts, FP8)
    return {**args, "scale": torch.full((1,), scale, dtype=torch.float32, device=device)}


CONCAT_MLA_Q = Op(
    "concat_mla_q", "concat_mla_q", vllm_mla_ops.concat_mla_q, _concat_mla_q_args,
    lambda a: {"q_out": reference(a["ql_nope"], a["q_pe"])}, assert_bitwise_equal,
    out_dtype_error="q_out must have ql_nope's dtype {dtype}, got {bad}")
CONCAT_MLA_Q_FP8 = Op(
    "concat_mla_q_fp8", "concat_mla_q_fp8", vllm_mla_ops.concat_mla_q_fp8, _concat_mla_q_fp8_args,
    lambda a: {"q_out": reference_fp8(a["ql_nope"], a["q_pe"], a["scale"])}, assert_fp8_equal,
    out_dtype_error="q_out must be torch.float8_e4m3fn, got {bad}", scale="scale")

OP_LIST = [CONCAT_MLA_Q, CONCAT_MLA_Q_FP8]


def valid_args(op: Op, device="cpu", *, case: str | None = None, dtype: torch.dtype = torch.bfloat16,
               tokens: int = T, heads: int = H, nope_dim: int | None = None, rope_dim: int | None = None,
               pe_heads: int | None = None, layouts: Sequence[Callable] | None = None, scale: float = 0.37) -> dict:
    """Valid arguments of `op`: a dict in schema order, of fresh random bits (q_out's too, so a
    missed element shows). `layouts` builds (ql_nope, q_pe, q_out) (default: contiguous), with
    widths N and R unless given; `case` takes the layouts and widths of
    vllm_mla_ops.testing.engine_inputs ("decode", "contiguous", "k_side") instead. `pe_heads` 1
    gives a one-head q_pe; `scale` is the value of the fp8 ops' scale."""
    if case is not None:
        nope_layout, pe_layout, default_nope, default_rope = ENGINE_CASES[case]
        layouts = layouts or (nope_layout, pe_layout, random_bits)
    else:
        default_nope, default_rope = N, R
        layouts = layouts or (random_bits, random_bits, random_bits)
    return op.make_args(device, dtype=dtype, tokens=tokens, heads=heads,
                        nope_dim=default_nope if nope_dim is None else nope_dim,
                        rope_dim=default_rope if rope_dim is None else rope_dim,
                        pe_heads=heads if pe_heads is None else pe_heads, layouts=layouts, scale=scale)


OPS = [pytest.param(op, id=op.id) for op in OP_LIST]
# The ops that quantize with a static scale.
FP8_OPS = [pytest.param(op, id=op.id) for op in OP_LIST if op.scale is not None]
# The ops whose q_out has the inputs' dtype, so an input can be a view of q_out's own elements.
SAME_DTYPE_OPS = [pytest.param(op, id=op.id) for op in OP_LIST if op.out_dtype(torch.bfloat16) == torch.bfloat16]


def call_raw(op: Op, args: dict):
    """The raw op, arguments positional in schema order; returns what it returned (None)."""
    return op.raw(*args.values())


def call_function(op: Op, args: dict) -> torch.Tensor:
    """The Python function with torch's conventions (``out=`` for the written argument, the others
    by name); it must return the tensor it was given as ``out``."""
    result = op.function(**{("out" if name == op.out else name): value for name, value in args.items()})
    assert result is args[op.out], "the function did not return its out= tensor"
    return result


def call_function_allocating(op: Op, args: dict) -> torch.Tensor:
    """The Python function without ``out`` (``args[op.out]`` is ignored): returns what it allocated."""
    return op.function(**{name: value for name, value in args.items() if name != op.out})


CALLS = [pytest.param(call_raw, id="op"), pytest.param(call_function, id="api")]


# ------------------------------------------------------------------------------------- layouts

# (ql_nope, q_pe, q_out) layouts of the tests that enumerate: the engines' layouts and one of each
# stride kind; tests/test_properties.py draws every other combination.
LAYOUTS = [
    pytest.param(contiguous, contiguous, contiguous, id="contiguous"),
    pytest.param(heads_major, split_of_wider, contiguous, id="decode"),
    pytest.param(heads_major, split_of_wider, inside_bigger, id="decode-into-padded-out"),
    pytest.param(contiguous, one_head, contiguous, id="rope-1-head"),
    pytest.param(nope_of_kv, rope_of_latent, contiguous, id="k-side"),
    pytest.param(contiguous, heads_stride_0, inside_bigger, id="rope-expanded"),
    pytest.param(last_dim_stride_2, last_dim_stride_2, last_dim_stride_2, id="last-dims-stride-2"),
    pytest.param(inside_bigger, token_stride_0, heads_major, id="in-bigger-tokens-stride-0"),
    pytest.param(heads_major, one_head, last_dim_stride_2, id="decode-1-head-out-stride-2"),
]

# (nope_dim, rope_dim, heads) of public MLA models, before tensor parallelism divides the heads.
MODEL_GEOMETRIES = [
    pytest.param(512, 64, 128, id="deepseek-v3-512+64x128h"),
    pytest.param(512, 64, 16, id="deepseek-v2-lite-512+64x16h"),
    pytest.param(512, 64, 64, id="kimi-k2-512+64x64h"),
    pytest.param(256, 32, 40, id="minicpm3-256+32x40h"),
]

# (nope_dim, rope_dim): widths that allow 8-, 4-, 2- and 1-element packs; 1100 + 64 with a strided
# last dim is a row of over 1024 one-element packs (more than a block has threads).
WIDTHS = [pytest.param(n, r, id=f"{n}+{r}")
          for n, r in [(512, 64), (12, 4), (510, 66), (8, 8), (7, 3), (1, 1), (0, 5), (6, 0), (1100, 64)]]

# The CUDA launch paths and the boundaries between them, (tokens, heads) in the engines' layouts (rows
# of 72 packs on the Q side, 24 on the K side; offsets past 2^32 elements, the 64-bit path, are the
# `large` tests'). Row blocks with one row a thread under 2^16 packs (Q side 7 x 128 rows are 64,512
# packs, 8 x 128 are 73,728; K side 21 / 22 x 128), four under 2^20 (Q side 113 / 114 x 128), eight
# under 2^21 (Q side 227 / 228 x 128), two above. From 2^20 packs the flat split with four packs a
# thread for fp8 (Q side 113 / 114 x 128) and two for rows under 32 packs (K side 341 / 342 x 128),
# and with one pack a thread past 65,535 tokens (65,536 x 1). Blocks of lines * k rows that divide
# the heads (K side 128 heads: eight lines; Q side 64 x 60: three lines at four rows a thread,
# 200 x 120: three at eight; K side 20 heads: ten lines), fewer rows a thread where none do (Q side
# 64 x 20: two, not four; 800 x 20: two, not eight), and one row a thread with the last block of each
# token short of heads, its last head copied twice (13 heads: Q side 14 rows, K side 18; 64 x 13 at
# one row a thread by size, 800 x 13 at four by size).
ROW_COUNTS = [(1, 16), (4, 128), (7, 128), (8, 128), (21, 128), (22, 128), (113, 128), (114, 128), (227, 128),
              (228, 128), (341, 128), (342, 128), (65535, 1), (65536, 1), (64, 60), (200, 120), (64, 20), (800, 20),
              (64, 13), (800, 13)]
# For any widths, q_out's element count: under 2^20 elements is under 2^20 packs whatever the pack
# width; 2^23 elements are at least 2^20 packs even of 8 elements.
LAUNCH_PATHS = [pytest.param(2**18, id="small-output"), pytest.param(2**23, id="large-output")]


def tokens_for(elements: int, heads: int, width: int) -> int:
    """Tokens that give a [tokens, heads, width] q_out at least `elements` elements (no more than one
    token's worth over)."""
    return -(-elements // (heads * width))


# (nope layout, rope layout, out layout): which pack width each combination allows is in the id.
ALIGNMENTS = [
    pytest.param(shifted(0), shifted(0), shifted(0), id="aligned"),
    pytest.param(shifted(1), shifted(0), shifted(0), id="nope-off-by-1"),
    pytest.param(shifted(0), shifted(1), shifted(0), id="pe-off-by-1"),
    pytest.param(shifted(0), shifted(0), shifted(1), id="out-off-by-1"),
    pytest.param(shifted(0), shifted(0), shifted(2), id="out-off-by-2"),
    pytest.param(shifted(0), shifted(0), shifted(4), id="out-off-by-4"),
    pytest.param(shifted(2), shifted(2), shifted(2), id="all-off-by-2"),
    pytest.param(shifted(4), shifted(4), shifted(4), id="all-off-by-4"),
    pytest.param(shifted(0, 1), shifted(0), shifted(0, 1), id="odd-row-pitch"),
    pytest.param(shifted(0, 4), shifted(0, 2), shifted(0, 4), id="row-pitch-4-2-4"),
    pytest.param(last_dim_stride_2, last_dim_stride_2, shifted(0), id="inputs-last-stride-2"),
    pytest.param(shifted(0), shifted(0), last_dim_stride_2, id="out-last-stride-2"),
    pytest.param(heads_major, split_of_wider, inside_bigger, id="decode-into-padded-out"),
]


# ------------------------------------------------------------------------------------- storages


# ------------------------------------------------------------------------------------- storages


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over the whole storage of `t` (aliasing it)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def _storages(*tensors: torch.Tensor) -> dict:
    found = {}
    for t in tensors:
        s = t.untyped_storage()
        found.setdefault((t.device, s.data_ptr(), s.nbytes()), t)
    return found


def snapshot(*tensors: torch.Tensor) -> dict:
    """Copies of the whole storages behind `tensors`, keyed by storage."""
    return {key: storage_bytes(t).clone() for key, t in _storages(*tensors).items()}


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two uint8 tensors of one length hold the same bytes (compared 8 at a time)."""
    whole = a.numel() // 8 * 8
    return (torch.equal(a[:whole].view(torch.int64), b[:whole].view(torch.int64))
            and torch.equal(a[whole:], b[whole:]))


def assert_storages(before: dict, tensors: Sequence[torch.Tensor], what: str) -> None:
    for key, t in _storages(*tensors).items():
        now = storage_bytes(t)
        if not _same_bytes(now, before[key]):
            changed = (now != before[key]).nonzero()
            raise AssertionError(f"{what}: {changed.shape[0]} bytes differ, first at byte {changed[0].item()}")


def _tensors(args: dict) -> list[torch.Tensor]:
    return [a for a in args.values() if isinstance(a, torch.Tensor)]


def expect_writes(op: Op, args: dict) -> Callable[[], None]:
    """assert_writes_reference in two halves, for calls made elsewhere (another thread, a loop):
    captures the expected results and every storage now, and returns the function that checks them."""
    expected = op.reference(args)
    tensors = _tensors(args)
    before = snapshot(*tensors)

    def check() -> None:
        for name, value in expected.items():
            op.compare(args[name], value, name)
        # The written elements are checked above; the snapshot takes them as they are now, so the
        # storage comparison sees every other byte.
        for name in expected:
            out = args[name]
            (key,) = _storages(out)
            region = torch.empty(0, dtype=bits(out).dtype, device=out.device)
            region.set_(before[key].untyped_storage(), out.storage_offset(), out.shape, out.stride())
            region.copy_(bits(out))
        assert_storages(before, tensors, "bytes outside the written elements changed")

    return check


def assert_writes_reference(op: Op, args: dict, call: Callable = call_raw):
    """Runs `call(op, args)` and asserts that each written argument holds the op's reference and
    that no other byte of any storage involved changed; returns what `call` returned."""
    check = expect_writes(op, args)
    result = call(op, args)
    check()
    return result


def assert_refused(op: Op, args: dict, message: str, call: Callable = call_raw,
                   error: type[BaseException] = RuntimeError) -> None:
    """Asserts that `call(op, args)` raises `error` containing `message` and leaves every byte of
    every tensor argument's storage as it was."""
    tensors = _tensors(args)
    before = snapshot(*tensors)
    with pytest.raises(error) as raised:
        call(op, args)
    # A substring test, as pytest.raises(match=re.escape(message)) makes, without compiling a regex
    # for every message (those with shapes and strides are new each time).
    assert message in str(raised.value), f"expected {message!r} in the error, got {str(raised.value)!r}"
    assert_storages(before, tensors, "a refused call wrote")


def _allclose_with_float8(a: torch.Tensor, b: torch.Tensor, *args, _allclose=torch.allclose, **kwargs) -> bool:
    """torch.allclose, except for float8 (which has no CPU arithmetic): equal bits. opcheck's schema
    check compares each argument before and after the call with it, to find what the op wrote."""
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return a.dtype == b.dtype and torch.equal(bits(a), bits(b))
    return _allclose(a, b, *args, **kwargs)


def opcheck(raw, args: tuple, checks: Sequence[str]) -> None:
    """torch.library.opcheck of the raw op with the named checks, float8 arguments compared by bits."""
    with mock.patch("torch.allclose", _allclose_with_float8):
        torch.library.opcheck(raw, args, test_utils=tuple(checks))


# ------------------------------------------------------------------------------- overlap oracle


def byte_span(t: torch.Tensor) -> tuple[int, int]:
    """The first and last byte address `t` can reach ((1, 0), an empty span, for an empty tensor)."""
    if t.numel() == 0:
        return (1, 0)
    start = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
    low = sum(min(0, (n - 1) * s) for n, s in zip(t.shape, t.stride()))
    high = sum(max(0, (n - 1) * s) for n, s in zip(t.shape, t.stride()))
    return start + low * t.element_size(), start + (high + 1) * t.element_size() - 1


def _byte_addresses(t: torch.Tensor) -> torch.Tensor:
    """Every byte address each element of `t` covers (brute force over its indices; int64, CPU)."""
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    size = t.element_size()
    extent = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    elements = torch.arange(extent).as_strided(t.shape, t.stride(), t.storage_offset()).flatten()
    start = t.untyped_storage().data_ptr() + elements * size
    return (start[:, None] + torch.arange(size)).flatten()


def is_nope_half_of(ql_nope: torch.Tensor, q_out: torch.Tensor) -> bool:
    """Whether ql_nope is exactly q_out[..., :nope_dim] (same address and dtype, q_out's tokens and
    heads, and its strides on every dim of more than one index): where a bmm wrote its product into
    q_out. The ops then write only the rope half; any other overlap is an error."""
    return (ql_nope.dtype == q_out.dtype and ql_nope.data_ptr() == q_out.data_ptr()
            and ql_nope.shape[:2] == q_out.shape[:2] and ql_nope.shape[2] <= q_out.shape[2]
            and all(n <= 1 or a == b for n, a, b in zip(ql_nope.shape, ql_nope.stride(), q_out.stride())))


def overlap_message(op: Op, args: dict) -> str | None:
    """What the validator must decide about memory overlap, from byte sets: None (no overlap) or the
    message of the first failed check: each written tensor addressing a byte from two indices, then
    sharing a byte with each other tensor argument, in schema order (ql_nope exactly q_out's nope
    half excepted, see is_nope_half_of)."""
    for name in op.written:
        out = args[name]
        out_bytes = _byte_addresses(out)
        if out_bytes.unique().numel() < out_bytes.numel():
            return (f"{op.name}: {name} must not overlap itself, got shape {list(out.shape)} with strides "
                    f"{list(out.stride())}, which address one element from two indices")
        for other in op.tensor_args:
            if other == name or args[other] is None:
                continue
            if other == "ql_nope" and name == op.out and is_nope_half_of(args[other], out):
                continue
            (low, high), (out_low, out_high) = byte_span(args[other]), byte_span(out)
            if low > out_high or out_low > high:  # byte ranges apart: no byte to share
                continue
            if bool(torch.isin(_byte_addresses(args[other]), out_bytes).any()):
                return f"{op.name}: {name} must not overlap {other} in memory, got views that share bytes"
    return None


# ------------------------------------------------------------------------------------- process


def assert_process_usable(op: Op, device) -> None:
    """After whatever came before: valid calls of `op` (the decode layout; a one-head q_pe into a
    padded q_out) are bit-exact, and on CUDA nothing is left behind (no sticky error: synchronize
    and an unrelated kernel succeed)."""
    assert_writes_reference(op, valid_args(op, device, case="decode", tokens=4, heads=16))
    assert_writes_reference(op, valid_args(op, device, dtype=torch.float16, tokens=3, heads=2, nope_dim=8,
                                           rope_dim=8, pe_heads=1, layouts=(contiguous, one_head, inside_bigger)))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        assert torch.arange(1000, device=device).sum().item() == 499500


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


RSS_GROWTH_LIMIT = 8 << 20


def assert_memory_stays_flat(device, calls: int, one_call: Callable[[], None]) -> None:
    """Runs `one_call` `calls` times: host RSS grows by at most 8 MB between the first tenth and the
    end (a leak of ~100 bytes a call over 50k calls fails), and on CUDA the caching allocator holds
    exactly as much as before."""
    cuda = torch.device(device).type == "cuda"
    allocated = torch.cuda.memory_allocated() if cuda else 0
    warmup = calls // 10
    rss = 0
    for i in range(calls):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
            rss = _rss_bytes()
        one_call()
    if cuda:
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == allocated
    growth = _rss_bytes() - rss
    assert growth <= RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.1f} MiB over {calls - warmup} calls"


def inductor_call_body(codes: list[str]) -> str:
    """The `call` function of the one Inductor-generated module (the code that runs the graph)."""
    (code,) = codes
    start = code.index("def call(")
    end = min((i for i in (code.find(m, start) for m in ("\nrunner = ", "\ndef ", "\nclass ")) if i != -1),
              default=len(code))
    return code[start:end]
