"""Helpers shared by the tests: random bit patterns, tensor layouts, the torch.cat reference, and the
two checks every test ends in (the op wrote exactly the reference / the op raised and wrote nothing).

Every check compares raw bytes of whole storages, so a write outside q_out's elements (into a gap of a
strided q_out, or into an input) fails as surely as a wrong value, and NaN payloads count.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import pytest
import torch

import vllm_mla_ops

HALF_DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]

op = torch.ops._C.concat_mla_q.default


def call_op(ql_nope: torch.Tensor, q_pe: torch.Tensor, q_out: torch.Tensor) -> torch.Tensor:
    op(ql_nope, q_pe, q_out)
    return q_out


def call_api(ql_nope: torch.Tensor, q_pe: torch.Tensor, q_out: torch.Tensor) -> torch.Tensor:
    return vllm_mla_ops.concat_mla_q(ql_nope, q_pe, q_out)


ENTRY_POINTS = [pytest.param(call_op, id="op"), pytest.param(call_api, id="api")]


# ----------------------------------------------------------------------------------------- data


def random_bits(shape: Sequence[int], dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.Tensor:
    """A fresh contiguous tensor of uniformly random bit patterns (NaNs, infs and denormals included)."""
    shape = tuple(shape)
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if itemsize == 2:
        raw = torch.randint(-32768, 32768, (numel,), dtype=torch.int16, device=device)
    else:
        raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, device=device)
    return raw.view(dtype).view(shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The same elements as int16 bit patterns (a view: strides and storage are kept)."""
    assert t.element_size() == 2, t.dtype
    return t.view(torch.int16)


def reference(ql_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
    """torch.cat of the two inputs along the last dim, as int16 bits, with a 1-head q_pe broadcast."""
    tokens, heads, _ = ql_nope.shape
    return torch.cat([bits(ql_nope), bits(q_pe).expand(tokens, heads, q_pe.shape[2])], dim=-1)


# ------------------------------------------------------------------------------------- layouts
# Each layout builds a view of logical `shape` over a buffer of fresh random bits, so its elements
# and any gaps around them are random too. Inputs and outputs use the same builders.


def contiguous(shape, dtype, device):
    return random_bits(shape, dtype, device)


def heads_major(shape, dtype, device):
    """The decode layout of ql_nope: the [heads, tokens, dim] bmm output, transposed."""
    t, h, d = shape
    return random_bits((h, t, d), dtype, device).transpose(0, 1)


def split_of_wider(shape, dtype, device):
    """q_pe in the decode layout: q[..., 128:192] of q = [tokens, heads, 128 + rope]."""
    t, h, d = shape
    return random_bits((t, h, 128 + d), dtype, device)[..., 128:]


def last_dim_stride_2(shape, dtype, device):
    t, h, d = shape
    return random_bits((t, h, 2 * d), dtype, device)[..., ::2]


def inside_bigger(shape, dtype, device):
    """A view with a storage offset and padding on every dim of a bigger buffer."""
    t, h, d = shape
    return random_bits((t + 3, h + 2, d + 5), dtype, device)[1 : 1 + t, 2 : 2 + h, 3 : 3 + d]


def token_stride_0(shape, dtype, device):
    """One row of each head, broadcast to every token (stride 0 along tokens)."""
    t, h, d = shape
    return random_bits((1, h, d), dtype, device).expand(t, h, d)


def heads_stride_0(shape, dtype, device):
    """A 1-head rope row expanded to every head (stride 0 along heads)."""
    t, h, d = shape
    return random_bits((t, 1, d), dtype, device).expand(t, h, d)


def one_head(shape, dtype, device):
    """The [tokens, 1, rope] form of q_pe, shared by all heads."""
    t, _, d = shape
    return random_bits((t, 1, d), dtype, device)


NOPE_LAYOUTS = [contiguous, heads_major, last_dim_stride_2, inside_bigger, token_stride_0]
PE_LAYOUTS = [contiguous, split_of_wider, last_dim_stride_2, token_stride_0, one_head, heads_stride_0]
OUT_LAYOUTS = [contiguous, heads_major, last_dim_stride_2, inside_bigger]


def layout_params(layouts):
    return [pytest.param(f, id=f.__name__) for f in layouts]


# -------------------------------------------------------------------------------------- checks


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


def _first_difference(actual: torch.Tensor, expected: torch.Tensor) -> str:
    diff = (actual != expected).nonzero()
    return f"{diff.shape[0]} bytes differ, first at byte {diff[0].item()}" if diff.numel() else "equal"


def assert_storages(before: dict, tensors: Sequence[torch.Tensor], what: str) -> None:
    for key, t in _storages(*tensors).items():
        now = storage_bytes(t)
        assert torch.equal(now, before[key]), f"{what}: {_first_difference(now, before[key])}"


def check_writes_reference(
    ql_nope: torch.Tensor,
    q_pe: torch.Tensor,
    q_out: torch.Tensor,
    call: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object] = call_op,
) -> object:
    """Runs `call` and asserts that q_out's elements hold torch.cat's bits and that every other byte
    of every storage involved (gaps in q_out's buffer, the inputs) is unchanged."""
    check = expect_reference(ql_nope, q_pe, q_out)
    result = call(ql_nope, q_pe, q_out)
    check()
    return result


