#!/usr/bin/env python3
"""torch.ops._C.concat_mla_rope (RoPE of q_pe and k_pe, the query concat and the paged KV-cache write
of an MLA layer in one kernel) against the launches it replaces and (CUDA) the same-bytes ceiling, on
DeepSeek-V3's shapes as engines lay them out; a table per variant, dtype and head count:
  ql_nope      the bmm's [heads, tokens, 512] output, transposed
  q_pe         q[..., 128:192] of the projected query q [tokens, heads, 192]
  kv_c, k_pe   latent[:, :512] and latent[:, 512:] of the compressed latent [tokens, 576]
  positions    random below 4096; cos_sin_cache [4096, 64] float32; GPT-J pairs (is_neox=False)
  kv_cache     [blocks, 64, 576], as many blocks as the tokens need; slots a random permutation
Variants (--variant): q (Q only), qk (Q and the cache write), q_fp8 (q_out float8_e4m3fn with
q_scale), qk_fp8 (q_out and kv_cache float8_e4m3fn, q_scale and k_scale).
Contenders: fused, the op. unfused, the launches it replaces: RoPE of q_pe (and k_pe) in place, the
cache write (qk variants), then concat_mla_q or concat_mla_q_fp8 (minimal Triton kernels on CUDA,
autotuned; torch ops on CPU). (CUDA) ceiling: one flat copy of the op's bytes. (CUDA, q and qk) the
bmm [H, T, 128] x [H, 128, 512] then the op, the bmm writing q_out[..., :512] itself (the op then
writes the rest) or its own buffer (the op copies it).
Defaults: CUDA 1-16384 tokens at 16 and 128 heads; CPU 1/16/64 tokens at 16 heads.
"""

import functools
import sys
from functools import partial
from types import SimpleNamespace

import torch

import harness as h
from vllm_mla_ops.testing import (assert_bitwise_equal, assert_equal_or_both_nan, assert_fp8_equal, bits,
                                  random_bits, reference_rope)

FP8 = torch.float8_e4m3fn
NOPE, ROPE, Q_NOPE, MAX_POSITION, BLOCK_SIZE = 512, 64, 128, 4096, 64  # Q_NOPE: q's own nope part (bmm input)
SCALE = 0.0625  # as bench_concat_mla_q_fp8.py: N(0, 1) / SCALE spans e4m3fn's range without all saturating
VARIANTS = {"q": (False, False), "qk": (True, False), "q_fp8": (False, True), "qk_fp8": (True, True)}  # K side, fp8
TITLES = {"q": "Q only", "qk": "Q+K", "q_fp8": "Q only, fp8 q_out", "qk_fp8": "Q+K, fp8 q_out and cache"}
TOKENS = {"cuda": h.TOKENS["cuda"]["decode"], "cpu": [1, 16, 64]}
HEADS = {"cuda": h.HEADS["cuda"], "cpu": [16]}
IN_PLACE, COPY = "bmm -> fused, in place", "bmm -> fused, copy"


