"""What the ops register from Python, next to the C++ kernels: the fake implementations (for
torch.compile and fake tensors), the inference-only guard with the version bump, the kernel for
arguments that carry torch's negative or conjugate bit, and a clear error for nested tensors. The
stable ABI the C++ side is built on offers no grad-mode or version-counter calls, so these live here.

The fakes mirror the C++ validator (csrc/concat_mla_q_checks.cpp) check for check and message for
message, so a bad call fails at trace time with the error eager mode gives. Storage bounds and
memory overlap are the checks they cannot make (fake tensors have no addresses); the real kernel
makes them at run time.
"""

from __future__ import annotations

import torch
from torch.nested._internal.nested_tensor import NestedTensor

_LIBRARY = torch.library.Library("_C", "IMPL")
_DispatchKey = torch._C.DispatchKey
_MATH_BIT_KEYS = torch._C.DispatchKeySet(_DispatchKey.Negative).add(_DispatchKey.Conjugate)


def _check_args(
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
    torch._check(nope_dim + rope_dim < 2**63, lambda: (
        f"{op}: nope_dim + rope_dim = {nope_dim} + {rope_dim} overflows int64"))
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
    _check_args(ql_nope, q_pe, q_out)


@torch.library.register_fake("_C::concat_mla_q_fp8")
def _concat_mla_q_fp8_fake(ql_nope: torch.Tensor, q_pe: torch.Tensor, q_out: torch.Tensor,
                           scale: torch.Tensor) -> None:
    _check_args(ql_nope, q_pe, q_out, scale)


def _register(name: str) -> None:
    op = getattr(torch.ops._C, name).default
    arg_names = [a.name for a in op._schema.arguments]

    def guard(keyset, *args):
        """The ops have no derivative formula: in grad mode a tensor that requires grad is an error,
        not a silently wrong gradient. torch forbids writing an inference tensor outside inference
        mode. Both are refused before the kernel runs, so nothing is written on an error; after it,
        q_out's version is bumped so that autograd sees the in-place write, as for torch's own ops.

        Registered at ADInplaceOrView (where torch's own ops bump versions): outside inference mode
        every call passes it, inference tensors included; inside it, calls on normal tensors pass it
        (their versions are bumped, as torch does) and calls on inference tensors do not."""
        if torch.is_grad_enabled():
            for arg_name, arg in zip(arg_names, args):
                if isinstance(arg, torch.Tensor) and arg.requires_grad:
                    raise RuntimeError(
                        f"{name} is inference-only (no autograd formula): got {arg_name} with "
                        "requires_grad=True; call it under torch.no_grad() or torch.inference_mode(), or "
                        "pass detached tensors")
        q_out = args[2]
        if q_out.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{name}: q_out is an inference tensor (created under torch.inference_mode()) and cannot "
                "be written outside inference mode; call the op under torch.inference_mode() or pass a "
                "q_out created outside it")
        op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args)
        torch._C._increment_version((q_out,))

    def math_bits(keyset, *args):
        """Views with the negative or conjugate bit (x.conj().imag, torch._neg_view): inputs are
        read through their resolved values; q_out cannot be written through such a view."""
        q_out = args[2]
        if q_out.is_neg() or q_out.is_conj():
            raise RuntimeError(
                f"{name}: q_out must not carry the negative or conjugate bit (a view such as "
                f"x.conj().imag), got one with is_neg()={q_out.is_neg()} and is_conj()={q_out.is_conj()}; "
                "write into a plain tensor and copy from it")
        resolved = [a.resolve_conj().resolve_neg() if isinstance(a, torch.Tensor) and i != 2 else a
                    for i, a in enumerate(args)]
        op.redispatch(keyset - _MATH_BIT_KEYS, *resolved)

    def nested(*args, **kwargs):
        raise RuntimeError(f"{name}: nested tensors are not supported; pass dense [tokens, heads, dim] "
                           "tensors (for example nt.to_padded_tensor(0))")

    # The Autograd key falls through to `guard`: one Python layer per eager call, not two.
    _LIBRARY.impl(name, torch.library.fallthrough_kernel, "Autograd")
    _LIBRARY.impl(name, guard, "ADInplaceOrView", with_keyset=True)
    _LIBRARY.impl(name, math_bits, "Negative", with_keyset=True)
    _LIBRARY.impl(name, math_bits, "Conjugate", with_keyset=True)
    _LIBRARY.impl(name, nested, "NestedTensorCPU")
    _LIBRARY.impl(name, nested, "NestedTensorCUDA")
    torch.library.register_torch_dispatch(f"_C::{name}", NestedTensor, lambda mode, func, types, args, kwargs: nested())


_register("concat_mla_q")
_register("concat_mla_q_fp8")
