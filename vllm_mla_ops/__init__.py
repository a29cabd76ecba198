"""vllm_mla_ops: the MLA query concat as PyTorch custom ops, ``torch.ops._C.concat_mla_q`` and its
fused FP8 form ``torch.ops._C.concat_mla_q_fp8``.

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
__all__ = ["__version__", "build_info", "concat_mla_q", "concat_mla_q_fp8"]


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
            device, any strides that address each element once, sharing no byte with the inputs.
            ``None`` (the default) allocates a contiguous one.

    Returns:
        ``out``, or the tensor allocated when it is ``None``.

    Raises:
        TypeError: an argument that should be a tensor is ``None`` or not a tensor (before anything
            else is checked).
        RuntimeError: on any other dtype, rank, shape, device, storage bound or overlap; in grad
            mode, an argument with ``requires_grad=True`` (the op is inference-only: call it under
            ``torch.no_grad()`` or ``torch.inference_mode()``); an ``out`` created under
            ``torch.inference_mode()`` written outside it. Always before anything is written
            (docs/errors.md lists every message).
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
