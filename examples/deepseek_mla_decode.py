#!/usr/bin/env python3
"""A DeepSeek-V3-shaped MLA decode layer whose query and key preparation is one call of
``vllm_mla_ops.concat_mla_rope``: how an inference engine calls the op, as running code, and the
same layer written with plain torch ops (rope, ``torch.cat``, an indexed cache write) to check it
against, bit for bit.

One decode step of one attention layer, in the absorbed-weight form engines run at decode
(T tokens, H heads; DeepSeek-V3: kv_lora_rank 512, qk_rope_head_dim 64, qk_nope_head_dim 128,
v_head_dim 128, 128 heads, 16 per rank at TP8):

    hidden [T, hidden]  --q_b_proj-->   q [T, H, 192] = [q_nope 128 | q_pe 64]   (views of one buffer)
    hidden [T, hidden]  --kv_a_proj-->  latent [T, 576] = [kv_c 512 | k_pe 64]   (views of one row)
    q_nope --bmm(W_UK)--> q_out[..., :512]     the bmm writes straight into the query buffer
    concat_mla_rope:      q_out[..., 512:] = rope(q_pe)
                          kv_cache.view(-1, 576)[slot_mapping[t]] = [kv_c | rope(k_pe)]
    attention over the paged cache: scores over all 576 columns, values = the 512 kv_c columns
    --bmm(W_UV)--> [T, H, 128] --o_proj--> [T, hidden]

``forward(..., fused=False)`` replaces the bmm-into-q_out and the op by what engines ran before
it: a bmm into its own tensor, RoPE in float32 torch ops, ``torch.cat`` for the query and an indexed
write of ``[kv_c | rope(k_pe)]`` into the cache. Projections, attention and output are the same
code in both paths, so any difference between them is the op's.

The weights are random (the hidden size is small; the attention geometry is DeepSeek-V3's), the
cache is paged with vLLM's layout ``[num_blocks, 64, 576]``, and attention is plain PyTorch.

    python examples/deepseek_mla_decode.py                    # 128 heads, 4 tokens, CUDA if present
    python examples/deepseek_mla_decode.py --heads 16 --kv-cache-dtype fp8

tests/test_deepseek_example.py checks the two paths bit for bit: eager, under torch.compile and in
a CUDA-graph replay with new positions and slots.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import vllm_mla_ops

KV_LORA_RANK = 512  # kv_c: the compressed latent every head attends over
QK_ROPE_HEAD_DIM = 64  # q_pe, k_pe
QK_NOPE_HEAD_DIM = 128  # q_nope, before its absorption into W_UK
V_HEAD_DIM = 128
BLOCK_SIZE = 64  # tokens per block of the paged cache
LATENT_DIM = KV_LORA_RANK + QK_ROPE_HEAD_DIM  # 576: one cache row, one query row
FP8 = torch.float8_e4m3fn


# ------------------------------------------------------------------ ops shared by both paths
# Two small custom ops. Under torch.compile each stays one opaque node: Inductor calls it as it
# is, so the compiled layer runs the same bmm into the same buffer, and the same attention
# arithmetic, as the eager one (engines hide their attention kernels from Dynamo the same way).


@torch.library.custom_op("mla_example::bmm_out", mutates_args=("out",))
def bmm_out(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``torch.bmm(a, b, out=out)``, ``out`` of any strides. Called directly, Dynamo refuses a
    non-contiguous ``out=`` ("Attempted to call op with non-contiguous `out=` tensor"); wrapped,
    the compiled graph passes ``out`` as a view of q_out's own buffer, with no copy."""
    torch.bmm(a, b, out=out)


