"""Inputs, references and comparisons for testing and benchmarking the MLA query concat ops.

Everything here is plain torch (no pytest), so tests and benchmarks build the same layouts and check
results the same way:

* ``random_bits`` and ``bits``: data made of uniformly random bit patterns (NaNs, infs and denormals
  included) and its raw integer view, so comparisons see every bit, NaN payloads too.
* Layout builders ``(shape, dtype, device) -> Tensor``: a view of logical shape ``[T, H, D]`` over a
  buffer of fresh random bits (its gaps are random too). ``shifted`` and ``strided_last_dim`` make
  builders for any offset, row pitch and last-dim step.
* ``engine_inputs``: the layouts inference engines hand to the ops.
* ``reference``, ``reference_fp8``: what the ops must write, from ``torch.cat``.
* ``assert_bitwise_equal``, ``assert_fp8_equal``: the comparisons of the ops' contracts.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

__all__ = [
    "random_bits", "bits",
    "contiguous", "heads_major", "split_of_wider", "one_head", "heads_stride_0", "token_stride_0",
    "last_dim_stride_2", "inside_bigger", "nope_of_kv", "rope_of_latent", "shifted", "strided_last_dim",
    "ENGINE_CASES", "engine_inputs", "reference", "reference_fp8", "assert_bitwise_equal", "assert_fp8_equal",
]

Layout = Callable[[Sequence[int], torch.dtype, "str | torch.device"], torch.Tensor]

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def random_bits(shape: Sequence[int], dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.Tensor:
    """A fresh contiguous tensor whose every bit pattern is equally likely."""
    shape = tuple(shape)
    numel = math.prod(shape)
    itemsize = dtype.itemsize
    if itemsize == 2:
        raw = torch.randint(-32768, 32768, (numel,), dtype=torch.int16, device=device)
    else:
        raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, device=device)
    return raw.view(dtype).view(shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as raw integers of the same width (a view: strides and storage are kept)."""
    return t.view(_BITS[t.element_size()])


# ------------------------------------------------------------------------------------ layouts


def contiguous(shape, dtype, device="cpu"):
    return random_bits(shape, dtype, device)


def heads_major(shape, dtype, device="cpu"):
    """The decode ql_nope: the ``[heads, tokens, D]`` bmm output, transposed (head stride T * D)."""
    t, h, d = shape
    return random_bits((h, t, d), dtype, device).transpose(0, 1)


def shifted(offset: int, row_pad: int = 0, col: int = 0) -> Layout:
    """Builder of columns ``[col, col + D)`` of a ``[T, H, D + row_pad]`` buffer that starts ``offset``
    elements into its allocation. An odd offset, column or pitch leaves rows off every 16-, 8- and
    4-byte boundary, which is what selects the CUDA kernels' narrower pack paths."""
    assert 0 <= col <= row_pad, (col, row_pad)

    def layout(shape, dtype, device="cpu"):
        t, h, d = shape
        flat = random_bits((offset + t * h * (d + row_pad),), dtype, device)
        return flat[offset:].view(t, h, d + row_pad)[..., col : col + d]

    layout.__name__ = f"shifted({offset},{row_pad},{col})"
    return layout


def strided_last_dim(step: int, offset: int = 0) -> Layout:
    """Builder of every ``step``-th element along the last dim, ``offset`` elements into the buffer."""

    def layout(shape, dtype, device="cpu"):
        t, h, d = shape
        flat = random_bits((offset + t * h * d * step,), dtype, device)
        return flat[offset:].view(t, h, d * step)[..., ::step]

    layout.__name__ = f"strided_last_dim({step},{offset})"
    return layout


def split_of_wider(shape, dtype, device="cpu"):
    """The decode q_pe: ``q[..., 128:128 + D]`` of the projected ``q = [T, H, 128 + D]``."""
    return shifted(0, 128, 128)(shape, dtype, device)


def nope_of_kv(shape, dtype, device="cpu"):
    """The prefill k_nope: ``kv[..., :D]`` of the projected ``kv = [T, H, 2 * D]`` (k and v halves)."""
    return shifted(0, shape[2])(shape, dtype, device)


def rope_of_latent(shape, dtype, device="cpu"):
    """The prefill k_pe: ``latent[..., 512:]`` of the compressed ``latent = [T, 1, 512 + D]``, one
    rope row for every head whatever ``shape``'s head count."""
    t, _, d = shape
    return shifted(0, 512, 512)((t, 1, d), dtype, device)


def last_dim_stride_2(shape, dtype, device="cpu"):
    return strided_last_dim(2)(shape, dtype, device)


def one_head(shape, dtype, device="cpu"):
    """``[T, 1, D]`` whatever ``shape``'s head count: one rope row that the op shares by every head."""
    t, _, d = shape
    return random_bits((t, 1, d), dtype, device)


def heads_stride_0(shape, dtype, device="cpu"):
    """A 1-head row expanded to every head (head stride 0)."""
    t, h, d = shape
    return random_bits((t, 1, d), dtype, device).expand(t, h, d)