def check_rejected(
    ql_nope,
    q_pe,
    q_out,
    message: str,
    call: Callable = call_op,
    error: type[BaseException] = RuntimeError,
) -> None:
    """Asserts that `call` raises `error` containing `message` and leaves every byte of every tensor
    argument's storage as it was."""
    tensors = [t for t in (ql_nope, q_pe, q_out) if isinstance(t, torch.Tensor)]
    before = snapshot(*tensors)
    with pytest.raises(error, match=re.escape(message)):
        call(ql_nope, q_pe, q_out)
    assert_storages(before, tensors, "a rejected call wrote")


def expect_reference(ql_nope: torch.Tensor, q_pe: torch.Tensor, q_out: torch.Tensor) -> Callable[[], None]:
    """check_writes_reference in two halves, for calls made elsewhere (another thread, a loop):
    captures the expected bytes now and returns a function that asserts them after the call."""
    expected_out = reference(ql_nope, q_pe).clone()
    before = snapshot(ql_nope, q_pe, q_out)
    out_key = next(iter(_storages(q_out)))
    expected = dict(before)
    expected[out_key] = before[out_key].clone()
    region = expected[out_key].view(torch.int16).as_strided(q_out.shape, q_out.stride(), q_out.storage_offset())
    region.copy_(expected_out)

    def check() -> None:
        assert torch.equal(bits(q_out), expected_out), "q_out differs from torch.cat"
        assert_storages(expected, (ql_nope, q_pe, q_out), "bytes outside q_out's elements changed")

    return check


def shifted(offset: int, row_pad: int = 0):
    """A layout whose data starts `offset` elements into its buffer and whose rows are `row_pad`
    elements apart: offset 1 or an odd pad leaves rows off every 16-, 8- and 4-byte boundary (the
    CUDA kernels' narrower pack paths)."""
    def layout(shape, dtype, device):
        t, h, d = shape
        buf = random_bits((offset + t * h * (d + row_pad),), dtype, device)
        return buf[offset:].view(t, h, d + row_pad)[..., :d]
    layout.__name__ = f"offset{offset}_pad{row_pad}"
    return layout


# (nope_dim, rope_dim): widths that allow 8-, 4-, 2- and 1-element vectors; 1100 + 64 with a strided
# last dim is a row of more packs than the CUDA kernel's one-row blocks have threads.
WIDTHS = [(512, 64), (12, 4), (510, 66), (8, 8), (7, 3), (1, 1), (0, 5), (6, 0), (1100, 64)]
WIDTH_IDS = [f"{n}+{r}" for n, r in WIDTHS]

# (tokens, heads): the CUDA kernels run up to 512 rows (tokens * heads) one block a row and more
# rows a block each above that; these cover both launch paths and the boundary.
ROW_COUNTS = [(1, 16), (4, 128), (513, 1), (7, 128), (300, 16)]

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


def inductor_call_body(codes: list[str]) -> str:
    """The `call` function of the one Inductor-generated module (the code that runs the graph)."""
    (code,) = codes
    start = code.index("def call(")
    end = min((i for i in (code.find(m, start) for m in ("\nrunner = ", "\ndef ", "\nclass ")) if i != -1),
              default=len(code))
    return code[start:end]
