#!/usr/bin/env python3
"""torch.ops._C.concat_mla_q vs torch.cat(out=) and a copy ceiling, on the layouts engines produce.

Layouts (see vllm_mla_ops.testing.engine_inputs): decode (ql_nope the transposed [heads, tokens, 512]
bmm output, q_pe the split view q[..., 128:192]), contiguous (prefill), k_side (the prefill key:
k_nope = kv[..., :128], k_pe one rope row per token shared by all heads, 128 heads).

Ceiling (CUDA): the faster of torch.bitwise_not over int16 buffers of the op's byte count and a
Triton flat copy that reads the inputs' element count and writes q_out's (best block size per size),
so for k_side it reads k_pe once per token, as the op can. --bmm adds, on the decode layout, a graph
of [bmm writing ql_nope, then the op] and of the bmm alone: the difference is what the op adds
behind the matmul that feeds it. The same pair with the Triton flat copy (block 1024) from the bmm's
output into q_out's buffer in place of the op shows what the memory state the bmm leaves costs any
copy of those bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

import harness as h
import vllm_mla_ops  # noqa: F401  (registers torch.ops._C.concat_mla_q)
from vllm_mla_ops.testing import assert_bitwise_equal, bits, engine_inputs, reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = ("decode", "contiguous", "k_side")
TOKENS = {"cuda": [1, 4, 16, 64, 256, 1024, 4096, 16384], "cpu": [1, 16, 64, 256]}
HEADS = {"cuda": [16, 128], "cpu": [128]}
K_SIDE_HEADS = [128]  # SGLang's concat_mla_k shape: every head of DeepSeek-V3 on one rank


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parser(doc: str, layouts: str) -> argparse.ArgumentParser:
    """The options every bench file of this op family shares."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=ints, help="comma list; default: %s" % TOKENS)
    p.add_argument("--heads", type=ints, help="comma list; default: %s (k_side: 128)" % HEADS)
    p.add_argument("--layout", default=layouts, help="comma list of %s (default %s)" % (LAYOUTS, layouts))
    p.add_argument("--dtype", default="bf16", help="comma list of bf16, fp16 (default bf16)")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="CSV, JSON, MD, PNG go here")
    p.add_argument("--rounds", type=int, help="interleaved rounds per size (default: CUDA 5, CPU 15)")
    p.add_argument("--threads", type=int, help="CPU: torch threads (default 2, fewer when other "
                   "processes keep cores busy: the header says so)")
    return p


def sweep(args: argparse.Namespace) -> tuple[h.Settings, list[tuple[str, str, int, list[int]]]]:
    """Settings and the (dtype, layout, heads, tokens) groups the options ask for."""
    device = torch.device(args.device)
    kind = device.type
    s = h.Settings(device, rounds=args.rounds, threads=args.threads,
                   max_threads=2)
    groups = []
    for dtype in args.dtype.split(","):
        for layout in args.layout.split(","):
            assert dtype in DTYPES and layout in LAYOUTS, (dtype, layout)
            heads = args.heads or (K_SIDE_HEADS if layout == "k_side" else HEADS[kind])
            groups += [(dtype, layout, n, sorted(args.tokens or TOKENS[kind])) for n in heads]
    return s, groups


def poison_check(fn, q_out: torch.Tensor, expect) -> Callable[[], None]:
    """Runs fn on a q_out filled with 0xFF bytes (NaN in 16-bit floats), then compares."""
    def check() -> None:
        q_out.view(torch.uint8).fill_(0xFF)
        fn()
        expect(q_out)
    return check


def case(dtype: str, layout: str, heads: int, tokens: int, device: torch.device, bmm: bool) -> h.Case:
    def setup() -> list[h.Contender]:
        ql_nope, q_pe, q_out = engine_inputs(layout, tokens, heads, DTYPES[dtype], device)
        q_pe_full = q_pe.expand(tokens, heads, q_pe.shape[2])  # torch.cat does not broadcast
        ours = lambda: torch.ops._C.concat_mla_q(ql_nope, q_pe, q_out)  # noqa: E731
        cat = lambda: torch.cat((ql_nope, q_pe_full), dim=-1, out=q_out)  # noqa: E731
        expect = lambda out: assert_bitwise_equal(out, reference(ql_nope, q_pe), "q_out")  # noqa: E731
        contenders = [h.Contender("ours", ours, h.SUBJECT, poison_check(ours, q_out, expect)),
                      h.Contender("torch.cat", cat, h.BASELINE, poison_check(cat, q_out, expect))]
        n_read, n_write = ql_nope.numel() + q_pe.numel(), q_out.numel()
        if n_read == n_write:  # bitwise_not reads what it writes: no ceiling for k_side
            contenders += h.bitwise_not_ceiling(n_write, device)
        contenders += h.flat_copy_ceilings(n_read, n_write, device)
        contenders += h.launch_floor(device)
        if pair:
            contenders += bmm_pair(ql_nope, ours, q_out, expect)
        return contenders
    pair = bmm and layout == "decode" and device.type == "cuda"
    return h.Case(f"{dtype} {layout}, {heads} heads", tokens, setup, added_by_ours if pair else None)


def bmm_pair(ql_nope: torch.Tensor, ours, q_out: torch.Tensor, expect) -> list[h.Contender]:
    """The decode producer: bmm([H, T, 128] x [H, 128, 512]) written straight into ql_nope's
    [H, T, 512] storage, alone and followed by the op."""
    bmm_out = ql_nope.transpose(0, 1)
    assert bmm_out.is_contiguous()
    heads, tokens, nope_dim = bmm_out.shape
    q_nope = torch.randn(heads, tokens, 128, dtype=ql_nope.dtype, device=ql_nope.device)
    w_uk = torch.randn(heads, 128, nope_dim, dtype=ql_nope.dtype, device=ql_nope.device) / 16
    bmm = lambda: torch.bmm(q_nope, w_uk, out=bmm_out)  # noqa: E731
    copy = h.flat_copy(bits(bmm_out).view(-1), bits(q_out).view(-1), 1024)

    def then(op):
        def pair() -> None:
            bmm()
            op()
        return pair
    return [h.Contender("bmm", bmm),
            h.Contender("bmm -> ours", then(ours), check=poison_check(then(ours), q_out, expect)),
            h.Contender("copy", copy), h.Contender("bmm -> copy", then(copy))]


def added_by_ours(medians: dict[str, float]) -> dict[str, str]:
    """What the op and the copy add behind the bmm, against their time alone."""
    if not all(k in medians for k in ("bmm", "bmm -> ours", "ours", "copy", "bmm -> copy")):
        return {}
    added, copy_added = (medians[f"bmm -> {k}"] - medians["bmm"] for k in ("ours", "copy"))
    return {"ours after bmm us": f"{added * 1e6:.2f}",
            "after bmm / alone": f"{100 * added / medians['ours']:.0f}%",
            "copy after bmm / alone": f"{100 * copy_added / medians['copy']:.0f}%"}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, "decode,contiguous,k_side")
    p.add_argument("--bmm", action="store_true", help="add the [bmm -> concat] pair (CUDA, decode layout)")
    args = p.parse_args(argv)
    s, groups = sweep(args)
    cases = [case(d, l, n, t, s.device, args.bmm) for d, l, n, tokens in groups for t in tokens]
    results = h.run(cases, s)
    return h.report(results, s, "concat_mla_q (us per call)", args.out,
                    f"concat_mla_q_{s.device.type}", size_name="tokens")


if __name__ == "__main__":
    sys.exit(main())
