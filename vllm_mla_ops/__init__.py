"""vllm_mla_ops: MLA query and key preparation as PyTorch custom ops: the query concat
``torch.ops._C.concat_mla_q``, its fused FP8 form ``torch.ops._C.concat_mla_q_fp8``, and
``torch.ops._C.concat_mla_rope``, RoPE + the query concat (+fp8) + the paged KV-cache write (+fp8)
in one kernel.

Importing this package loads the compiled libraries, which register the ops under ``_C`` for CPU
(and CUDA, when built with it and torch has CUDA). Model code calls either the raw ops, which write
into a given ``q_out`` (``torch.ops._C.concat_mla_q(ql_nope, q_pe, q_out)``,
``torch.ops._C.concat_mla_q_fp8(ql_nope, q_pe, q_out, scale)``), or the functions below, which
follow torch's conventions for a destination: a keyword-only ``out=``, allocated when not given, and
returned.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._loader import load_extension

_BUILD_INFO = load_extension(__name__, str(Path(__file__).resolve().parent))

from . import _library  # noqa: E402,F401  (fakes, Autograd and math-bit kernels; needs the ops loaded)

__version__: str = _BUILD_INFO["version"]
__all__ = ["__version__", "build_info", "concat_mla_q", "concat_mla_q_fp8", "concat_mla_rope"]


def build_info() -> dict:
    """What this installation was built with: ``version``, ``target`` ("cpu" or "cuda"),
    ``torch_floor`` (the oldest torch it loads in), ``built_with_torch``, ``cuda`` and
    ``cuda_arch_list`` (None for a CPU build)."""
    return dict(_BUILD_INFO)


def _check_tensors(op: str, **tensors) -> None:
    """TypeError naming the first argument that is not a tensor (None included), before any work."""
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            got = "None" if value is None else type(value).__name__
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {got}")


def _out_shape(ql_nope: torch.Tensor, q_pe: torch.Tensor) -> tuple[int, ...]:
    """[tokens, heads, nope_dim + rope_dim]; (0,) for ranks the op rejects, so it raises its rank error."""
    if ql_nope.dim() == 3 and q_pe.dim() == 3:
        return (ql_nope.shape[0], ql_nope.shape[1], ql_nope.shape[2] + q_pe.shape[2])
    return (0,)


def concat_mla_q(ql_nope: torch.Tensor, q_pe: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[ql_nope | q_pe]`` along the last dim, the query of MLA attention, bit-exact.

    Args:
        ql_nope: ``[tokens, heads, nope_dim]``, float16 or bfloat16, any strides.
        q_pe: ``[tokens, heads, rope_dim]``, or ``[tokens, 1, rope_dim]`` for one rope row shared by
            every head; ``ql_nope``'s dtype and device, any strides (0 too, from ``expand``).
        out: where to write: ``[tokens, heads, nope_dim + rope_dim]`` with ``ql_nope``'s dtype and
            device, any strides that address each element once, sharing no byte with the inputs
            (except ``ql_nope`` being exactly ``out[..., :nope_dim]``, where a bmm wrote it: then
            only the rope half is written). ``None`` (the default) allocates a contiguous one.

    Returns:
        ``out``, or the tensor allocated when it is ``None``.

    Raises:
        TypeError: an argument that should be a tensor is ``None`` or not a tensor (before anything
            else is checked).
        RuntimeError: on any other dtype, rank, shape, device, storage bound or overlap; in grad
            mode, an argument with ``requires_grad=True`` (the op is inference-only: call it under
            ``torch.no_grad()`` or ``torch.inference_mode()``); in grad mode, an ``out`` created
            under ``torch.inference_mode()``. Always before anything is written (docs/errors.md
            lists every message).
    """
    _check_tensors("concat_mla_q", ql_nope=ql_nope, q_pe=q_pe)
    if out is None:
        out = ql_nope.new_empty(_out_shape(ql_nope, q_pe))
    else:
        _check_tensors("concat_mla_q", out=out)
    torch.ops._C.concat_mla_q.default(ql_nope, q_pe, out)
    return out


