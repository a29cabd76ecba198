"""Thin wrappers over ``torch.ops._C``, one per op, in the schema's argument order (the spirit of
vLLM's ``_custom_ops``), and the ops' fake implementations for torch.compile and fake tensors.

The fakes mirror the C++ validator (csrc/concat_mla_q_checks.cpp) check for check and message for
message, so a bad call fails at trace time with the error eager mode gives. Memory overlap is the
one check they cannot make (fake tensors have no addresses); the real kernel makes it at run time.
"""

from __future__ import annotations

import torch


def concat_mla_q(ql_nope: torch.Tensor, q_pe: torch.Tensor, q_out: torch.Tensor) -> None:
    """``q_out[t, h] = [ql_nope[t, h] | q_pe[t, h or 0]]``; see ``vllm_mla_ops.concat_mla_q``."""
    torch.ops._C.concat_mla_q.default(ql_nope, q_pe, q_out)


def concat_mla_q_fp8(ql_nope: torch.Tensor, q_pe: torch.Tensor, q_out: torch.Tensor, scale: torch.Tensor) -> None:
    """Fused concat + static per-tensor e4m3 quantization; see ``vllm_mla_ops.concat_mla_q_fp8``."""
    torch.ops._C.concat_mla_q_fp8.default(ql_nope, q_pe, q_out, scale)


def _check_concat_mla_q_args(
    ql_nope: torch.Tensor, q_pe: torch.Tensor, q_out: torch.Tensor, scale: torch.Tensor | None = None
) -> None:
    op = "concat_mla_q" if scale is None else "concat_mla_q_fp8"
    torch._check(
        ql_nope.dtype in (torch.float16, torch.bfloat16),
        lambda: f"{op}: ql_nope must be float16 or bfloat16 dtype, got {ql_nope.dtype}",
    )
    for t, name, dims in (
        (ql_nope, "ql_nope", "[tokens, heads, nope_dim]"),
        (q_pe, "q_pe", "[tokens, heads or 1, rope_dim]"),
        (q_out, "q_out", "[tokens, heads, nope_dim + rope_dim]"),
    ):
        torch._check(t.dim() == 3, lambda t=t, name=name, dims=dims: (
            f"{op}: {name} must be 3-D {dims}, got {t.dim()}-D with shape {list(t.shape)}"))
    torch._check(q_pe.dtype == ql_nope.dtype, lambda: (
        f"{op}: q_pe must have ql_nope's dtype {ql_nope.dtype}, got {q_pe.dtype}"))
    if scale is None:
        torch._check(q_out.dtype == ql_nope.dtype, lambda: (
            f"{op}: q_out must have ql_nope's dtype {ql_nope.dtype}, got {q_out.dtype}"))
    else:
        torch._check(q_out.dtype == torch.float8_e4m3fn, lambda: (
            f"{op}: q_out must be torch.float8_e4m3fn, got {q_out.dtype}"))
    for t, name in ((q_pe, "q_pe"), (q_out, "q_out")):
        torch._check(t.device == ql_nope.device, lambda t=t, name=name: (
            f"{op}: {name} must be on ql_nope's device {ql_nope.device}, got {t.device}"))
    tokens, heads, nope_dim = ql_nope.shape
    rope_dim = q_pe.shape[2]
    torch._check(
        q_pe.shape[0] == tokens and (q_pe.shape[1] == heads or q_pe.shape[1] == 1),
        lambda: (f"{op}: q_pe must be [tokens, heads or 1, rope_dim] with tokens={tokens} and "
                 f"heads={heads} from ql_nope, got shape {list(q_pe.shape)}"),
    )
    torch._check(
        q_out.shape[0] == tokens and q_out.shape[1] == heads and q_out.shape[2] == nope_dim + rope_dim,
        lambda: (f"{op}: q_out must be [tokens, heads, nope_dim + rope_dim] = "
                 f"[{tokens}, {heads}, {nope_dim + rope_dim}], got shape {list(q_out.shape)}"),
    )
    if scale is not None:
        torch._check(scale.dtype == torch.float32,
                     lambda: f"{op}: scale must be a torch.float32 tensor, got {scale.dtype}")
        torch._check(scale.numel() == 1, lambda: (
            f"{op}: scale must have one element (a per-tensor scale), got shape {list(scale.shape)}"))
        torch._check(scale.device == ql_nope.device, lambda: (
            f"{op}: scale must be on ql_nope's device {ql_nope.device}, got {scale.device}"))


@torch.library.register_fake("_C::concat_mla_q")
def _concat_mla_q_fake(ql_nope: torch.Tensor, q_pe: torch.Tensor, q_out: torch.Tensor) -> None:
    _check_concat_mla_q_args(ql_nope, q_pe, q_out)


@torch.library.register_fake("_C::concat_mla_q_fp8")
def _concat_mla_q_fp8_fake(ql_nope: torch.Tensor, q_pe: torch.Tensor, q_out: torch.Tensor,
                           scale: torch.Tensor) -> None:
    _check_concat_mla_q_args(ql_nope, q_pe, q_out, scale)
