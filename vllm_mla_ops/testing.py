"""Inputs, references and comparisons for testing and benchmarking the MLA query concat ops.

Everything here is plain torch (no pytest), so tests and benchmarks build the same layouts and check
results the same way:

* ``random_bits`` and ``bits``: data made of uniformly random bit patterns (NaNs, infs and denormals
  included) and its raw integer view, so comparisons see every bit, NaN payloads too.
* Layout builders ``(shape, dtype, device) -> Tensor``: a view of logical shape ``[T, H, D]`` over a
  buffer of fresh random bits (its gaps are random too). ``shifted`` and ``strided_last_dim`` make
  builders for any offset, row pitch and last-dim step.
* ``engine_inputs`` (and ``ENGINE_CASES``, its layouts and widths): the layouts inference engines
  hand to the ops.
* ``reference``, ``reference_fp8``: what the concat ops must write, from ``torch.cat``;
  ``reference_rope`` (with ``rope_reference`` and ``quantize_kv_fp8``): what ``concat_mla_rope``
  must write, from torch's eager float32 arithmetic.
* ``assert_bitwise_equal``, ``assert_fp8_equal``, ``assert_equal_or_both_nan``: the comparisons of
  the ops' contracts.
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
    "rope_reference", "quantize_kv_fp8", "reference_rope", "assert_equal_or_both_nan",
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
    scaled = reference(ql_nope, q_pe).float()
    scaled.mul_(scale.reciprocal()).clamp_(-448, 448)  # in place: the same values, no full-size temporaries
    return scaled.to(torch.float8_e4m3fn)


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
    if torch.equal(a, e):
        return
    raise AssertionError(_difference(what, a, e, a != e))


def assert_fp8_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "q_out") -> None:
    """float8_e4m3fn, byte-equal, except that where ``expected`` is NaN (``byte & 0x7f == 0x7f``)
    ``actual`` may be a NaN of either sign (the reference's NaN sign is no part of the contract)."""
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)}, expected {list(expected.shape)}"
    assert actual.dtype == expected.dtype == torch.float8_e4m3fn, (what, actual.dtype, expected.dtype)
    a, e = bits(actual), bits(expected.to(actual.device))
    if torch.equal(a, e):
        return
    e_nan, a_nan = (e & 0x7F) == 0x7F, (a & 0x7F) == 0x7F
    differ = (e_nan != a_nan) | (~e_nan & (a != e))
    if bool(differ.any()):
        raise AssertionError(_difference(what, a, e, differ))


# ------------------------------------------------------------------- concat_mla_rope references


def rope_reference(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                   is_neox: bool) -> torch.Tensor:
    """``x`` ``[T, H, rope_dim]`` (or ``[T, rope_dim]``) rotated by the rows ``positions`` of
    ``cos_sin_cache`` (``[max_position, rope_dim]``: cos in the first half of a row, sin in the
    second), in ``x``'s dtype, contiguous.

    Pair i is ``(x[2i], x[2i + 1])`` (GPT-J style, ``is_neox=False``) or ``(x[i], x[i + rope_dim/2])``
    (NeoX), with ``c = cache[pos, i]``, ``s = cache[pos, rope_dim/2 + i]``:
    ``x' = x*c - y*s``, ``y' = y*c + x*s`` in float32, each product rounded on its own (torch's eager
    ops round each one; no fused multiply-add), then one rounding to ``x``'s dtype. A position
    outside ``[0, max_position)`` rotates by NaN: the token's rotated values are NaN."""
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(1)
    half = x.shape[-1] // 2
    valid = (positions >= 0) & (positions < cos_sin_cache.shape[0])
    rows = cos_sin_cache[positions.clamp(0, cos_sin_cache.shape[0] - 1)].float()
    rows = torch.where(valid[:, None], rows, torch.full_like(rows, float("nan")))
    cos, sin = rows[:, None, :half], rows[:, None, half:]
    xf = x.float()
    a, b = (xf[..., :half], xf[..., half:]) if is_neox else (xf[..., 0::2], xf[..., 1::2])
    a_out = (a * cos - b * sin).to(x.dtype)
    b_out = (b * cos + a * sin).to(x.dtype)
    out = torch.cat((a_out, b_out), -1) if is_neox else torch.stack((a_out, b_out), -1).flatten(-2)
    return out.squeeze(1) if squeeze else out


def quantize_kv_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """vLLM's fp8 ("e4m3") KV-cache write: ``float(x) / scale``, saturated to e4m3fn's finite range
    (NaN stays NaN), rounded to nearest even. A division, where the query quantization multiplies
    by the reciprocal."""
    return (x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)


def reference_rope(ql_nope: torch.Tensor, q_pe: torch.Tensor, positions: torch.Tensor,
                   cos_sin_cache: torch.Tensor, is_neox: bool, q_scale: torch.Tensor | None = None,
                   kv_c: torch.Tensor | None = None, k_pe: torch.Tensor | None = None,
                   kv_cache: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
                   k_scale: torch.Tensor | None = None) -> dict:
    """What ``concat_mla_rope`` writes: ``{"q_out": ..., "kv_cache": ...}`` (``kv_cache`` only with
    the K side; the whole cache as it must be afterwards, from its current contents).

    q_out = ``[ql_nope | rope(q_pe)]``, quantized as ``reference_fp8`` quantizes when ``q_scale`` is
    given. Token t's cache row ``kv_cache.view(-1, kv_dim + rope_dim)[slot_mapping[t]]`` =
    ``[kv_c[t] | rope(k_pe[t])]``, divided by ``k_scale`` into e4m3fn when given
    (``quantize_kv_fp8``); a slot outside ``[0, num_blocks * block_size)`` (negative: padding)
    writes nothing. Rotated values that are NaN may be any NaN (``assert_equal_or_both_nan``)."""
    rotated = rope_reference(q_pe, positions, cos_sin_cache, is_neox)
    q_out = reference(ql_nope, rotated)
    result = {"q_out": q_out if q_scale is None else (q_out.float() * q_scale.reciprocal()).clamp(-448, 448).to(
        torch.float8_e4m3fn)}
    if kv_cache is not None:
        k_pe = k_pe.reshape(k_pe.shape[0], k_pe.shape[-1])
        rows = torch.cat((bits(kv_c), bits(rope_reference(k_pe, positions, cos_sin_cache, is_neox))), -1)
        rows = rows.view(kv_c.dtype)
        if k_scale is not None:
            rows = quantize_kv_fp8(rows, k_scale)
        cache = kv_cache.clone()
        flat = cache.view(-1, cache.shape[-1])
        for t, slot in enumerate(slot_mapping.tolist()):
            if 0 <= slot < flat.shape[0]:
                flat[slot] = rows[t]
        result["kv_cache"] = cache
    return result


def assert_equal_or_both_nan(actual: torch.Tensor, expected: torch.Tensor, what: str = "q_out") -> None:
    """Same shape and dtype; every element has the expected bits, or both are NaN (NaN payloads and
    signs are no part of the contract where a value was computed; copied elements are compared bit
    for bit by the callers' other checks)."""
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)}, expected {list(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    expected = expected.to(actual.device)
    a, e = bits(actual), bits(expected)
    both_nan = actual.float().isnan() & expected.float().isnan()
    differ = (a != e) & ~both_nan
    if bool(differ.any()):
        raise AssertionError(_difference(what, a, e, differ))
