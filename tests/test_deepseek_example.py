"""concat_mla_rope inside a model: examples/deepseek_mla_decode.py's DeepSeek-V3-shaped MLA decode
layer computes, with the op, exactly what the same layer computes with RoPE, torch.cat and an
indexed cache write in plain torch ops: the layer's output and the whole paged KV cache, bit for
bit, for 128 heads (DeepSeek-V3) and 16 (its TP8 shard), eager, under torch.compile and in a
CUDA-graph replay with new positions and slots. Projections, attention and output projection are
the same code in both paths, so these tests are about the op."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.utils import run_and_get_code

from vllm_mla_ops.testing import assert_bitwise_equal

_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "deepseek_mla_decode.py"


def _load_example():
    """The example script as a module, loaded once (it registers two custom ops)."""
    name = "deepseek_mla_decode"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


example = _load_example()

HEADS = [pytest.param(128, id="128-heads"), pytest.param(16, id="16-heads-tp8")]
KV_CACHE_DTYPES = [pytest.param("auto", id="bf16-cache"), pytest.param("fp8", id="fp8-cache")]
HIDDEN_SIZE = 256
# 3 sequences and 1 padding token (slot -1): 4 tokens; 2 blocks of 64 rows per sequence, 8 blocks.
NUM_SEQS, NUM_PADDING, BLOCKS_PER_SEQ, NUM_BLOCKS = 3, 1, 2, 8


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _layer_and_cache(device, heads, kv_cache_dtype="auto"):
    layer = example.DeepseekMLADecode(heads, HIDDEN_SIZE, kv_cache_dtype, device=device)
    return layer, layer.random_kv_cache(NUM_BLOCKS)


def _decode_step(layer, device) -> dict[str, torch.Tensor]:
    """forward's inputs but the cache: hidden states and a fresh decode batch's metadata."""
    batch = example.decode_batch(NUM_SEQS, NUM_BLOCKS, BLOCKS_PER_SEQ, NUM_PADDING, device)
    hidden = torch.randn(NUM_SEQS + NUM_PADDING, HIDDEN_SIZE, dtype=layer.dtype, device=device)
    return dict(hidden=hidden, **batch)


def _unfused(layer, step, cache):
    """The eager unfused layer's output and cache, from a copy of ``cache``. It must write one row
    per sequence and produce finite outputs, or a comparison with it would prove little."""
    kv_cache = cache.clone()
    with torch.inference_mode():
        out = layer(**step, kv_cache=kv_cache, fused=False)
    rows_written = (kv_cache.view(torch.uint8) != cache.view(torch.uint8)).any(-1).sum()
    assert int(rows_written) == NUM_SEQS, "the unfused layer wrote no row for some sequence"
    assert bool(out.isfinite().all()), "the unfused layer's output is not finite"
    return out, kv_cache


def _assert_layer_equal(out, kv_cache, expected_out, expected_cache):
    assert_bitwise_equal(out, expected_out, "layer output")
    assert_bitwise_equal(kv_cache, expected_cache, "kv_cache")


@pytest.mark.parametrize("heads", HEADS)
def test_bmm_writes_q_out_nope_half_as_the_plain_bmm(device, heads):
    """The fused path's premise: torch.bmm with ``out=q_out[..., :512].transpose(0, 1)`` writes the
    bits of the plain bmm (as the unfused path computes it) into q_out's nope half and nothing into
    its rope half."""
    layer, _ = _layer_and_cache(device, heads)
    tokens = NUM_SEQS + NUM_PADDING
    q = torch.randn(tokens, heads, 192, dtype=layer.dtype, device=device)
    q_out = torch.randn(tokens, heads, 576, dtype=layer.dtype, device=device)
    rope_half = q_out[..., 512:].clone()
    with torch.inference_mode():
        example.bmm_out(q[..., :128].transpose(0, 1), layer.W_UK_T, q_out[..., :512].transpose(0, 1))
        plain = torch.bmm(q[..., :128].transpose(0, 1), layer.W_UK_T).transpose(0, 1)
    assert_bitwise_equal(q_out[..., :512], plain, "q_out[..., :512]")
    assert_bitwise_equal(q_out[..., 512:], rope_half, "q_out[..., 512:]")


@pytest.mark.parametrize("kv_cache_dtype", KV_CACHE_DTYPES)
@pytest.mark.parametrize("heads", HEADS)
def test_fused_layer_matches_unfused_bit_for_bit(device, heads, kv_cache_dtype):
    """Eager, inference mode: the query the attention reads, the layer's output and the whole
    cache (bf16, or fp8 with k_scale) of the fused layer equal the unfused layer's, bit for bit;
    the padding token writes no cache row."""
    layer, cache = _layer_and_cache(device, heads, kv_cache_dtype)
    step = _decode_step(layer, device)
    expected_out, expected_cache = _unfused(layer, step, cache)
    kv_cache = cache.clone()
    with torch.inference_mode():
        out = layer(**step, kv_cache=kv_cache, fused=True)
        tokens = step["hidden"].shape[0]
        q = layer.q_b_proj(step["hidden"]).view(tokens, heads, 192)
        kv_c, k_pe = layer.kv_a_proj(step["hidden"]).split([512, 64], dim=-1)
        qk = (q[..., :128], q[..., 128:], kv_c, k_pe, step["positions"], step["slot_mapping"])
        q_fused = layer.prepare_qk_fused(*qk, cache.clone())
        q_unfused = layer.prepare_qk_unfused(*qk, cache.clone())
    assert_bitwise_equal(q_fused, q_unfused, "q_out")
    _assert_layer_equal(out, kv_cache, expected_out, expected_cache)


@pytest.mark.parametrize("heads", HEADS)
def test_compiled_fused_layer_matches_eager_unfused_bit_for_bit(device, heads):
    """torch.compile(fullgraph=True) of the fused layer (Inductor; the op traced through its fake),
    called for two decode steps with different positions and slots: one graph serves both, and
    each step's output and the whole cache equal the eager unfused layer's, bit for bit."""
    layer, cache = _layer_and_cache(device, heads)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    for _ in range(2):
        step = _decode_step(layer, device)
        expected_out, expected_cache = _unfused(layer, step, cache)
        kv_cache = cache.clone()
        with torch.inference_mode():
            out = compiled(**step, kv_cache=kv_cache, fused=True)
        _assert_layer_equal(out, kv_cache, expected_out, expected_cache)
    assert counter.frame_count == 1


def _calls(body: str, op: str) -> list[list[str]]:
    """The argument expressions of every call of ``op`` in Inductor's generated code."""
    calls = []
    for match in re.finditer(re.escape(op) + r"\(", body):
        args, depth, current = [], 0, ""
        for ch in body[match.end():]:
            if ch == ")" and depth == 0:
                break
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                args, current = args + [current.strip()], ""
            else:
                current += ch
        calls.append(args + [current.strip()])
    return calls


