"""CUDA-only promises, for every op: every vector width path (misaligned and strided views fall back
correctly) and every launch path, the current stream (side streams without a synchronizing call,
CUDA graphs that read inputs and the scale at replay, torch.compile's cudagraphs), more than 2^31
elements, offsets past 2^32 elements in a small output, and tensors on a GPU other than the current
one."""

from __future__ import annotations

import pytest
import torch

from mla_helpers import (
    ALIGNMENTS,
    HALF_DTYPES,
    LAUNCH_PATHS,
    OPS,
    OP_LIST,
    ROW_COUNTS,
    WIDTHS,
    assert_refused,
    assert_writes_reference,
    call_raw,
    poison,
    scalar,
    tokens_for,
    valid_args,
)
from vllm_mla_ops.testing import (
    bits,
    heads_major,
    inside_bigger,
    one_head,
    random_bits,
    split_of_wider,
)

pytestmark = pytest.mark.cuda

needs_2_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")

# (op, input dtype) of the width tests: both input dtypes for the ops that convert values (each
# dtype converts its own way), one for the copy, which moves bytes (the launch tests run both).
OP_DTYPES = [pytest.param(op, dtype.values[0], id=f"{op.id}-{dtype.id}") for op in OP_LIST
             for dtype in (HALF_DTYPES if op.scale is not None else HALF_DTYPES[1:])]


@pytest.mark.parametrize("elements", LAUNCH_PATHS)
@pytest.mark.parametrize("nope_dim, rope_dim", WIDTHS)
@pytest.mark.parametrize("nope_layout, pe_layout, out_layout", ALIGNMENTS)
@pytest.mark.parametrize("op, dtype", OP_DTYPES)
def test_misaligned_and_odd_widths_match_reference(op, dtype, nope_layout, pe_layout, out_layout, nope_dim, rope_dim,
                                                   elements):
    """Every pack width (16, 8, 4, 2 bytes, one element) that alignment and widths select, at a small
    and a large q_out."""
    heads = 128
    tokens = tokens_for(elements, heads, nope_dim + rope_dim)
    args = valid_args(op, "cuda", dtype=dtype, tokens=tokens, heads=heads, nope_dim=nope_dim, rope_dim=rope_dim,
                      layouts=(nope_layout, pe_layout, out_layout), scale=0.0037)
    assert_writes_reference(op, args)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("tokens, heads", ROW_COUNTS)
@pytest.mark.parametrize("case", ["decode", "k_side"])
@pytest.mark.parametrize("op", OPS)
def test_row_counts_match_reference(op, case, tokens, heads, dtype):
    """Every launch path and the boundaries between them (ROW_COUNTS), in the engines' layouts."""
    assert_writes_reference(op, valid_args(op, "cuda", case=case, dtype=dtype, tokens=tokens, heads=heads,
                                           scale=0.0037))


