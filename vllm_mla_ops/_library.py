"""What the ops register from Python, next to the C++ kernels: the fake implementations (for
torch.compile and fake tensors), the kernel of the grad-mode guard the C++ validator calls, an
Autograd fallthrough, the kernel for arguments that carry torch's negative or conjugate bit, and a
clear error for nested tensors.

An eager call of an op runs no Python outside grad mode: the Autograd key falls through to the C++
kernel, whose validator calls ``_C::_grad_mode_guard`` (below) only when grad mode is on, because the
stable ABI reads grad mode but no requires_grad flag and bumps no version counter.

The fakes mirror the C++ validator (csrc/concat_mla_q_checks.cpp) check for check and message for
message, so a bad call fails at trace time with the error eager mode gives. Storage bounds and
memory overlap are the checks they cannot make (fake tensors have no addresses); the real kernel
makes them at run time.
"""

from __future__ import annotations

import inspect

import torch
from torch.nested._internal.nested_tensor import NestedTensor

_LIBRARY = torch.library.Library("_C", "IMPL")
_DispatchKey = torch._C.DispatchKey
_MATH_BIT_KEYS = torch._C.DispatchKeySet(_DispatchKey.Negative).add(_DispatchKey.Conjugate)


def _check_defined(op: str, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        torch._check(t is not None, lambda name=name: f"{op}: {name} must be a tensor, got None")


def _check_q_shapes(op: str, ql_nope: torch.Tensor, q_pe: torch.Tensor, q_out: torch.Tensor) -> None:
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


def _check_args(
    ql_nope: torch.Tensor, q_pe: torch.Tensor, q_out: torch.Tensor, scale: torch.Tensor | None = None,
    op: str = "concat_mla_q",
) -> None:
    fp8 = op == "concat_mla_q_fp8"
    _check_defined(op, ql_nope=ql_nope, q_pe=q_pe, q_out=q_out, **({"scale": scale} if fp8 else {}))
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
    if not fp8:
        torch._check(q_out.dtype == ql_nope.dtype, lambda: (
            f"{op}: q_out must have ql_nope's dtype {ql_nope.dtype}, got {q_out.dtype}"))
    else:
        torch._check(q_out.dtype == torch.float8_e4m3fn, lambda: (
            f"{op}: q_out must be torch.float8_e4m3fn, got {q_out.dtype}"))
    for t, name in ((q_pe, "q_pe"), (q_out, "q_out")):
        torch._check(t.device == ql_nope.device, lambda t=t, name=name: (
            f"{op}: {name} must be on ql_nope's device {ql_nope.device}, got {t.device}"))
    _check_q_shapes(op, ql_nope, q_pe, q_out)
    if fp8:
        torch._check(scale.dtype == torch.float32,
                     lambda: f"{op}: scale must be a torch.float32 tensor, got {scale.dtype}")
        torch._check(scale.numel() == 1, lambda: (
            f"{op}: scale must have one element (a per-tensor scale), got shape {list(scale.shape)}"))
        torch._check(scale.device == ql_nope.device, lambda: (
            f"{op}: scale must be on ql_nope's device {ql_nope.device}, got {scale.device}"))


def _check_inference_only(op: str, **tensors: torch.Tensor | None) -> None:
    """The grad-mode half of check_inference_only (csrc/ops.h) that a fake tensor can answer: under
    torch.compile, autograd traces the graph in grad mode through the fakes, while the compiled
    forward later runs the kernel with grad mode off."""
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            torch._check(t is None or not t.requires_grad, lambda name=name: (
                f"{op} is inference-only (no autograd formula): got {name} with requires_grad=True; call it under "
                "torch.no_grad() or torch.inference_mode(), or pass detached tensors"))


@torch.library.register_fake("_C::concat_mla_q")
def _concat_mla_q_fake(ql_nope: torch.Tensor, q_pe: torch.Tensor, q_out: torch.Tensor) -> None:
    _check_args(ql_nope, q_pe, q_out)
    _check_inference_only("concat_mla_q", ql_nope=ql_nope, q_pe=q_pe, q_out=q_out)


@torch.library.register_fake("_C::concat_mla_q_fp8")
def _concat_mla_q_fp8_fake(ql_nope: torch.Tensor, q_pe: torch.Tensor, q_out: torch.Tensor,
                           scale: torch.Tensor) -> None:
    _check_args(ql_nope, q_pe, q_out, scale, op="concat_mla_q_fp8")
    _check_inference_only("concat_mla_q_fp8", ql_nope=ql_nope, q_pe=q_pe, q_out=q_out, scale=scale)


def _check_rope_args(ql_nope, q_pe, positions, cos_sin_cache, q_out, q_scale, kv_c, k_pe, kv_cache, slot_mapping,
                     k_scale) -> None:
    """check_concat_mla_rope_args (csrc/concat_mla_q_checks.cpp), check for check."""
    op = "concat_mla_rope"
    _check_defined(op, ql_nope=ql_nope, q_pe=q_pe, positions=positions, cos_sin_cache=cos_sin_cache, q_out=q_out)
    dtype = ql_nope.dtype
    torch._check(dtype in (torch.float16, torch.bfloat16),
                 lambda: f"{op}: ql_nope must be float16 or bfloat16 dtype, got {dtype}")

    def rank(t, name, n, dims):
        torch._check(t.dim() == n, lambda: f"{op}: {name} must be {n}-D {dims}, got {t.dim()}-D with shape {list(t.shape)}")

    def same_dtype(t, name):
        torch._check(t.dtype == dtype, lambda: f"{op}: {name} must have ql_nope's dtype {dtype}, got {t.dtype}")

    def output_dtype(out, name, scale, scale_name):
        fp8 = out.dtype == torch.float8_e4m3fn
        torch._check(fp8 or out.dtype == dtype, lambda: (
            f"{op}: {name} must have ql_nope's dtype {dtype} or be torch.float8_e4m3fn, got {out.dtype}"))
        torch._check(not fp8 or scale is not None, lambda: (
            f"{op}: {name} is torch.float8_e4m3fn, which needs {scale_name} (a one-element float32 tensor)"))
        torch._check(fp8 or scale is None, lambda: (
            f"{op}: {scale_name} is given, so {name} must be torch.float8_e4m3fn, got {out.dtype}"))

    def device(t, name):
        torch._check(t.device == ql_nope.device, lambda: (
            f"{op}: {name} must be on ql_nope's device {ql_nope.device}, got {t.device}"))

    def scale(t, name):
        torch._check(t.dtype == torch.float32, lambda: f"{op}: {name} must be a torch.float32 tensor, got {t.dtype}")
        torch._check(t.numel() == 1, lambda: (
            f"{op}: {name} must have one element (a per-tensor scale), got shape {list(t.shape)}"))
        device(t, name)

    def tokens_of(t, name):
        torch._check(t.shape[0] == tokens, lambda: (
            f"{op}: {name} must be [tokens] with tokens={tokens} from ql_nope, got shape {list(t.shape)}"))

    rank(ql_nope, "ql_nope", 3, "[tokens, heads, nope_dim]")
    rank(q_pe, "q_pe", 3, "[tokens, heads or 1, rope_dim]")
    rank(q_out, "q_out", 3, "[tokens, heads, nope_dim + rope_dim]")
    rank(positions, "positions", 1, "[tokens]")
    rank(cos_sin_cache, "cos_sin_cache", 2, "[max_position, rope_dim]")
    same_dtype(q_pe, "q_pe")
    output_dtype(q_out, "q_out", q_scale, "q_scale")
    torch._check(positions.dtype == torch.int64, lambda: f"{op}: positions must be torch.int64, got {positions.dtype}")
    torch._check(cos_sin_cache.dtype in (torch.float32, dtype), lambda: (
        f"{op}: cos_sin_cache must be torch.float32 or have ql_nope's dtype {dtype}, got {cos_sin_cache.dtype}"))
    for t, name in ((q_pe, "q_pe"), (positions, "positions"), (cos_sin_cache, "cos_sin_cache"), (q_out, "q_out")):
        device(t, name)
    _check_q_shapes(op, ql_nope, q_pe, q_out)
    tokens, rope_dim = ql_nope.shape[0], q_pe.shape[2]
    torch._check(rope_dim % 2 == 0, lambda: (
        f"{op}: rope_dim must be even (pairs rotated by one cos and one sin), got {rope_dim}"))
    tokens_of(positions, "positions")
    torch._check(cos_sin_cache.shape[1] == rope_dim, lambda: (
        f"{op}: cos_sin_cache must be [max_position, rope_dim] with rope_dim={rope_dim} from q_pe, got shape "
        f"{list(cos_sin_cache.shape)}"))
    if q_scale is not None:
        scale(q_scale, "q_scale")
    k_side = {"kv_c": kv_c, "k_pe": k_pe, "kv_cache": kv_cache, "slot_mapping": slot_mapping}
    given = [name for name, t in k_side.items() if t is not None]
    torch._check(len(given) in (0, 4), lambda: (
        f"{op}: the K side takes kv_c, k_pe, kv_cache and slot_mapping together, got only {', '.join(given)}"))
    torch._check(len(given) == 4 or k_scale is None, lambda: (
        f"{op}: k_scale is given without the K side (kv_c, k_pe, kv_cache and slot_mapping)"))
    if not given:
        return
    rank(kv_c, "kv_c", 2, "[tokens, kv_dim]")
    torch._check(k_pe.dim() in (2, 3), lambda: (
        f"{op}: k_pe must be 2-D [tokens, rope_dim] or 3-D [tokens, 1, rope_dim], got {k_pe.dim()}-D with shape "
        f"{list(k_pe.shape)}"))
    rank(kv_cache, "kv_cache", 3, "[num_blocks, block_size, kv_dim + rope_dim]")
    rank(slot_mapping, "slot_mapping", 1, "[tokens]")
    same_dtype(kv_c, "kv_c")
    same_dtype(k_pe, "k_pe")
    output_dtype(kv_cache, "kv_cache", k_scale, "k_scale")
    torch._check(slot_mapping.dtype == torch.int64, lambda: (
        f"{op}: slot_mapping must be torch.int64, got {slot_mapping.dtype}"))
    for name, t in k_side.items():
        device(t, name)
    torch._check(kv_c.shape[0] == tokens, lambda: (
        f"{op}: kv_c must be [tokens, kv_dim] with tokens={tokens} from ql_nope, got shape {list(kv_c.shape)}"))
    torch._check(k_pe.shape[0] == tokens and k_pe.shape[-1] == rope_dim and (k_pe.dim() == 2 or k_pe.shape[1] == 1),
                 lambda: (f"{op}: k_pe must be [tokens, rope_dim] or [tokens, 1, rope_dim] with tokens={tokens} and "
                          f"rope_dim={rope_dim} from ql_nope and q_pe, got shape {list(k_pe.shape)}"))
    torch._check(kv_cache.shape[2] == kv_c.shape[1] + rope_dim, lambda: (
        f"{op}: kv_cache must be [num_blocks, block_size, kv_dim + rope_dim] with kv_dim + rope_dim = "
        f"{kv_c.shape[1]} + {rope_dim} from kv_c and q_pe, got shape {list(kv_cache.shape)}"))
    torch._check(kv_cache.shape[0] * kv_cache.shape[1] < 2**63, lambda: (
        f"{op}: kv_cache's num_blocks * block_size overflows int64, got shape {list(kv_cache.shape)}"))
    tokens_of(slot_mapping, "slot_mapping")
    if k_scale is not None:
        scale(k_scale, "k_scale")


@torch.library.register_fake("_C::concat_mla_rope")
def _concat_mla_rope_fake(ql_nope, q_pe, positions, cos_sin_cache, is_neox, q_out, q_scale, kv_c, k_pe, kv_cache,
                          slot_mapping, k_scale) -> None:
    _check_rope_args(ql_nope, q_pe, positions, cos_sin_cache, q_out, q_scale, kv_c, k_pe, kv_cache, slot_mapping,
                     k_scale)
    _check_inference_only("concat_mla_rope", ql_nope=ql_nope, q_pe=q_pe, positions=positions,
                          cos_sin_cache=cos_sin_cache, q_out=q_out, q_scale=q_scale, kv_c=kv_c, k_pe=k_pe,
                          kv_cache=kv_cache, slot_mapping=slot_mapping, k_scale=k_scale)


@torch.library.impl("_C::_grad_mode_guard", "CompositeImplicitAutograd", lib=_LIBRARY)
def _grad_mode_guard(tensors: list[torch.Tensor | None], written: int) -> tuple[int, int]:
    """The inference-only contract in grad mode, for the C++ validator (check_inference_only in
    csrc/ops.h), which words the errors: (i, -1) for the first tensor i that requires grad, else
    (-1, j) for the first written inference tensor j (torch forbids writing one outside inference
    mode), else (-1, -1) once the written tensors' versions are bumped, as torch's in-place ops do,
    so that autograd sees the write. Loops that return at their first find, not generators: this
    runs in every grad-mode call."""
    outputs = []
    for i, t in enumerate(tensors):
        if t is not None:
            if t.requires_grad:
                return i, -1
            if written >> i & 1:
                outputs.append(i)
    for i in outputs:
        if tensors[i].is_inference():
            return -1, i
    # A list, always: given one tensor, _increment_version iterates it as a sequence of rows.
    torch._C._increment_version([tensors[i] for i in outputs])
    return -1, -1


def _register(name: str) -> None:
    op = getattr(torch.ops._C, name).default
    written = [i for i, a in enumerate(op._schema.arguments) if a.alias_info is not None and a.alias_info.is_write]

    def math_bits(keyset, *args):
        """Views with the negative or conjugate bit (x.conj().imag, torch._neg_view): inputs are
        read through their resolved values; an output cannot be written through such a view."""
        for i in written:
            out = args[i]
            if isinstance(out, torch.Tensor) and (out.is_neg() or out.is_conj()):
                arg_name = op._schema.arguments[i].name
                raise RuntimeError(
                    f"{name}: {arg_name} must not carry the negative or conjugate bit (a view such as "
                    f"x.conj().imag), got one with is_neg()={out.is_neg()} and is_conj()={out.is_conj()}; "
                    "write into a plain tensor and copy from it")
        resolved = [a.resolve_conj().resolve_neg() if isinstance(a, torch.Tensor) and i not in written else a
                    for i, a in enumerate(args)]
        op.redispatch(keyset - _MATH_BIT_KEYS, *resolved)

    def nested(*args, **kwargs):
        raise RuntimeError(f"{name}: nested tensors are not supported; pass dense [tokens, heads, dim] "
                           "tensors (for example nt.to_padded_tensor(0))")

    # No Python on the eager path: Autograd falls through (ADInplaceOrView has torch's fallthrough)
    # to the C++ kernel, which checks the inference-only contract itself in grad mode.
    _LIBRARY.impl(name, torch.library.fallthrough_kernel, "Autograd")
    _LIBRARY.impl(name, math_bits, "Negative", with_keyset=True)
    _LIBRARY.impl(name, math_bits, "Conjugate", with_keyset=True)
    _LIBRARY.impl(name, nested, "NestedTensorCPU")
    _LIBRARY.impl(name, nested, "NestedTensorCUDA")
    torch.library.register_torch_dispatch(f"_C::{name}", NestedTensor, lambda mode, func, types, args, kwargs: nested())


_register("concat_mla_q")
_register("concat_mla_q_fp8")
_register("concat_mla_rope")


def document(function) -> None:
    """Gives the raw op of the Python function `function` (same name) a docstring, on the packet
    and the overload: its schema, then the function's docstring."""
    packet = getattr(torch.ops._C, function.__name__)
    schema = packet.default._schema
    written = ", ".join(a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write)
    packet.__doc__ = packet.default.__doc__ = (
        f"{schema}\n\nThe raw op: it writes {written} in place and returns nothing. "
        f"vllm_mla_ops.{function.__name__} is the same op with torch's conventions (a keyword-only out= for "
        f"q_out, allocated when not given, and returned); its documentation:\n\n{inspect.cleandoc(function.__doc__)}")
