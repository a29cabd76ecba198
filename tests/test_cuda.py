"""CUDA-only promises: every vector width path (misaligned and strided views fall back correctly), the
current stream (side streams, CUDA graphs, torch.compile's cudagraphs), more than 2^31 elements, offsets
past 2^32 elements in a small output, and inputs on a GPU other than the current one."""

from __future__ import annotations

import pytest
import torch

from mla_helpers import (
    ALIGNMENTS,
    HALF_DTYPES,
    LAUNCH_PATHS,
    ROW_COUNTS,
    WIDTHS,
    check_rejected,
    check_writes_reference,
    scalar,
    tokens_for,
)
from vllm_mla_ops.testing import (
    assert_bitwise_equal,
    bits,
    engine_inputs,
    heads_major,
    inside_bigger,
    one_head,
    random_bits,
    reference,
    split_of_wider,
)

pytestmark = pytest.mark.cuda

needs_2_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@pytest.mark.parametrize("elements", LAUNCH_PATHS)
@pytest.mark.parametrize("nope_dim, rope_dim", WIDTHS)
@pytest.mark.parametrize("nope_layout, pe_layout, out_layout", ALIGNMENTS)
def test_misaligned_and_odd_widths_match_cat(nope_layout, pe_layout, out_layout, nope_dim, rope_dim, elements):
    """Every pack width (16, 8, 4, 2 bytes, one element) that alignment and widths select, at a small
    and a large q_out. One dtype: the copy moves bytes, so fp16 and bf16 differ only in the launch tests."""
    dtype, heads = torch.bfloat16, 128
    tokens = tokens_for(elements, heads, nope_dim + rope_dim)
    ql_nope = nope_layout((tokens, heads, nope_dim), dtype, "cuda")
    q_pe = pe_layout((tokens, heads, rope_dim), dtype, "cuda")
    q_out = out_layout((tokens, heads, nope_dim + rope_dim), dtype, "cuda")
    check_writes_reference(ql_nope, q_pe, q_out)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("tokens, heads", ROW_COUNTS)
@pytest.mark.parametrize("case", ["decode", "k_side"])
def test_row_counts_match_cat(case, tokens, heads, dtype):
    """Every launch path and the boundaries between them (ROW_COUNTS), in the engines' layouts."""
    check_writes_reference(*engine_inputs(case, tokens, heads, dtype, "cuda"))