def test_compiled_fused_layer_runs_the_op_in_place(device):
    """In Inductor's code for the fused layer (16 heads) the bmm writes the nope half of the buffer
    that the op then gets as q_out, the op's ql_nope is that same nope half (so the op writes only
    the rope half), the op writes the caller's cache itself, and nothing is copied afterwards."""
    heads, tokens = 16, NUM_SEQS + NUM_PADDING
    layer, cache = _layer_and_cache(device, heads)
    step = _decode_step(layer, device)
    with torch.inference_mode():
        _, codes = run_and_get_code(torch.compile(layer, fullgraph=True), **step, kv_cache=cache, fused=True)
    (code,) = codes
    body = code[code.index("def call("):]
    (rope_args,) = _calls(body, "torch.ops._C.concat_mla_rope.default")
    q_out, kv_cache = rope_args[5], rope_args[9]
    assert re.fullmatch(r"buf\d+", q_out), body
    nope_half = rf"reinterpret_tensor\({q_out}, \({tokens}, {heads}, 512\), \({heads * 576}, 576, 1\), 0\)"
    assert re.fullmatch(nope_half, rope_args[0]), body
    bmm_into_nope_half = rf"reinterpret_tensor\({q_out}, \({heads}, {tokens}, 512\), \(576, {heads * 576}, 1\), 0\)"
    bmm_outs = [args[2] for args in _calls(body, "torch.ops.mla_example.bmm_out.default")]
    assert any(re.fullmatch(bmm_into_nope_half, out) for out in bmm_outs), body
    assert re.fullmatch(r"arg\d+_1", kv_cache), body
    assert "copy_" not in body, body


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_cache_dtype", KV_CACHE_DTYPES)
@pytest.mark.parametrize("heads", HEADS)
def test_cuda_graph_replay_with_new_positions_and_slots_matches_eager_unfused(heads, kv_cache_dtype):
    """The fused layer captured once in a CUDA graph (warm-up on a side stream, static input
    buffers), then replayed after new hidden states, positions, slots, block tables and context
    lengths are copied into those buffers and the cache is reset: the replay's output and the whole
    cache equal the eager unfused layer's on the new inputs, bit for bit."""
    device = "cuda"
    layer, cache = _layer_and_cache(device, heads, kv_cache_dtype)
    captured_step = _decode_step(layer, device)
    static = {name: t.clone() for name, t in captured_step.items()}
    kv_cache = cache.clone()
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graphs recommends
            for _ in range(2):
                layer(**static, kv_cache=kv_cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = layer(**static, kv_cache=kv_cache)
    for _ in range(2):
        step = _decode_step(layer, device)
        assert not torch.equal(step["slot_mapping"], captured_step["slot_mapping"])
        assert not torch.equal(step["positions"], captured_step["positions"])
        for name, t in step.items():
            static[name].copy_(t)
        kv_cache.copy_(cache)
        graph.replay()
        torch.cuda.synchronize()
        expected_out, expected_cache = _unfused(layer, step, cache)
        _assert_layer_equal(static_out, kv_cache, expected_out, expected_cache)


def test_example_script_reports_bit_identical_paths(monkeypatch, capsys):
    """The script's ``main`` (``python examples/deepseek_mla_decode.py``), run in this process on the
    CPU with 16 heads, prints the fused and unfused layers' outputs and caches bit-identical and
    returns exit status 0."""
    monkeypatch.setattr(sys, "argv", [str(_EXAMPLE), "--heads", "16", "--device", "cpu", "--no-timing"])
    assert example.main() == 0
    printed = capsys.readouterr().out
    assert printed.count("bit-identical True") == 2, printed