@torch.library.custom_op("mla_example::paged_mla_attention", mutates_args=())
def paged_mla_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                        context_lens: torch.Tensor, softmax_scale: float,
                        k_scale: torch.Tensor | None) -> torch.Tensor:
    """MLA decode attention over a paged latent cache, in float32: token t attends to the first
    ``context_lens[t]`` rows of the blocks ``block_table[t]``; scores are ``q . [kv_c | k_pe]``
    over all 576 columns, the values are the kv_c columns. ``q`` [T, H, 576] ->
    ``[T, H, kv_lora_rank]`` in q's dtype. Fixed shapes and no host sync (CUDA-graph safe)."""
    if kv_cache.dtype == FP8:
        # Gathered as bytes: float8 has no CUDA index kernel in every torch release.
        latent = kv_cache.view(torch.uint8)[block_table].view(FP8).float() * k_scale
    else:
        latent = kv_cache[block_table].float()
    latent = latent.flatten(1, 2)  # [T, blocks_per_seq * block_size, 576]
    scores = torch.matmul(q.float(), latent.transpose(1, 2)) * softmax_scale  # [T, H, L]
    past_end = torch.arange(latent.shape[1], device=q.device) >= context_lens[:, None]
    scores = scores.masked_fill(past_end[:, None, :], float("-inf"))
    values = latent[..., : q.shape[-1] - QK_ROPE_HEAD_DIM]
    return torch.matmul(torch.softmax(scores, dim=-1), values).to(q.dtype)


@paged_mla_attention.register_fake
def _(q, kv_cache, block_table, context_lens, softmax_scale, k_scale):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2] - QK_ROPE_HEAD_DIM)


# ------------------------------------------------------------------ the unfused reference path