@pytest.mark.parametrize("pe_layout", [split_of_wider, one_head], ids=["pe-split", "pe-1-head"])
def test_cuda_graph_replays_with_new_inputs(pe_layout):
    """Captured once; each replay reads the values now in the captured input buffers and writes q_out
    (re-poisoned before every replay) and nothing else."""
    tokens, heads, dtype = 64, 16, torch.bfloat16
    ql_nope = heads_major((tokens, heads, 512), dtype, "cuda")
    q_pe = pe_layout((tokens, heads, 64), dtype, "cuda")
    q_out = inside_bigger((tokens, heads, 576), dtype, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graphs recommends
        torch.ops._C.concat_mla_q(ql_nope, q_pe, q_out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops._C.concat_mla_q(ql_nope, q_pe, q_out)

    def replay(*_):
        graph.replay()
        torch.cuda.synchronize()

    for _ in range(3):
        ql_nope.copy_(random_bits(ql_nope.shape, dtype, "cuda"))
        q_pe.copy_(random_bits(q_pe.shape, dtype, "cuda"))
        q_out.copy_(random_bits(q_out.shape, dtype, "cuda"))
        check_writes_reference(ql_nope, q_pe, q_out, call=replay)


def test_runs_on_the_current_stream():
    """With the default stream held busy by a long kernel, the op issued on a side stream has run
    once that side stream is done: it was queued on the side stream, not on the default one."""
    ql_nope, q_pe, q_out = engine_inputs("decode", 300, 16, torch.float16, "cuda")
    expected = reference(ql_nope, q_pe).cpu()
    landed = torch.empty(expected.shape, dtype=expected.dtype, pin_memory=True)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(1 << 30)  # about half a second of GPU clock cycles, on the default stream
    with torch.cuda.stream(side):
        torch.ops._C.concat_mla_q(ql_nope, q_pe, q_out)
        bits(landed).copy_(bits(q_out), non_blocking=True)
    side.synchronize()
    default_still_busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert_bitwise_equal(landed, expected)
    if not default_still_busy:  # e.g. under compute-sanitizer, where the side stream ran slower
        pytest.skip("inconclusive: the default stream finished first, so this run cannot tell the streams apart")


def _build_query(ql_nope, q_pe):
    q_out = torch.empty(ql_nope.shape[0], ql_nope.shape[1], ql_nope.shape[2] + q_pe.shape[2],
                        dtype=ql_nope.dtype, device=ql_nope.device)
    torch.ops._C.concat_mla_q(ql_nope, q_pe, q_out)
    return q_out


def test_compile_reduce_overhead_uses_cuda_graphs():
    """mode="reduce-overhead": no cudagraph skip, a steady-state call is a CUDA graph launch (seen by
    the profiler), and every call's output matches torch.cat for its fresh inputs."""
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile

    def fresh_inputs():
        return heads_major((32, 16, 512), torch.bfloat16, "cuda"), split_of_wider((32, 16, 64), torch.bfloat16, "cuda")

    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = torch.compile(_build_query, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warm-up, recording, replay
            ql_nope, q_pe = fresh_inputs()
            assert_bitwise_equal(compiled(ql_nope, q_pe), reference(ql_nope, q_pe))
        ql_nope, q_pe = fresh_inputs()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            q_out = compiled(ql_nope, q_pe)
            torch.cuda.synchronize()
        assert_bitwise_equal(q_out, reference(ql_nope, q_pe))
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
        assert "cudaGraphLaunch" in {event.name for event in prof.events()}
    finally:
        torch._dynamo.reset()


@pytest.mark.large
def test_more_than_2_pow_31_elements():
    """32768 tokens x 128 heads x 576: q_out has 2.4e9 elements, offsets past 2^31 (about 16 GB)."""
    tokens, heads, dtype = 32768, 128, torch.bfloat16
    ql_nope, q_pe, q_out = engine_inputs("decode", tokens, heads, dtype, "cuda")
    assert q_out.numel() > 2**31
    torch.ops._C.concat_mla_q(ql_nope, q_pe, q_out)
    for t in (0, 1, tokens // 2, tokens - 2, tokens - 1):
        assert_bitwise_equal(q_out[t], reference(ql_nope[t : t + 1], q_pe[t : t + 1])[0], f"token {t}")
    assert_bitwise_equal(q_out, reference(ql_nope, q_pe))


@pytest.mark.large
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_offsets_past_2_pow_32_elements_in_a_small_output(out_dtype):
    """Two tokens 2^32 elements apart in q_out's and ql_nope's storages (about 8.6 GB each) but only
    1152 elements to write: offsets that do not fit 32 bits take 64-bit arithmetic however small the
    output, and nothing between the two tokens is written."""
    dtype, far = torch.bfloat16, 2**32
    ql_nope = random_bits((far + 512,), dtype, "cuda").as_strided((2, 1, 512), (far, 512, 1))
    q_pe = random_bits((2, 1, 64), dtype, "cuda")
    q_out = random_bits((far + 576,), out_dtype, "cuda").as_strided((2, 1, 576), (far, 576, 1))
    check_writes_reference(ql_nope, q_pe, q_out, None if out_dtype == dtype else scalar(0.0037, "cuda"))


# ------------------------------------------------------------------------------- two GPUs


def _on_gpu_1(dtype=torch.float16):
    return (heads_major((40, 16, 512), dtype, "cuda:1"), split_of_wider((40, 16, 64), dtype, "cuda:1"),
            inside_bigger((40, 16, 576), dtype, "cuda:1"))


@needs_2_gpus
def test_inputs_on_another_gpu():
    """Inputs on cuda:1 while cuda:0 is current: right result, current device unchanged, and nothing
    allocated on cuda:0."""
    torch.cuda.set_device(0)
    args = _on_gpu_1()
    torch.cuda.synchronize(1)
    allocated_on_0 = torch.cuda.memory_allocated(0)
    check_writes_reference(*args)
    assert torch.cuda.current_device() == 0
    assert torch.cuda.memory_allocated(0) == allocated_on_0


@needs_2_gpus
def test_cuda_graph_on_another_gpu():
    """A graph captured on a cuda:1 stream from tensors on cuda:1, while cuda:0 is the current device
    outside the capture: each replay writes the reference into q_out and nothing else, the current
    device stays cuda:0, nothing is allocated on cuda:0.

    The capture stream is given explicitly: torch.cuda.graph's default capture stream is created
    once per process, on the device of the process's first capture, which is cuda:0 when other
    graph tests ran first; capturing cuda:1 work on it records an empty graph."""
    torch.cuda.set_device(0)
    args = _on_gpu_1(torch.bfloat16)
    with torch.cuda.device(1):
        side = torch.cuda.Stream(device=1)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.ops._C.concat_mla_q(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        capture = torch.cuda.Stream(device=1)
        assert capture.device == torch.device("cuda:1")
        with torch.cuda.graph(graph, stream=capture):
            torch.ops._C.concat_mla_q(*args)
    for t in args:
        t.copy_(random_bits(t.shape, t.dtype, "cuda:1"))

    def replay(*_):
        graph.replay()
        torch.cuda.synchronize(1)

    allocated_on_0 = torch.cuda.memory_allocated(0)
    check_writes_reference(*args, call=replay)
    assert torch.cuda.current_device() == 0
    assert torch.cuda.memory_allocated(0) == allocated_on_0


@needs_2_gpus
def test_side_stream_of_another_gpu():
    torch.cuda.set_device(0)
    args = _on_gpu_1()
    side = torch.cuda.Stream(device=1)

    def on_side_stream(*a):
        side.wait_stream(torch.cuda.current_stream(1))
        with torch.cuda.stream(side):
            torch.ops._C.concat_mla_q(*a)
        side.synchronize()

    allocated_on_0 = torch.cuda.memory_allocated(0)
    check_writes_reference(*args, call=on_side_stream)
    assert torch.cuda.current_device() == 0
    assert torch.cuda.memory_allocated(0) == allocated_on_0


@needs_2_gpus
@pytest.mark.parametrize("which", ["q_pe", "q_out"])
def test_tensors_on_two_gpus_raise(which):
    ql_nope, q_pe, q_out = (random_bits(s, torch.float16, "cuda:0") for s in ((3, 4, 8), (3, 4, 2), (3, 4, 10)))
    if which == "q_pe":
        q_pe = q_pe.to("cuda:1")
    else:
        q_out = q_out.to("cuda:1")
    check_rejected((ql_nope, q_pe, q_out), f"concat_mla_q: {which} must be on ql_nope's device cuda:0, got cuda:1")
