#!/usr/bin/env python3
"""torch.ops._C.concat_mla_q_fp8 (the concat with static per-tensor float8_e4m3fn quantization)
against the same in eager torch, (CUDA) under torch.compile as vLLM compiles its fp8 MLA decode
query, and (CUDA) a 3-byte ceiling; layouts as in bench_concat_mla_q.py.
The compiled contender has the token dim dynamic and is compiled first at the table's largest token
count (Inductor tunes for the first sizes it sees, as an engine's profiling pass does; at 1 token
Dynamo specializes and compiles again). It may differ from eager in a few elements (Inductor fuses the
arithmetic): a note under the table, not a failure.
Defaults: CUDA 1-16384 tokens at 16 and 128 heads; CPU decode 1/16 tokens and prefill 256 at 128
heads (eager's temporaries make larger CPU sizes slow and, at 64 decode tokens, not repeatable).
"""

import sys
from functools import partial

import torch

import harness as h
from vllm_mla_ops.testing import assert_fp8_equal, engine_inputs, reference_fp8

FP8 = torch.float8_e4m3fn
SCALE = 0.0625  # N(0, 1) activations / SCALE reach e4m3fn's largest values without all saturating
TOKENS = {"cuda": h.TOKENS["cuda"], "cpu": {"decode": [1, 16], "prefill": [256], "k_side": [256]}}


def cat_quant(ql_nope: torch.Tensor, q_pe: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = torch.cat((ql_nope, q_pe.expand(*ql_nope.shape[:2], -1)), dim=-1)
    return (q.float() * scale.reciprocal()).clamp(-448.0, 448.0).to(FP8)


def compiled_cat_quant(dtype, layout, heads, tokens, device):
    torch._dynamo.reset()
    fn = torch.compile(cat_quant)
    ql_nope, q_pe, _ = engine_inputs(h.LAYOUTS[layout], tokens, heads, dtype, device)
    for t in (ql_nope, q_pe):
        # Dynamo specializes a size-1 dim, and mark_dynamic of it is an error.
        (torch._dynamo.mark_dynamic if tokens >= 2 else torch._dynamo.maybe_mark_dynamic)(t, 0)
    fn(ql_nope, q_pe, torch.ones(1, device=device))
    return fn


def case(dtype, layout, heads, tokens, device, compiled, inputs) -> list[h.Contender]:
    ql_nope, q_pe, q_out = engine_inputs(h.LAYOUTS[layout], tokens, heads, dtype, device, out_dtype=FP8)
    inputs += [ql_nope, q_pe]
    scale = torch.tensor([SCALE], dtype=torch.float32, device=device)
    expected = lambda: reference_fp8(ql_nope, q_pe, scale)  # noqa: E731
    ours = partial(torch.ops._C.concat_mla_q_fp8, ql_nope, q_pe, q_out, scale)
    eager = partial(cat_quant, ql_nope, q_pe, scale)
    # 0x5A: a finite e4m3fn value, since the comparison takes a NaN of either sign for a NaN.
    out = [h.Contender("ours", ours, h.poisoned(ours, q_out, 0x5A, lambda: assert_fp8_equal(q_out, expected()))),
           h.Contender("eager", eager, lambda: assert_fp8_equal(eager(), expected(), "result"))]
    if compiled is not None:
        run = partial(compiled, ql_nope, q_pe, scale)

        def check_compiled() -> str | None:
            try:
                assert_fp8_equal(run(), expected(), "result")
            except AssertionError as exc:
                return f"differs from eager (Inductor's fused arithmetic): {exc}"
            return None
        out.append(h.Contender("compiled", run, check_compiled))
    return out + h.ceilings(ql_nope.numel() + q_pe.numel(), q_out.numel(), device, torch.int8)


def main() -> int:
    args = h.parser(__doc__, "decode,prefill").parse_args()
    timing, cuda, tables = h.kernel_timing(args), args.device.type == "cuda", []
    with torch.inference_mode():  # as engines call these inference-only ops
        for dtype, layout, heads, tokens in h.shapes(args, TOKENS):
            compiled = compiled_cat_quant(h.DTYPES[dtype], layout, heads, max(tokens), args.device) if cuda else None
            derived = {"eager / ours": lambda r: r["eager"] / r["ours"]}
            meaning = "eager / ours: eager torch's time over ours in the same round (above 1: ours is faster)"
            if cuda:
                derived |= {"compiled / ours": lambda r: r["compiled"] / r["ours"],
                            "ceiling / ours": lambda r: r[h.CEILING] / r["ours"]}
                meaning += ("; compiled / ours: the same for torch.compile; ceiling / ours: a flat kernel "
                            "reading 2 bytes and writing 1 per element, over ours (1: at the ceiling)")
            table = h.Table(f"concat_mla_q_fp8, {dtype} {layout}, {heads} heads", "tokens", derived, meaning, timing)
            for n in tokens:
                inputs: list[torch.Tensor] = []
                h.measure(table, n, partial(case, h.DTYPES[dtype], layout, heads, n, args.device, compiled, inputs),
                          # Checked on random bits, timed on values like a model's: a CPU float
                          # conversion slows down on the NaNs, infs and subnormals of random bits.
                          lambda: [t.copy_(torch.randn(t.shape, device=t.device)) for t in inputs])
            tables.append(table)
    return h.report("concat_mla_q_fp8 (us per call)", tables, args, f"concat_mla_q_fp8_{args.device.type}")


if __name__ == "__main__":
    sys.exit(main())