def rope_gptj(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """``x`` ``[T, ..., rope_dim]`` rotated GPT-J style (pairs ``(x[2i], x[2i+1])``, DeepSeek's MLA
    rope): ``x' = x*c - y*s``, ``y' = y*c + x*s`` with ``c, s = cos_sin_cache[pos]`` halves, in
    float32 with each product its own torch op (rounded on its own), then one rounding to x's
    dtype. This is the arithmetic the op promises."""
    half = x.shape[-1] // 2
    cos_sin = cos_sin_cache[positions].float()
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos, sin = cos_sin[:, :half].view(shape), cos_sin[:, half:].view(shape)
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    even_out = even * cos - odd * sin
    odd_out = odd * cos + even * sin
    return torch.stack((even_out, odd_out), dim=-1).flatten(-2).to(x.dtype)


def write_kv_cache(rows: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   k_scale: torch.Tensor | None) -> None:
    """vLLM's ``concat_and_cache_mla`` in torch: ``rows`` [T, 576] into
    ``kv_cache.view(-1, 576)[slot_mapping[t]]``; a negative slot is padding and writes nothing. An
    fp8 cache gets ``float(x) / k_scale`` saturated to e4m3 (vLLM's "fp8" cache). The boolean
    mask costs a host sync: this path is the eager reference, not for CUDA graphs."""
    if k_scale is not None:
        rows = (rows.float() / k_scale).clamp(-448, 448).to(FP8)
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    if flat.dtype == FP8:  # written as bytes, as gathered in paged_mla_attention
        flat, rows = flat.view(torch.uint8), rows.view(torch.uint8)
    keep = slot_mapping >= 0
    flat[slot_mapping[keep]] = rows[keep]


# ------------------------------------------------------------------------------- the layer


def rope_cos_sin_cache(max_position: int, rope_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """``[max_position, rope_dim]`` float32: cos in the first half of a row, sin in the second
    (vLLM's layout). DeepSeek-V3 adds YaRN scaling; the op does not care how the table was made."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


class DeepseekMLADecode(nn.Module):
    """One MLA attention layer at decode, absorbed weights, random initialization.

    ``kv_cache_dtype``: ``"auto"`` (the model dtype) or ``"fp8"`` (float8_e4m3fn with a per-tensor
    ``k_scale``, vLLM's "fp8" cache)."""

    def __init__(self, num_heads: int = 128, hidden_size: int = 256, kv_cache_dtype: str = "auto",
                 max_position: int = 4096, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
        super().__init__()
        if kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'fp8', got {kv_cache_dtype!r}")
        self.num_heads = num_heads
        self.dtype = dtype
        self.kv_cache_dtype = FP8 if kv_cache_dtype == "fp8" else dtype
        self.softmax_scale = (QK_NOPE_HEAD_DIM + QK_ROPE_HEAD_DIM) ** -0.5
        linear = dict(bias=False, dtype=dtype, device=device)
        # The q_a_proj / q_a_layernorm stage of DeepSeek-V3 is left out: q_b_proj reads hidden directly.
        self.q_b_proj = nn.Linear(hidden_size, num_heads * (QK_NOPE_HEAD_DIM + QK_ROPE_HEAD_DIM), **linear)
        self.kv_a_proj = nn.Linear(hidden_size, LATENT_DIM, **linear)  # kv_a_proj_with_mqa; no kv_a_layernorm
        kv_b_proj = nn.Linear(KV_LORA_RANK, num_heads * (QK_NOPE_HEAD_DIM + V_HEAD_DIM), **linear)
        self.o_proj = nn.Linear(num_heads * V_HEAD_DIM, hidden_size, **linear)
        # Absorbed weights, as vLLM derives them from kv_b_proj after loading.
        w_uk, w_uv = kv_b_proj.weight.T.view(KV_LORA_RANK, num_heads, -1).split([QK_NOPE_HEAD_DIM, V_HEAD_DIM], -1)
        self.register_buffer("W_UK_T", w_uk.permute(1, 2, 0).contiguous())  # [H, 128, 512]
        self.register_buffer("W_UV", w_uv.transpose(0, 1).contiguous())  # [H, 512, 128]
        self.register_buffer("cos_sin_cache", rope_cos_sin_cache(max_position, QK_ROPE_HEAD_DIM).to(device))
        # One float32 element read on the device, so a calibrated scale can change between replays.
        k_scale = torch.tensor([0.02], device=device) if self.kv_cache_dtype == FP8 else None
        self.register_buffer("k_scale", k_scale)
        self.requires_grad_(False)

    def random_kv_cache(self, num_blocks: int) -> torch.Tensor:
        """``[num_blocks, 64, 576]`` holding random rows, as if earlier steps had written them."""
        rows = torch.randn(num_blocks, BLOCK_SIZE, LATENT_DIM, device=self.cos_sin_cache.device)
        if self.kv_cache_dtype == FP8:
            return (rows / self.k_scale).clamp(-448, 448).to(FP8)
        return rows.to(self.dtype)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                block_table: torch.Tensor, context_lens: torch.Tensor, kv_cache: torch.Tensor,
                *, fused: bool = True) -> torch.Tensor:
        """``hidden`` [T, hidden_size] -> [T, hidden_size]; writes token t's latent row to
        ``kv_cache`` at ``slot_mapping[t]`` and attends over its sequence's cached rows."""
        tokens, heads = hidden.shape[0], self.num_heads
        q = self.q_b_proj(hidden).view(tokens, heads, QK_NOPE_HEAD_DIM + QK_ROPE_HEAD_DIM)
        q_nope, q_pe = q.split([QK_NOPE_HEAD_DIM, QK_ROPE_HEAD_DIM], dim=-1)  # q_pe: head stride 192
        kv_c, k_pe = self.kv_a_proj(hidden).split([KV_LORA_RANK, QK_ROPE_HEAD_DIM], dim=-1)

        prepare = self.prepare_qk_fused if fused else self.prepare_qk_unfused
        q_out = prepare(q_nope, q_pe, kv_c, k_pe, positions, slot_mapping, kv_cache)

        attn = paged_mla_attention(q_out, kv_cache, block_table, context_lens, self.softmax_scale, self.k_scale)
        out = hidden.new_empty(tokens, heads, V_HEAD_DIM)
        bmm_out(attn.transpose(0, 1), self.W_UV, out.transpose(0, 1))
        return self.o_proj(out.view(tokens, heads * V_HEAD_DIM))

    def prepare_qk_fused(self, q_nope, q_pe, kv_c, k_pe, positions, slot_mapping, kv_cache) -> torch.Tensor:
        """The engine's path: the bmm writes ``q_out[..., :512]``, then one kernel rotates q_pe and
        k_pe, writes ``q_out[..., 512:]`` and the cache rows."""
        tokens, heads = q_nope.shape[:2]
        # Engines keep q_out in a persistent workspace; inside a CUDA graph this allocation comes
        # from the graph's pool, at the same address on every replay.
        q_out = q_nope.new_empty(tokens, heads, LATENT_DIM)
        ql_nope = q_out[..., :KV_LORA_RANK]
        # [H, T, 128] @ [H, 128, 512] into [H, T, 512] with strides (576, H*576, 1): torch.bmm
        # takes this strided out= on CPU and CUDA (there one cuBLAS call with a row pitch of 576,
        # no copy), so the nope half is never copied.
        bmm_out(q_nope.transpose(0, 1), self.W_UK_T, ql_nope.transpose(0, 1))
        # ql_nope is exactly out[..., :512], so the op writes only the rope half of q_out.
        vllm_mla_ops.concat_mla_rope(ql_nope, q_pe, positions, self.cos_sin_cache, is_neox=False, out=q_out,
                                     kv_c=kv_c, k_pe=k_pe, kv_cache=kv_cache, slot_mapping=slot_mapping,
                                     k_scale=self.k_scale)
        return q_out

    def prepare_qk_unfused(self, q_nope, q_pe, kv_c, k_pe, positions, slot_mapping, kv_cache) -> torch.Tensor:
        """What engines ran before the op: bmm, RoPE on q_pe and k_pe, ``torch.cat`` for the query,
        and the cache write of ``[kv_c | rope(k_pe)]``."""
        ql_nope = torch.bmm(q_nope.transpose(0, 1), self.W_UK_T).transpose(0, 1)  # [T, H, 512]
        return self.rope_concat_and_cache(ql_nope, q_pe, kv_c, k_pe, positions, slot_mapping, kv_cache)

    def rope_concat_and_cache(self, ql_nope, q_pe, kv_c, k_pe, positions, slot_mapping, kv_cache) -> torch.Tensor:
        """What one call of concat_mla_rope replaces: RoPE of q_pe and k_pe, the query concat and
        the cache write, in torch ops."""
        q_out = torch.cat((ql_nope, rope_gptj(q_pe, positions, self.cos_sin_cache)), dim=-1)
        rows = torch.cat((kv_c, rope_gptj(k_pe, positions, self.cos_sin_cache)), dim=-1)
        write_kv_cache(rows, kv_cache, slot_mapping, self.k_scale)
        return q_out


def decode_batch(num_seqs: int, num_blocks: int, blocks_per_seq: int, num_padding: int = 0,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """One decode step's metadata, as an engine builds it: sequence i owns the blocks
    ``block_table[i]`` (no block shared by two sequences) and holds ``context_lens[i]`` tokens,
    the one decoded now included, at ``positions[i] = context_lens[i] - 1``, cached at
    ``slot_mapping[i] = block_table[i, pos // 64] * 64 + pos % 64``. Padding tokens (a CUDA graph
    runs a fixed batch size) have slot -1, position 0 and context length 1."""
    assert num_seqs * blocks_per_seq <= num_blocks, "not enough cache blocks for the batch"
    block_table = torch.randperm(num_blocks)[: num_seqs * blocks_per_seq].view(num_seqs, blocks_per_seq)
    context_lens = torch.randint(1, blocks_per_seq * BLOCK_SIZE + 1, (num_seqs,))
    positions = context_lens - 1
    block = block_table.gather(1, (positions // BLOCK_SIZE)[:, None]).squeeze(1)
    slot_mapping = block * BLOCK_SIZE + positions % BLOCK_SIZE
    pad = num_padding
    batch = dict(
        positions=torch.cat((positions, positions.new_zeros(pad))),
        slot_mapping=torch.cat((slot_mapping, slot_mapping.new_full((pad,), -1))),
        block_table=torch.cat((block_table, block_table[:1].expand(pad, -1))).to(torch.int32),
        context_lens=torch.cat((context_lens, context_lens.new_ones(pad))).to(torch.int32),
    )
    return {name: t.to(device) for name, t in batch.items()}


# ------------------------------------------------------------------------------------ script


def main() -> int:
    """Runs both paths on one decode step; 0 when they agree bit for bit, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=128, help="attention heads (128: DeepSeek-V3; 16: TP8)")
    parser.add_argument("--seqs", type=int, default=3, help="sequences decoding one token each")
    parser.add_argument("--padding", type=int, default=1, help="padding tokens (slot -1) after the sequences")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--blocks-per-seq", type=int, default=4, help="cache blocks of 64 tokens per sequence")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing of the two paths")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    layer = DeepseekMLADecode(args.heads, args.hidden_size, args.kv_cache_dtype,
                              max_position=max(4096, args.blocks_per_seq * BLOCK_SIZE), device=device)
    num_blocks = args.seqs * args.blocks_per_seq + 2
    batch = decode_batch(args.seqs, num_blocks, args.blocks_per_seq, args.padding, device)
    hidden = torch.randn(args.seqs + args.padding, args.hidden_size, dtype=layer.dtype, device=device)
    cache = layer.random_kv_cache(num_blocks)
    cache_fused, cache_unfused = cache.clone(), cache.clone()

    with torch.inference_mode():
        out_fused = layer(hidden, **batch, kv_cache=cache_fused, fused=True)
        out_unfused = layer(hidden, **batch, kv_cache=cache_unfused, fused=False)

    def same_bits(a, b):
        return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))

    if layer.kv_cache_dtype == FP8:
        cache_kind = f"fp8 e4m3, k_scale {layer.k_scale.item():g}"
    else:
        cache_kind = str(layer.dtype).removeprefix("torch.")
    max_diff = (out_fused.float() - out_unfused.float()).abs().max().item()
    rows_written = int((cache_fused.view(torch.uint8) != cache.view(torch.uint8)).any(-1).sum())
    print(f"DeepSeek-V3 MLA decode layer on {device}: {args.heads} heads, hidden {args.hidden_size}, "
          f"{args.seqs} sequences + {args.padding} padding token(s), paged cache {list(cache.shape)} ({cache_kind})")
    print(f"  fused vs unfused output {list(out_fused.shape)}: bit-identical {same_bits(out_fused, out_unfused)}, "
          f"max abs diff {max_diff:g}")
    print(f"  fused vs unfused kv cache: bit-identical {same_bits(cache_fused, cache_unfused)}; "
          f"rows written: {rows_written} (one per sequence; none for padding)")
    identical = same_bits(out_fused, out_unfused) and same_bits(cache_fused, cache_unfused)
    if identical and not args.no_timing:
        time_both_paths(layer, hidden, batch, cache_fused)
    return 0 if identical else 1


def time_both_paths(layer: DeepseekMLADecode, hidden: torch.Tensor, batch: dict, kv_cache: torch.Tensor) -> None:
    """Median eager time of what the op replaces and of the whole layer, fused and unfused."""
    import logging

    # torch.utils.benchmark imports torch's extension builder, which warns on import when a CUDA
    # build of torch finds no CUDA runtime; the timer builds no extension.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    tokens, heads = hidden.shape[0], layer.num_heads
    positions, slot_mapping = batch["positions"], batch["slot_mapping"]
    with torch.inference_mode():
        q = layer.q_b_proj(hidden).view(tokens, heads, QK_NOPE_HEAD_DIM + QK_ROPE_HEAD_DIM)
        q_nope, q_pe = q.split([QK_NOPE_HEAD_DIM, QK_ROPE_HEAD_DIM], dim=-1)
        kv_c, k_pe = layer.kv_a_proj(hidden).split([KV_LORA_RANK, QK_ROPE_HEAD_DIM], dim=-1)
        q_out = layer.prepare_qk_fused(q_nope, q_pe, kv_c, k_pe, positions, slot_mapping, kv_cache)
        ql_nope = q_out[..., :KV_LORA_RANK]
        ql_nope_own = torch.bmm(q_nope.transpose(0, 1), layer.W_UK_T).transpose(0, 1)  # the unfused bmm's output
        cases = {
            "rope + query + cache write": (
                lambda: vllm_mla_ops.concat_mla_rope(ql_nope, q_pe, positions, layer.cos_sin_cache, out=q_out,
                                                     kv_c=kv_c, k_pe=k_pe, kv_cache=kv_cache,
                                                     slot_mapping=slot_mapping, k_scale=layer.k_scale),
                lambda: layer.rope_concat_and_cache(ql_nope_own, q_pe, kv_c, k_pe, positions, slot_mapping,
                                                    kv_cache)),
            "whole layer": (
                lambda: layer(hidden, **batch, kv_cache=kv_cache, fused=True),
                lambda: layer(hidden, **batch, kv_cache=kv_cache, fused=False)),
        }
        rows = []
        for name, calls in cases.items():
            times = [benchmark.Timer("call()", globals=dict(call=call)).blocked_autorange(min_run_time=0.5).median
                     for call in calls]
            rows.append((name, *(t * 1e6 for t in times)))
    print(f"  median eager time per call, us (torch.utils.benchmark, {hidden.device.type}; the unfused "
          f"path's cache write syncs with the host):")
    print(f"    {'':28} {'fused':>9} {'unfused':>9}")
    for name, fused_us, unfused_us in rows:
        print(f"    {name:28} {fused_us:9.1f} {unfused_us:9.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
