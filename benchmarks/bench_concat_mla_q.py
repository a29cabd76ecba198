#!/usr/bin/env python3
"""torch.ops._C.concat_mla_q against torch.cat(out=) and (CUDA) the same-bytes ceiling, on the layouts
engines produce (vllm_mla_ops.testing.engine_inputs), a table per dtype, layout and head count:
  decode   ql_nope the transposed [heads, tokens, 512] bmm output, q_pe the split view q[..., 128:192]
  prefill  all contiguous
  k_side   SGLang's prefill K (concat_mla_k): k_nope = kv[..., :128] of [T, H, 256], k_pe one rope row
           per token shared by every head, k [T, H, 192]
Defaults: CUDA 1-16384 tokens at 16 and 128 heads; CPU decode 1/16/64 tokens, prefill and k_side
256/1024, at 128 heads. --bmm (CUDA, decode) adds the op behind the bmm that writes ql_nope.
"""

import sys
from functools import partial

import torch

import harness as h
from vllm_mla_ops.testing import assert_bitwise_equal, bits, engine_inputs, reference


def case(dtype, layout, heads, tokens, device, bmm) -> list[h.Contender]:
    ql_nope, q_pe, q_out = engine_inputs(h.LAYOUTS[layout], tokens, heads, dtype, device)
    expect = lambda: assert_bitwise_equal(q_out, reference(ql_nope, q_pe))  # noqa: E731
    ours = partial(torch.ops._C.concat_mla_q, ql_nope, q_pe, q_out)
    cat = partial(torch.cat, (ql_nope, q_pe.expand(tokens, heads, -1)), dim=-1, out=q_out)
    out = [h.Contender("ours", ours, h.poisoned(ours, q_out, 0xFF, expect)),  # 0xFFFF: a NaN
           h.Contender("torch.cat", cat, h.poisoned(cat, q_out, 0xFF, expect))]
    out += h.ceilings(ql_nope.numel() + q_pe.numel(), q_out.numel(), device)
    if not bmm:
        return out
    # The decode producer, bmm([H, T, 128] x [H, 128, 512]), writing ql_nope's [H, T, 512] storage; and
    # a flat copy of its output into q_out's buffer: what any kernel moving those bytes pays after it.
    bmm_out = ql_nope.transpose(0, 1)
    q_nope = torch.randn(heads, tokens, 128, dtype=dtype, device=device)
    w_uk = torch.randn(heads, 128, bmm_out.shape[2], dtype=dtype, device=device) / 16
    producer = partial(torch.bmm, q_nope, w_uk, out=bmm_out)
    copy = h.flat_copy(bits(bmm_out).view(-1), bits(q_out).view(-1))

    def after_bmm(fn):
        return lambda: (producer(), fn())
    return out + [h.Contender("bmm", producer),
                  h.Contender("bmm -> ours", after_bmm(ours), h.poisoned(after_bmm(ours), q_out, 0xFF, expect)),
                  h.Contender("copy", copy), h.Contender("bmm -> copy", after_bmm(copy))]


def main() -> int:
    p = h.parser(__doc__, "decode,prefill,k_side")
    p.add_argument("--bmm", action="store_true", help="add the [bmm -> op] pair (CUDA, decode layout)")
    args = p.parse_args()
    timing, cuda, tables = h.kernel_timing(args), args.device.type == "cuda", []
    with torch.inference_mode():  # as engines call these inference-only ops
        for dtype, layout, heads, tokens in h.shapes(args):
            pair = args.bmm and cuda and layout == "decode"
            derived = {"torch.cat / ours": lambda r: r["torch.cat"] / r["ours"]}
            meaning = "torch.cat / ours: torch.cat(out=)'s time over ours in the same round (above 1: ours is faster)"
            if cuda:
                derived["ceiling / ours"] = lambda r: r[h.CEILING] / r["ours"]
                meaning += "; ceiling / ours: the fastest same-bytes copy's time over ours (1: at the ceiling)"
            if pair:
                derived |= {"ours after bmm us": lambda r: r["bmm -> ours"] - r["bmm"],
                            "after bmm / alone": lambda r: (r["bmm -> ours"] - r["bmm"]) / r["ours"],
                            "copy after bmm / alone": lambda r: (r["bmm -> copy"] - r["bmm"]) / r["copy"]}
                meaning += ("; ours after bmm: (bmm -> ours) - bmm, what the op adds behind the bmm that feeds "
                            "it; after bmm / alone: that over ours alone; copy after bmm / alone: the same for "
                            "a flat copy of the bmm's output")
            table = h.Table(f"concat_mla_q, {dtype} {layout}, {heads} heads", "tokens", derived, meaning, timing)
            for n in tokens:
                h.measure(table, n, partial(case, h.DTYPES[dtype], layout, heads, n, args.device, pair))
            tables.append(table)
    return h.report("concat_mla_q (us per call)", tables, args, f"concat_mla_q_{args.device.type}")


if __name__ == "__main__":
    sys.exit(main())