def token_stride_0(shape, dtype, device="cpu"):
    """One token's rows broadcast to every token (token stride 0)."""
    t, h, d = shape
    return random_bits((1, h, d), dtype, device).expand(t, h, d)


def inside_bigger(shape, dtype, device="cpu"):
    """A view with a storage offset and padding on every dim of a bigger buffer."""
    t, h, d = shape
    return random_bits((t + 3, h + 2, d + 5), dtype, device)[1 : 1 + t, 2 : 2 + h, 3 : 3 + d]


# case: (ql_nope layout, q_pe layout, default nope_dim, default rope_dim); q_out is contiguous.
ENGINE_CASES = {
    "decode": (heads_major, split_of_wider, 512, 64),
    "contiguous": (contiguous, contiguous, 512, 64),
    "k_side": (nope_of_kv, rope_of_latent, 128, 64),
}


def engine_inputs(case: str, tokens: int, heads: int, dtype: torch.dtype, device: str | torch.device = "cpu",
                  nope_dim: int | None = None, rope_dim: int | None = None,
                  out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ql_nope, q_pe, q_out)`` as engines lay them out; ``q_out`` (of ``out_dtype``, default
    ``dtype``) holds random bits, so a missed element shows.

    * ``"decode"``: ql_nope ``heads_major`` [T, H, 512], q_pe ``split_of_wider`` [T, H, 64], q_out
      contiguous [T, H, 576].
    * ``"contiguous"``: all three contiguous, 512 / 64.
    * ``"k_side"``: SGLang's prefill K (``concat_mla_k``): k_nope = ``kv[..., :128]`` of
      ``kv = [T, H, 256]`` (the k half of k and v), k_pe = ``latent[..., 512:]`` of the compressed
      ``latent = [T, 1, 576]`` (one rope row shared by every head), k contiguous [T, H, 192].
    """
    nope_layout, pe_layout, default_nope_dim, default_rope_dim = ENGINE_CASES[case]
    nope_dim = default_nope_dim if nope_dim is None else nope_dim
    rope_dim = default_rope_dim if rope_dim is None else rope_dim
    ql_nope = nope_layout((tokens, heads, nope_dim), dtype, device)
    q_pe = pe_layout((tokens, heads, rope_dim), dtype, device)
    q_out = random_bits((tokens, heads, nope_dim + rope_dim), out_dtype or dtype, device)
    return ql_nope, q_pe, q_out


# --------------------------------------------------------------------------- references, checks


def reference(ql_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
    """``torch.cat`` along the last dim, a 1-head q_pe broadcast to every head; contiguous, the inputs'
    dtype. Concatenated as raw bits, so NaN payloads come through whatever the copy does."""
    tokens, heads, _ = ql_nope.shape
    cat = torch.cat((bits(ql_nope), bits(q_pe).expand(tokens, heads, q_pe.shape[2])), dim=-1)
    return cat.view(ql_nope.dtype)


def reference_fp8(ql_nope: torch.Tensor, q_pe: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor e4m3fn quantization of ``reference`` (vLLM's ``QuantFP8.forward_native``)."""
    cat = reference(ql_nope, q_pe)
    return (cat.float() * scale.reciprocal()).clamp(-448, 448).to(torch.float8_e4m3fn)


def _difference(what: str, actual: torch.Tensor, expected: torch.Tensor, differ: torch.Tensor) -> str:
    """Where `differ` (a mask over the raw bits `actual` and `expected`) says they differ, in words."""
    idx = tuple(differ.nonzero()[0].tolist())
    digits, mask = 2 * actual.element_size(), (1 << 8 * actual.element_size()) - 1
    return (f"{what}: {int(differ.sum())} of {differ.numel()} elements differ; first at {list(idx)}: "
            f"got 0x{int(actual[idx]) & mask:0{digits}x}, expected 0x{int(expected[idx]) & mask:0{digits}x}")


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "q_out") -> None:
    """Same shape, same dtype, same bits in every element."""
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)}, expected {list(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    a, e = bits(actual), bits(expected.to(actual.device))
    differ = a != e
    if bool(differ.any()):
        raise AssertionError(_difference(what, a, e, differ))


def assert_fp8_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "q_out") -> None:
    """float8_e4m3fn, byte-equal, except that where ``expected`` is NaN (``byte & 0x7f == 0x7f``)
    ``actual`` may be a NaN of either sign (the reference's NaN sign is no part of the contract)."""
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)}, expected {list(expected.shape)}"
    assert actual.dtype == expected.dtype == torch.float8_e4m3fn, (what, actual.dtype, expected.dtype)
    a, e = bits(actual), bits(expected.to(actual.device))
    e_nan, a_nan = (e & 0x7F) == 0x7F, (a & 0x7F) == 0x7F
    differ = (e_nan != a_nan) | (~e_nan & (a != e))
    if bool(differ.any()):
        raise AssertionError(_difference(what, a, e, differ))
