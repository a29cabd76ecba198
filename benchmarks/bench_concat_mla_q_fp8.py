#!/usr/bin/env python3
"""torch.ops._C.concat_mla_q_fp8 (concat + static per-tensor float8_e4m3fn quantization) vs the
ways engines compute it, and a 3-byte ceiling.

Contenders: ours; "eager" = (cat(ql_nope, q_pe).float() * scale.reciprocal()).clamp(-448, 448)
.to(float8_e4m3fn), the reference expression in eager torch; "compiled" = the same expression under
torch.compile with the token dim marked dynamic, as vLLM compiles its FP8 MLA decode query, first
compiled at the sweep's largest token count (Inductor tunes the kernel for the first sizes it
sees, as an engine's profiling pass does; at 1 token Dynamo specializes and compiles again).
Ceiling (CUDA): a Triton flat kernel that reads the inputs' element count as int16 and writes
q_out's as int8 (best block size per size). Inductor's fused arithmetic may differ from eager in a
few elements: that is reported as a note, not a failure. On CPU: ours vs eager.
"""

from __future__ import annotations

import sys

import torch

import harness as h
import vllm_mla_ops  # noqa: F401  (registers torch.ops._C.concat_mla_q_fp8)
from bench_concat_mla_q import DTYPES, parser, sweep
from vllm_mla_ops.testing import assert_fp8_equal, engine_inputs, reference_fp8

FP8 = torch.float8_e4m3fn
SCALE = 0.0625  # N(0, 1) activations / SCALE reach e4m3fn's largest values without all saturating


def cat_quant(ql_nope: torch.Tensor, q_pe: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    tokens, heads, _ = ql_nope.shape
    q = torch.cat((ql_nope, q_pe.expand(tokens, heads, q_pe.shape[2])), dim=-1)
    return (q.float() * scale.reciprocal()).clamp(-448.0, 448.0).to(FP8)


def compiled_for(dtype: str, layout: str, heads: int, tokens: int, device: torch.device):
    """A fresh torch.compile of cat_quant, compiled first at ``tokens`` with the token dim dynamic."""
    torch._dynamo.reset()
    fn = torch.compile(cat_quant)
    ql_nope, q_pe, _ = engine_inputs(layout, tokens, heads, DTYPES[dtype], device)
    for t in (ql_nope, q_pe):
        # Dynamo specializes a size-1 dim, and mark_dynamic of it is an error.
        (torch._dynamo.mark_dynamic if tokens >= 2 else torch._dynamo.maybe_mark_dynamic)(t, 0)
    fn(ql_nope, q_pe, torch.ones(1, device=device))
    return fn


def compiled_per_group(largest: dict[tuple[str, str, int], int], device: torch.device):
    """(dtype, layout, heads) -> its compiled cat_quant, compiled first at largest[key] tokens.
    Cases run group by group, so each group starts from fresh Dynamo caches."""
    cache: dict[tuple[str, str, int], object] = {}

    def get(dtype: str, layout: str, heads: int):
        key = (dtype, layout, heads)
        if key not in cache:
            cache.clear()
            cache[key] = compiled_for(dtype, layout, heads, largest[key], device)
        return cache[key]
    return get


def case(dtype: str, layout: str, heads: int, tokens: int, device: torch.device, compiled) -> h.Case:
    inputs: list[torch.Tensor] = []

    def activations() -> None:
        # Checked on random bit patterns, timed on values like a model's: N(0, 1), so that x / SCALE
        # spans the e4m3fn range.
        for t in inputs:
            t.copy_(torch.randn(t.shape, device=device))
        inputs.clear()  # the contenders hold them while the case runs; nothing after

    def setup() -> list[h.Contender]:
        ql_nope, q_pe, q_out = engine_inputs(layout, tokens, heads, DTYPES[dtype], device, out_dtype=FP8)
        inputs[:] = [ql_nope, q_pe]
        scale = torch.tensor([SCALE], dtype=torch.float32, device=device)
        ours = lambda: torch.ops._C.concat_mla_q_fp8(ql_nope, q_pe, q_out, scale)  # noqa: E731
        expected = lambda: reference_fp8(ql_nope, q_pe, scale)  # noqa: E731

        def check_ours() -> None:
            q_out.view(torch.uint8).fill_(0x5A)  # a finite e4m3fn value: NaNs compare sign-free
            ours()
            assert_fp8_equal(q_out, expected(), "q_out")

        def check_returned(fn, strict: bool):
            def check() -> str | None:
                try:
                    assert_fp8_equal(fn(), expected(), "result")
                except AssertionError as exc:
                    if strict:
                        raise
                    return f"differs from eager (Inductor's fused arithmetic): {exc}"
                return None
            return check

        eager = lambda: cat_quant(ql_nope, q_pe, scale)  # noqa: E731
        contenders = [h.Contender("ours", ours, h.SUBJECT, check_ours),
                      h.Contender("eager", eager, h.BASELINE, check_returned(eager, True))]
        if compiled is not None:
            fn = compiled(dtype, layout, heads)
            run = lambda: fn(ql_nope, q_pe, scale)  # noqa: E731
            contenders.append(h.Contender("compiled", run, h.BASELINE, check_returned(run, False)))
        n_read = ql_nope.numel() + q_pe.numel()
        contenders += h.flat_copy_ceilings(n_read, q_out.numel(), device, torch.int16, torch.int8)
        contenders += h.launch_floor(device)
        return contenders
    return h.Case(f"{dtype} {layout}, {heads} heads", tokens, setup, before_timing=activations)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, "decode,contiguous")
    p.add_argument("--compiled", choices=("auto", "yes", "no"), default="auto",
                   help="the torch.compile contender (auto: on CUDA only)")
    args = p.parse_args(argv)
    s, groups = sweep(args)
    use = args.compiled == "yes" or (args.compiled == "auto" and s.device.type == "cuda")
    compiled = compiled_per_group({g[:3]: max(g[3]) for g in groups}, s.device) if use else None
    cases = [case(d, l, n, t, s.device, compiled) for d, l, n, tokens in groups for t in tokens]
    results = h.run(cases, s)
    return h.report(results, s, "concat_mla_q_fp8 (us per call)", args.out,
                    f"concat_mla_q_fp8_{s.device.type}", size_name="tokens")


if __name__ == "__main__":
    sys.exit(main())
