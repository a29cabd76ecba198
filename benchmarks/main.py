#!/usr/bin/env python3
"""The default benchmark on whatever machine runs it, DeepSeek-V3 geometry (512 / 64, 128 heads).

CUDA: concat_mla_q on the decode layout at 1-16384 tokens vs torch.cat(out=) and the copy ceiling,
with the [bmm -> concat] pair; then concat_mla_q_fp8 vs eager, compiled and its 3-byte ceiling.
CPU: concat_mla_q vs torch.cat(out=) at decode (decode layout, 1/16/64 tokens) and prefill
(contiguous, 256/1024 tokens) shapes, then concat_mla_q_fp8 vs eager at 1/16 and 256/1024.
Each op's table is printed at the end and written with CSV, JSON (and PNG) to --out.
For other shapes, layouts and contenders run bench_concat_mla_q.py / bench_concat_mla_q_fp8.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import bench_concat_mla_q as bf16
import bench_concat_mla_q_fp8 as fp8
import harness as h

HEADS = 128
SHAPES = {"cuda": [("decode", bf16.TOKENS["cuda"])],
          "cpu": [("decode", [1, 16, 64]), ("contiguous", [256, 1024])]}
# Eager fp8 allocates four temporaries per call; at 64 tokens (19 MB each) glibc serves them from
# the heap or from fresh mmap pages depending on what ran before: 5 or 30 ms from run to run.
FP8_SHAPES = {"cuda": SHAPES["cuda"], "cpu": [("decode", [1, 16]), ("contiguous", [256, 1024])]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(bf16.DTYPES))
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="CSV, JSON, MD, PNG go here")
    p.add_argument("--rounds", type=int, help="interleaved rounds per size (default: CUDA 5, CPU 15)")
    p.add_argument("--threads", type=int, help="CPU: torch threads (default 2, fewer when other "
                   "processes keep cores busy: the header says so)")
    args = p.parse_args(argv)
    s = h.Settings(torch.device(args.device), rounds=args.rounds, threads=args.threads,
                   max_threads=2)
    cuda = s.device.type == "cuda"
    shapes = SHAPES[s.device.type]

    cases = [bf16.case(args.dtype, layout, HEADS, t, s.device, bmm=cuda)
             for layout, tokens in shapes for t in tokens]
    results = h.run(cases, s)

    shapes = FP8_SHAPES[s.device.type]
    largest = {(args.dtype, layout, HEADS): max(tokens) for layout, tokens in shapes}
    compiled = fp8.compiled_per_group(largest, s.device) if cuda else None
    fp8_results = h.run([fp8.case(args.dtype, layout, HEADS, t, s.device, compiled)
                         for layout, tokens in shapes for t in tokens], s)

    status = h.report(results, s, "concat_mla_q (us per call)", args.out,
                      f"main_concat_mla_q_{s.device.type}", size_name="tokens")
    print()
    return status | h.report(fp8_results, s, "concat_mla_q_fp8 (us per call)", args.out,
                             f"main_concat_mla_q_fp8_{s.device.type}", size_name="tokens")


if __name__ == "__main__":
    sys.exit(main())