def inputs(dtype, heads, tokens, device, k_side, fp8) -> SimpleNamespace:
    """One row's tensors, the inputs of random bits (the gate's; timing refills them, see main)."""
    x = SimpleNamespace(heads=heads, tokens=tokens, k_side=k_side, fp8=fp8)
    x.bmm_out = random_bits((heads, tokens, NOPE), dtype, device)
    x.q = random_bits((tokens, heads, Q_NOPE + ROPE), dtype, device)
    x.latent = random_bits((tokens, NOPE + ROPE), dtype, device)
    x.ql_nope, x.q_pe = x.bmm_out.transpose(0, 1), x.q[..., Q_NOPE:]
    x.kv_c, x.k_pe = x.latent[:, :NOPE], x.latent[:, NOPE:]
    x.positions = torch.randint(0, MAX_POSITION, (tokens,), device=device)
    inv_freq = 10000.0 ** -(torch.arange(0, ROPE, 2, device=device) / ROPE)
    angles = torch.arange(MAX_POSITION, device=device)[:, None] * inv_freq
    x.cos_sin = torch.cat((angles.cos(), angles.sin()), -1)
    blocks = -(-tokens // BLOCK_SIZE)
    x.kv_cache = random_bits((blocks, BLOCK_SIZE, NOPE + ROPE), FP8 if fp8 else dtype, device)
    x.slots = torch.randperm(blocks * BLOCK_SIZE, device=device)[:tokens]
    x.q_out = random_bits((tokens, heads, NOPE + ROPE), FP8 if fp8 else dtype, device)
    x.q_scale = x.k_scale = torch.tensor([SCALE], device=device) if fp8 else None
    return x


def fused(x, ql_nope):
    k = (x.kv_c, x.k_pe, x.kv_cache, x.slots, x.k_scale) if x.k_side else (None,) * 5
    return partial(torch.ops._C.concat_mla_rope, ql_nope, x.q_pe, x.positions, x.cos_sin, False, x.q_out,
                   x.q_scale, *k)


def gate(x, saved: dict, run, nope=None):
    """The gate's check of a contender: the inputs and the cache restored to ``saved`` (their random
    bits), q_out poisoned, ``run`` once, then q_out and the whole cache compared with reference_rope
    over the restored inputs (ql_nope: ``nope()``, default ql_nope as the run left it, which a bmm
    may have written). Copied bits bit for bit; rotated bf16/fp16 values equal or both NaN; fp8 byte
    for byte, a NaN of either sign for a NaN."""
    def check() -> None:
        for t, value in saved.items():
            t.copy_(value)
        x.q_out.view(torch.uint8).fill_(0x5A)  # finite in bf16, fp16 and e4m3fn, so a NaN-aware check sees it
        run()
        k = dict(kv_c=saved[x.latent][:, :NOPE], k_pe=saved[x.latent][:, NOPE:], kv_cache=saved[x.kv_cache],
                 slot_mapping=x.slots, k_scale=x.k_scale) if x.k_side else {}
        expected = reference_rope(nope() if nope else x.ql_nope, saved[x.q][..., Q_NOPE:], x.positions, x.cos_sin,
                                  False, x.q_scale, **k)
        outputs = {"q_out": x.q_out} | ({"kv_cache": x.kv_cache} if x.k_side else {})
        for name, actual in outputs.items():
            if x.fp8:
                assert_fp8_equal(actual, expected[name], name)
            else:
                assert_bitwise_equal(actual[..., :-ROPE], expected[name][..., :-ROPE], name)
                assert_equal_or_both_nan(actual[..., -ROPE:], expected[name][..., -ROPE:], name)
    return check


# ------------------------------------------------------------------------------- unfused sequence


def unfused(x):
    """RoPE of q_pe (and k_pe) in place, the cache write, the concat: the launches the op replaces.
    Timed back to back, the RoPE rotates the same rows again at every call: the same work, other
    values. Minimal Triton kernels on CUDA, torch ops on CPU."""
    if x.q_pe.is_cuda:
        rope, cache_write = _triton_kernels(x)
    else:
        rope, cache_write = partial(torch_rope_, x), partial(torch_cache_write, x)
    concat = (partial(torch.ops._C.concat_mla_q_fp8, x.ql_nope, x.q_pe, x.q_out, x.q_scale) if x.fp8
              else partial(torch.ops._C.concat_mla_q, x.ql_nope, x.q_pe, x.q_out))

    def run() -> None:
        rope()
        if x.k_side:
            cache_write()
        concat()
    return run


def torch_rope_(x) -> None:
    cos_sin = x.cos_sin[x.positions]
    for t, c, s in ((x.q_pe, cos_sin[:, None, :ROPE // 2], cos_sin[:, None, ROPE // 2:]),
                    (x.k_pe, cos_sin[:, :ROPE // 2], cos_sin[:, ROPE // 2:]))[:1 + x.k_side]:
        a, b = t[..., 0::2].float(), t[..., 1::2].float()
        t[..., 0::2] = a * c - b * s  # torch's eager ops round each product: no fused multiply-add
        t[..., 1::2] = b * c + a * s


def torch_cache_write(x) -> None:
    rows = torch.cat((x.kv_c, x.k_pe), -1)
    if x.fp8:
        rows = (rows.float() / x.k_scale).clamp(-448, 448).to(FP8)  # vLLM's fp8 cache: a division
    bits(x.kv_cache).view(-1, NOPE + ROPE).index_copy_(0, x.slots, bits(rows))


def _triton_kernels(x):
    assert x.q_pe.stride(2) == x.k_pe.stride(1) == x.cos_sin.stride(1) == x.kv_cache.stride(2) == 1, "unit last dim"
    rope, cache_write = _kernels()
    q_rows, k_rows, k_pe = x.tokens * x.heads, x.tokens * x.k_side, x.k_pe if x.k_side else x.q_pe
    # enable_fp_fusion=False: Triton otherwise contracts a*c - b*s into fma(a, c, -(b*s)) (fma.rn.f32
    # in the PTX), one rounding fewer than the reference; without it: mul.rn.f32, then sub.rn.f32.
    launch_rope = partial(rope[lambda m: (-(-q_rows // m["BLOCK"]) - (-k_rows // m["BLOCK"]),)],
                          x.q_pe, k_pe, x.positions, x.cos_sin, q_rows, k_rows, x.heads, x.q_pe.stride(0),
                          x.q_pe.stride(1), k_pe.stride(0), x.cos_sin.stride(0), HALF=ROPE // 2,
                          enable_fp_fusion=False)
    launch_cache = partial(cache_write[lambda m: (-(-x.tokens // m["BLOCK_T"]), (NOPE + ROPE) // ROPE)],
                           x.kv_c, x.k_pe, x.kv_cache, x.slots, x.k_scale if x.fp8 else x.cos_sin, x.tokens,
                           x.kv_c.stride(0), x.k_pe.stride(0), x.kv_cache.stride(0), x.kv_cache.stride(1),
                           x.kv_cache.shape[1], KV_DIM=NOPE, ROPE_DIM=ROPE, FP8=x.fp8)
    return launch_rope, launch_cache


@functools.cache
def _kernels():
    global triton, tl  # a Triton kernel resolves its names (tl) in its module's globals
    import triton
    import triton.language as tl

    @h.autotune([triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((4, 1), (8, 1), (16, 2), (32, 4), (64, 4))],
                key=["q_rows", "k_rows"])
    @triton.jit
    def rope(q_pe, k_pe, positions, cos_sin, q_rows, k_rows, heads, q_s0, q_s1, k_s0, cs_s0,
             HALF: tl.constexpr, BLOCK: tl.constexpr):
        # In place, GPT-J pairs (2i, 2i + 1): BLOCK rows of q_pe ((token, head) rows), then of k_pe.
        pid = tl.program_id(0)
        q_programs = tl.cdiv(q_rows, BLOCK)
        if pid < q_programs:
            rows = pid * BLOCK + tl.arange(0, BLOCK)
            token = rows // heads
            row = q_pe + token.to(tl.int64) * q_s0 + (rows % heads).to(tl.int64) * q_s1
            valid = rows < q_rows
        else:
            rows = (pid - q_programs) * BLOCK + tl.arange(0, BLOCK)
            token = rows
            row = k_pe + token.to(tl.int64) * k_s0
            valid = rows < k_rows
        pos = tl.load(positions + token, mask=valid, other=0)
        cs = cos_sin + pos[:, None] * cs_s0 + tl.arange(0, HALF)[None, :]
        c = tl.load(cs, mask=valid[:, None], other=0.0)
        s = tl.load(cs + HALF, mask=valid[:, None], other=0.0)
        at = row[:, None] + tl.arange(0, 2 * HALF)[None, :]
        a, b = tl.split(tl.reshape(tl.load(at, mask=valid[:, None]).to(tl.float32), (BLOCK, HALF, 2)))
        y = tl.reshape(tl.join(a * c - b * s, b * c + a * s), (BLOCK, 2 * HALF))
        tl.store(at, y.to(q_pe.dtype.element_ty), mask=valid[:, None])

    @h.autotune([triton.Config({"BLOCK_T": b}, num_warps=w) for b, w in ((2, 1), (4, 1), (16, 2), (64, 4))],
                key=["tokens"])
    @triton.jit
    def cache_write(kv_c, k_pe, cache, slots, scale, tokens, kv_s0, k_s0, c_s0, c_s1, block_size,
                    KV_DIM: tl.constexpr, ROPE_DIM: tl.constexpr, FP8: tl.constexpr, BLOCK_T: tl.constexpr):
        # Row [kv_c | k_pe] of BLOCK_T tokens to cache row slot (none for a negative slot), a column
        # chunk of ROPE_DIM a program: kv_c's chunks, then k_pe. fp8: vLLM's division by the scale,
        # saturated to e4m3fn's finite range, NaN kept.
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        chunk = tl.program_id(1)
        col = tl.arange(0, ROPE_DIM)
        slot = tl.load(slots + t, mask=t < tokens, other=-1)
        ok = (slot >= 0)[:, None]
        if chunk * ROPE_DIM < KV_DIM:
            src = kv_c + t.to(tl.int64)[:, None] * kv_s0 + (chunk * ROPE_DIM + col)[None, :]
        else:
            src = k_pe + t.to(tl.int64)[:, None] * k_s0 + col[None, :]
        v = tl.load(src, mask=ok)
        if FP8:
            f = v.to(tl.float32)
            f = tl.math.div_rn(f, tl.load(scale + tl.zeros(f.shape, tl.int32)))  # div_rn does not broadcast
            f = tl.where(f != f, f, tl.minimum(tl.maximum(f, -448.0), 448.0))
            v = f.to(cache.dtype.element_ty)
        dst = cache + (slot // block_size)[:, None] * c_s0 + (slot % block_size)[:, None] * c_s1
        tl.store(dst + (chunk * ROPE_DIM + col)[None, :], v, mask=ok)
    return rope, cache_write


# ---------------------------------------------------------------------------------------- the rows


def case(variant, dtype, heads, tokens, device, pair, rows: list) -> list[h.Contender]:
    k_side, fp8 = VARIANTS[variant]
    x = inputs(dtype, heads, tokens, device, k_side, fp8)
    rows.append(x)
    saved = {t: t.clone() for t in (x.bmm_out, x.q, x.latent, x.kv_cache)}
    ours, seq = fused(x, x.ql_nope), unfused(x)
    if device.type == "cuda":
        seq()  # the first call of a Triton kernel tunes it, running it many times: before the gate
    out = [h.Contender("fused", ours, gate(x, saved, ours)), h.Contender("unfused", seq, gate(x, saved, seq))]
    n_read = tokens * heads * (NOPE + ROPE) + tokens * ROPE * 2  # ql_nope, q_pe; cos/sin rows: float32
    n_write = tokens * heads * (NOPE + ROPE)
    if k_side:
        n_read, n_write = n_read + tokens * (NOPE + ROPE), n_write + tokens * (NOPE + ROPE)
    out += h.ceilings(n_read, n_write, device, torch.int8 if fp8 else torch.int16)
    if not pair:
        return out
    # The producer of ql_nope: bmm(q_nope [H, T, 128] (the view of the projection), W_UK [H, 128, 512]),
    # into q_out's nope half (the op then leaves it) or into its own buffer (the op copies it).
    q_nope = x.q[..., :Q_NOPE].transpose(0, 1)
    w_uk = (torch.randn(heads, Q_NOPE, NOPE, device=device) / 16).to(dtype)
    q_out_nope = x.q_out[..., :NOPE]
    bmm_in_place = partial(torch.bmm, q_nope, w_uk, out=q_out_nope.transpose(0, 1))
    in_place = fused(x, q_out_nope)
    copy = partial(torch.bmm, q_nope, w_uk, out=x.bmm_out)

    def bmm_again():  # what the bmm writes, from the same call into a buffer of q_out's layout
        scratch = torch.empty_like(x.q_out)
        torch.bmm(q_nope, w_uk, out=scratch[..., :NOPE].transpose(0, 1))
        return scratch[..., :NOPE]
    pair_in_place, pair_copy = (lambda: (bmm_in_place(), in_place())), (lambda: (copy(), ours()))
    return out + [h.Contender(IN_PLACE, pair_in_place, gate(x, saved, pair_in_place, bmm_again)),
                  h.Contender(COPY, pair_copy, gate(x, saved, pair_copy))]


def main() -> int:
    p = h.parser(__doc__, None)
    p.add_argument("--variant", type=h.names(VARIANTS), default=",".join(VARIANTS),
                   help=f"comma list of {', '.join(VARIANTS)} (default: all)")
    args = p.parse_args()
    timing, cuda, tables, kind = h.kernel_timing(args), args.device.type == "cuda", [], args.device.type
    with torch.inference_mode():  # as engines call these inference-only ops
        for variant in args.variant:
            for dtype in args.dtype:
                for heads in args.heads or HEADS[kind]:
                    pair = cuda and not VARIANTS[variant][1]
                    derived, meaning = {}, []
                    if cuda:
                        derived["% of ceiling"] = lambda r: 100 * r[h.CEILING] / r["fused"]
                        meaning.append("% of ceiling: the fastest flat copy of the op's bytes over the fused op's "
                                       "time (100: at the ceiling)")
                    derived["unfused / fused"] = lambda r: r["unfused"] / r["fused"]
                    meaning.append("unfused / fused: the separate launches' time over the fused op's (above 1: "
                                   "fused is faster)")
                    if pair:
                        derived["in place / copy"] = lambda r: r[IN_PLACE] / r[COPY]
                        meaning.append("in place / copy: [bmm into q_out's nope half, the op writing the rest] "
                                       "over [bmm into its own buffer, the op copying it] (below 1: letting the "
                                       "bmm write q_out is faster)")
                    table = h.Table(f"concat_mla_rope, {dtype} {TITLES[variant]}, {heads} heads", "tokens", derived,
                                    "; ".join(meaning), timing)
                    for n in args.tokens or TOKENS[kind]:
                        rows: list[SimpleNamespace] = []
                        h.measure(table, n, partial(case, variant, h.DTYPES[dtype], heads, n, args.device, pair, rows),
                                  # Checked on random bits, timed on values like a model's: a CPU float
                                  # conversion slows down on the NaNs, infs and subnormals of random bits.
                                  lambda: [t.copy_(torch.randn(t.shape, device=t.device))
                                           for x in rows for t in (x.bmm_out, x.q, x.latent)])
                    tables.append(table)
    return h.report("concat_mla_rope (us per call)", tables, args, f"concat_mla_rope_{kind}")


if __name__ == "__main__":
    sys.exit(main())