def concat_mla_q_fp8(
    ql_nope: torch.Tensor, q_pe: torch.Tensor, scale: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``concat_mla_q`` fused with static per-tensor float8_e4m3fn quantization, in one pass.

    Each element is converted to float32, multiplied by ``r = 1 / scale`` (one correctly rounded
    float32 division per call), clamped to [-448, 448] and rounded to nearest-even into e4m3fn; NaN
    stays NaN. Bit for bit this is
    ``(torch.cat((ql_nope, q_pe.expand(...)), -1).float() * scale.reciprocal()).clamp(-448, 448).to(torch.float8_e4m3fn)``,
    the semantics of vLLM's static per-tensor ``QuantFP8.forward_native`` (up to the sign of a NaN).
    The raw op takes the destination before the scale, in schema order:
    ``torch.ops._C.concat_mla_q_fp8(ql_nope, q_pe, q_out, scale)``.

    Args:
        ql_nope, q_pe: as for ``concat_mla_q``.
        scale: float32 tensor of one element on the inputs' device, read on the device when the
            kernel runs (a CUDA graph replays with the scale's value of the moment).
        out: where to write: ``[tokens, heads, nope_dim + rope_dim]`` float8_e4m3fn, any strides
            that address each element once and share no byte with the inputs or ``scale``.
            ``None`` (the default) allocates a contiguous one.

    Returns:
        ``out``, or the tensor allocated when it is ``None``.

    Raises:
        TypeError: as for ``concat_mla_q`` (``scale`` included).
        RuntimeError: as for ``concat_mla_q``, and for a ``scale`` that is not one float32 element
            on the inputs' device or that shares a byte with ``out``.
    """
    _check_tensors("concat_mla_q_fp8", ql_nope=ql_nope, q_pe=q_pe, scale=scale)
    if out is None:
        out = ql_nope.new_empty(_out_shape(ql_nope, q_pe), dtype=torch.float8_e4m3fn)
    else:
        _check_tensors("concat_mla_q_fp8", out=out)
    torch.ops._C.concat_mla_q_fp8.default(ql_nope, q_pe, out, scale)
    return out


def concat_mla_rope(
    ql_nope: torch.Tensor,
    q_pe: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    is_neox: bool = False,
    q_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    kv_c: torch.Tensor | None = None,
    k_pe: torch.Tensor | None = None,
    kv_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One MLA layer's query and key preparation in one kernel: RoPE of ``q_pe`` and ``k_pe``, the
    query ``[ql_nope | rope(q_pe)]`` (quantized to float8_e4m3fn with ``q_scale``), and the paged
    KV-cache write ``[kv_c | rope(k_pe)]`` (quantized with ``k_scale``).

    RoPE: pair i of a rope row is ``(x[2i], x[2i + 1])`` (``is_neox=False``, GPT-J style, DeepSeek's)
    or ``(x[i], x[i + rope_dim / 2])`` (NeoX), turned by ``c = cos_sin_cache[pos, i]`` and
    ``s = cos_sin_cache[pos, rope_dim / 2 + i]``: ``x' = x*c - y*s``, ``y' = y*c + x*s`` in float32,
    each product rounded on its own, then rounded once to the inputs' dtype. ``q_scale``: the
    rounded row as ``concat_mla_q_fp8`` quantizes it (times ``1 / q_scale``); ``k_scale``: divided by
    ``k_scale``, as vLLM's fp8 KV cache is written. ``vllm_mla_ops.testing.reference_rope`` is the
    reference, bit for bit (a NaN result may be any NaN).

    Index semantics (``positions`` and ``slot_mapping`` are read on the device, never on the host):
    a position outside ``[0, max_position)`` rotates its token by NaN (its rope values are NaN, its
    other values written as usual); a slot outside ``[0, num_blocks * block_size)`` (negative:
    padding) writes no cache row. Nothing outside the tensors is ever read or written. Two tokens
    with one slot both write that row, which may then mix their bytes. With the environment
    variable ``VLLM_MLA_OPS_CHECK_INDICES=1`` every call first copies the indices to the host (a
    synchronization) and raises on the first position out of range, slot past the cache or slot
    written twice, before anything is written.

    Args:
        ql_nope: ``[tokens, heads, nope_dim]``, float16 or bfloat16, any strides. When it is exactly
            ``out[..., :nope_dim]`` (a bmm wrote its product there) only the rope half is written.
        q_pe: ``[tokens, heads or 1, rope_dim]``, not rotated yet, ``ql_nope``'s dtype; rope_dim even.
        positions: ``[tokens]`` int64 on the inputs' device.
        cos_sin_cache: ``[max_position, rope_dim]``, float32 or the inputs' dtype; cos in the first
            half of a row, sin in the second.
        is_neox: the pairing of rope elements (above).
        q_scale: one float32 element, read on the device: the query is quantized to float8_e4m3fn.
        out: ``[tokens, heads, nope_dim + rope_dim]``, the inputs' dtype (float8_e4m3fn with
            ``q_scale``), any strides that address each element once. ``None`` allocates one.
        kv_c, k_pe, kv_cache, slot_mapping: the K side, all or none: ``kv_c`` ``[tokens, kv_dim]``,
            ``k_pe`` ``[tokens, rope_dim]`` or ``[tokens, 1, rope_dim]`` (not rotated),
            ``kv_cache`` ``[num_blocks, block_size, kv_dim + rope_dim]`` (the inputs' dtype, or
            float8_e4m3fn with ``k_scale``), ``slot_mapping`` ``[tokens]`` int64.
        k_scale: one float32 element, read on the device, for a float8_e4m3fn ``kv_cache``.

    Returns:
        ``out``, or the tensor allocated when it is ``None`` (float8_e4m3fn when ``q_scale`` is given).

    Raises:
        TypeError: an argument that should be a tensor is not one (``None`` where one is required).
        RuntimeError: any other bad dtype, rank, shape, device, storage bound or overlap (an output
            with any input or with the other output), an incomplete K side, a scale without its fp8
            output or the reverse; in grad mode an argument with ``requires_grad=True`` or an
            inference tensor to write; in the checked mode a bad index. Always before anything is
            written (docs/errors.md lists every message).
    """
    op = "concat_mla_rope"
    _check_tensors(op, ql_nope=ql_nope, q_pe=q_pe, positions=positions, cos_sin_cache=cos_sin_cache)
    optional = dict(q_scale=q_scale, out=out, kv_c=kv_c, k_pe=k_pe, kv_cache=kv_cache, slot_mapping=slot_mapping,
                    k_scale=k_scale)
    _check_tensors(op, **{name: value for name, value in optional.items() if value is not None})
    if out is None:
        dtype = ql_nope.dtype if q_scale is None else torch.float8_e4m3fn
        out = ql_nope.new_empty(_out_shape(ql_nope, q_pe), dtype=dtype)
    torch.ops._C.concat_mla_rope.default(ql_nope, q_pe, positions, cos_sin_cache, is_neox, out, q_scale, kv_c, k_pe,
                                         kv_cache, slot_mapping, k_scale)
    return out


for _function in (concat_mla_q, concat_mla_q_fp8, concat_mla_rope):
    _library.document(_function)
del _function