@pytest.mark.parametrize("pe_layout", [split_of_wider, one_head], ids=["pe-split", "pe-1-head"])
@pytest.mark.parametrize("op", OPS)
def test_cuda_graph_replays_with_new_inputs_and_scale(op, pe_layout):
    """Captured once; each replay reads the values now in the captured input buffers and, for the ops
    that quantize, the value the scale holds then (changed in place with fill_, alone on some
    replays), and writes q_out (re-poisoned before every replay) and nothing else."""
    dtype = torch.bfloat16
    args = valid_args(op, "cuda", dtype=dtype, tokens=64, heads=16, nope_dim=512, rope_dim=64, scale=1.0,
                      layouts=(heads_major, pe_layout, inside_bigger))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graphs recommends
        call_raw(op, args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call_raw(op, args)

    def replay(*_):
        graph.replay()
        torch.cuda.synchronize()

    for i, value in enumerate((0.0037, 100.0, 1.0, 1e-40, 1 / 448)):
        if op.scale is not None:
            args[op.scale].fill_(value)
        if i % 2 or op.scale is None:
            for name in ("ql_nope", "q_pe"):
                poison(args[name])
        poison(args[op.out])
        assert_writes_reference(op, args, call=replay)


@pytest.mark.parametrize("op", OPS)
def test_runs_on_the_current_stream_without_syncing(op):
    """With the default stream held busy, the op issued on a side stream has run once that stream is
    done (queued there, not on the default stream); for the ops that quantize, it used the scale
    value written just before it on that stream; and issuing it made no synchronizing call (the
    scale is not read on the host)."""
    args = valid_args(op, "cuda", case="decode", dtype=torch.float16, tokens=300, heads=16, scale=1.0)
    if op.scale is not None:
        expected = op.reference(dict(args, **{op.scale: scalar(0.0037, "cuda")}))[op.out].cpu()
    else:
        expected = op.reference(args)[op.out].cpu()
    landed = torch.empty(expected.shape, dtype=bits(expected).dtype, pin_memory=True)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(1 << 30)  # about half a second of GPU clock cycles, on the default stream
    with torch.cuda.stream(side):
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            torch.cuda._sleep(1 << 24)  # the side stream is busy too when the scale update is queued
            if op.scale is not None:
                args[op.scale].fill_(0.0037)
            call_raw(op, args)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        landed.copy_(bits(args[op.out]), non_blocking=True)
    side.synchronize()
    default_still_busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    op.compare(landed.view(expected.dtype), expected, "q_out")
    if not default_still_busy:  # e.g. under compute-sanitizer, where the side stream ran slower
        pytest.skip("inconclusive: the default stream finished first, so this run cannot tell the streams apart")


@pytest.mark.parametrize("op", OPS)
def test_compile_reduce_overhead_uses_cuda_graphs(op):
    """mode="reduce-overhead" of a function allocating q_out: no cudagraph skip, a steady-state call
    is a CUDA graph launch (seen by the profiler), and every call's output matches the reference for
    its fresh inputs."""
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile

    def fresh_args():
        return valid_args(op, "cuda", case="decode", tokens=32, heads=16, scale=0.0037)

    def inputs(args):
        return [t for name, t in args.items() if name != op.out]

    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = torch.compile(op.allocating(op.out_dtype(torch.bfloat16)), mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warm-up, recording, replay
            args = fresh_args()
            op.compare(compiled(*inputs(args)), op.reference(args)[op.out], "q_out")
        args = fresh_args()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            q_out = compiled(*inputs(args))
            torch.cuda.synchronize()
        op.compare(q_out, op.reference(args)[op.out], "q_out")
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
        assert "cudaGraphLaunch" in {event.name for event in prof.events()}
    finally:
        torch._dynamo.reset()


@pytest.mark.large
@pytest.mark.parametrize("op", OPS)
def test_more_than_2_pow_31_elements(op):
    """32768 tokens x 128 heads x 576: q_out has 2.4e9 elements, offsets past 2^31 (about 16 GB of
    tensors for the copy)."""
    tokens = 32768
    args = valid_args(op, "cuda", case="decode", tokens=tokens, heads=128, scale=0.0037)
    assert args[op.out].numel() > 2**31
    call_raw(op, args)
    for t in (0, 1, tokens // 2, tokens - 2, tokens - 1):
        row = {name: (a[t : t + 1] if a.dim() == 3 else a) for name, a in args.items()}
        op.compare(args[op.out][t : t + 1], op.reference(row)[op.out], f"token {t}")
    op.compare(args[op.out], op.reference(args)[op.out], "q_out")


@pytest.mark.large
@pytest.mark.parametrize("op", OPS)
def test_offsets_past_2_pow_32_elements_in_a_small_output(op):
    """Two tokens 2^32 elements apart in q_out's and ql_nope's storages (about 8.6 GB each for 16-bit
    elements) but only 1152 elements to write: offsets that do not fit 32 bits take 64-bit arithmetic
    however small the output, and nothing between the two tokens is written."""
    far = 2**32
    args = valid_args(op, "cuda", tokens=2, heads=1, nope_dim=512, rope_dim=64, scale=0.0037)
    args["ql_nope"] = random_bits((far + 512,), torch.bfloat16, "cuda").as_strided((2, 1, 512), (far, 512, 1))
    out_dtype = args[op.out].dtype
    args[op.out] = random_bits((far + 576,), out_dtype, "cuda").as_strided((2, 1, 576), (far, 576, 1))
    assert_writes_reference(op, args)


# ------------------------------------------------------------------------------- two GPUs


def _on_gpu_1(op, dtype=torch.float16) -> dict:
    return valid_args(op, "cuda:1", dtype=dtype, tokens=40, heads=16, nope_dim=512, rope_dim=64, scale=0.0037,
                      layouts=(heads_major, split_of_wider, inside_bigger))


@needs_2_gpus
@pytest.mark.parametrize("op", OPS)
def test_inputs_on_another_gpu(op):
    """Tensors on cuda:1 while cuda:0 is current: right result, current device unchanged, and nothing
    allocated on cuda:0."""
    torch.cuda.set_device(0)
    args = _on_gpu_1(op)
    torch.cuda.synchronize(1)
    allocated_on_0 = torch.cuda.memory_allocated(0)
    assert_writes_reference(op, args)
    assert torch.cuda.current_device() == 0
    assert torch.cuda.memory_allocated(0) == allocated_on_0


@needs_2_gpus
@pytest.mark.parametrize("op", OPS)
def test_cuda_graph_on_another_gpu(op):
    """A graph captured on a cuda:1 stream from tensors on cuda:1, while cuda:0 is the current device
    outside the capture: each replay writes the reference into q_out and nothing else, the current
    device stays cuda:0, nothing is allocated on cuda:0.

    The capture stream is given explicitly: torch.cuda.graph's default capture stream is created
    once per process, on the device of the process's first capture, which is cuda:0 when other
    graph tests ran first; capturing cuda:1 work on it records an empty graph."""
    torch.cuda.set_device(0)
    args = _on_gpu_1(op, torch.bfloat16)
    with torch.cuda.device(1):
        side = torch.cuda.Stream(device=1)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call_raw(op, args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        capture = torch.cuda.Stream(device=1)
        assert capture.device == torch.device("cuda:1")
        with torch.cuda.graph(graph, stream=capture):
            call_raw(op, args)
    for name in ("ql_nope", "q_pe", op.out):
        poison(args[name])

    def replay(*_):
        graph.replay()
        torch.cuda.synchronize(1)

    allocated_on_0 = torch.cuda.memory_allocated(0)
    assert_writes_reference(op, args, call=replay)
    assert torch.cuda.current_device() == 0
    assert torch.cuda.memory_allocated(0) == allocated_on_0


@needs_2_gpus
@pytest.mark.parametrize("op", OPS)
def test_side_stream_of_another_gpu(op):
    torch.cuda.set_device(0)
    args = _on_gpu_1(op)
    side = torch.cuda.Stream(device=1)

    def on_side_stream(op, a):
        side.wait_stream(torch.cuda.current_stream(1))
        with torch.cuda.stream(side):
            call_raw(op, a)
        side.synchronize()

    allocated_on_0 = torch.cuda.memory_allocated(0)
    assert_writes_reference(op, args, call=on_side_stream)
    assert torch.cuda.current_device() == 0
    assert torch.cuda.memory_allocated(0) == allocated_on_0


@needs_2_gpus
@pytest.mark.parametrize("op, which", [pytest.param(op, name, id=f"{op.id}-{name}") for op in OP_LIST
                                       for name in op.tensor_args if name != "ql_nope"])
def test_tensors_on_two_gpus_raise(op, which):
    args = valid_args(op, "cuda:0", dtype=torch.float16)
    args[which] = args[which].to("cuda:1")
    assert_refused(op, args, f"{op.name}: {which} must be on ql_nope's device cuda:0, got cuda:1")
