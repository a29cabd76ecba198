#!/usr/bin/env python3
"""Host time of one eager call: torch.ops._C.concat_mla_q, concat_mla_q_fp8 and concat_mla_rope (with
and without the K side), and the Python functions vllm_mla_ops.concat_mla_q, concat_mla_q_fp8 and
concat_mla_rope (K side), against torch.cat(out=) and torch.empty_like, in grad mode, no_grad and inference_mode with tensors made outside inference mode,
and in inference_mode with inference tensors (made inside it). Same process, contenders interleaved,
rounds of 200 calls. Defaults: decode layout, CUDA 4 tokens x 128 heads; CPU 1 token x 1 head (a CPU
call does its copy too, which at 4 x 128 would hide the host path).
"""

import contextlib
import sys
from functools import partial
from types import SimpleNamespace

import torch

import harness as h
import vllm_mla_ops
from vllm_mla_ops.testing import engine_inputs

BASE = "torch.cat(out=)"
CALLS = {  # column -> the eager call over one mode's inputs x (see inputs())
    "_C.concat_mla_q": lambda x: partial(torch.ops._C.concat_mla_q, x.ql_nope, x.q_pe, x.q_out),
    "_C.concat_mla_q_fp8": lambda x: partial(torch.ops._C.concat_mla_q_fp8, x.ql_nope, x.q_pe, x.q_fp8, x.scale),
    "_C.concat_mla_rope Q+K": lambda x: partial(torch.ops._C.concat_mla_rope, x.ql_nope, x.q_pe, x.positions,
                                                x.cos_sin, False, x.q_out, None, x.kv_c, x.k_pe, x.kv_cache, x.slots,
                                                None),
    "_C.concat_mla_rope Q": lambda x: partial(torch.ops._C.concat_mla_rope, x.ql_nope, x.q_pe, x.positions,
                                              x.cos_sin, False, x.q_out, None, None, None, None, None, None),
    "concat_mla_q()": lambda x: partial(vllm_mla_ops.concat_mla_q, x.ql_nope, x.q_pe, out=x.q_out),
    "concat_mla_q_fp8()": lambda x: partial(vllm_mla_ops.concat_mla_q_fp8, x.ql_nope, x.q_pe, x.scale, out=x.q_fp8),
    "concat_mla_rope() Q+K": lambda x: partial(vllm_mla_ops.concat_mla_rope, x.ql_nope, x.q_pe, x.positions, x.cos_sin,
                                               out=x.q_out, kv_c=x.kv_c, k_pe=x.k_pe, kv_cache=x.kv_cache,
                                               slot_mapping=x.slots),
    BASE: lambda x: partial(torch.cat, (x.ql_nope, x.q_pe.expand(*x.ql_nope.shape[:2], -1)), dim=-1, out=x.q_out),
    "torch.empty_like": lambda x: partial(torch.empty_like, x.q_out),
}
MODES = {  # row -> (where the tensors are made, where the calls run)
    "grad": (contextlib.nullcontext, torch.enable_grad),
    "no_grad": (contextlib.nullcontext, torch.no_grad),
    "inference_mode": (contextlib.nullcontext, torch.inference_mode),
    "inference_mode, inference tensors": (torch.inference_mode, torch.inference_mode),
}
TOKENS = {"cuda": dict.fromkeys(h.LAYOUTS, [4]), "cpu": dict.fromkeys(h.LAYOUTS, [1])}
HEADS = {"cuda": [128], "cpu": [1]}


def inputs(dtype, layout, heads, tokens, device) -> SimpleNamespace:
    ql_nope, q_pe, q_out = engine_inputs(h.LAYOUTS[layout], tokens, heads, dtype, device)
    for t in (ql_nope, q_pe):  # a CPU fp8 conversion slows down on the NaNs of random bits
        t.copy_(torch.randn(t.shape, device=device))
    # concat_mla_rope's K side and RoPE, as in bench_concat_mla_rope.py: kv_c and k_pe views of one
    # latent row, a paged cache of 64-token blocks, random positions and slots.
    latent = torch.randn(tokens, 576, dtype=dtype, device=device)
    blocks = -(-tokens // 64)
    return SimpleNamespace(ql_nope=ql_nope, q_pe=q_pe, q_out=q_out, scale=torch.ones(1, device=device),
                           q_fp8=torch.empty_like(q_out, dtype=torch.float8_e4m3fn),
                           positions=torch.randint(0, 4096, (tokens,), device=device),
                           cos_sin=torch.rand(4096, 64, device=device), kv_c=latent[:, :512], k_pe=latent[:, 512:],
                           kv_cache=torch.zeros(blocks, 64, 576, dtype=dtype, device=device),
                           slots=torch.randperm(blocks * 64, device=device)[:tokens])


def main() -> int:
    args = h.parser(__doc__, "decode").parse_args()
    timing, tables = h.host_timing(args), []
    ops = [name for name in CALLS if not name.startswith("torch.")]
    derived = {f"{name} / cat": lambda r, name=name: r[name] / r[BASE] for name in ops}
    meaning = "<call> / cat: its host time over torch.cat(out=)'s (below 1: cheaper)"
    for dtype, layout, heads, tokens in h.shapes(args, TOKENS, HEADS):
        for n in tokens:
            table = h.Table(f"host time, {dtype} {layout}, {n} tokens x {heads} heads", "mode", derived, meaning,
                            timing)
            for mode, (made_in, run_in) in MODES.items():
                with made_in():
                    x = inputs(h.DTYPES[dtype], layout, heads, n, args.device)
                    calls = [h.Contender(name, make(x)) for name, make in CALLS.items()]
                with run_in():
                    h.measure(table, mode, lambda: calls)
            tables.append(table)
    return h.report("host time (us per eager call)", tables, args, f"host_time_{args.device.type}")


if __name__ == "__main__":
    sys.exit(main())
