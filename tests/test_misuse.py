"""Misuse and hostile environments: what happens after an error, under autograd, from many threads,
over many calls, under torch.export, with a broken or mismatched build; and docs/errors.md kept in
step with the messages the code raises."""

from __future__ import annotations

import contextlib
import os
import threading

import pytest
import torch

import vllm_mla_ops
from mla_helpers import (
    ENTRY_POINTS,
    assert_storages,
    check_rejected,
    check_writes_reference,
    expect_reference,
    snapshot,
)
from vllm_mla_ops.testing import (
    assert_bitwise_equal,
    contiguous,
    engine_inputs,
    heads_major,
    inside_bigger,
    last_dim_stride_2,
    one_head,
    random_bits,
    reference,
    split_of_wider,
)

op = torch.ops._C.concat_mla_q.default


def _decode_args(device, dtype=torch.bfloat16, tokens=4, heads=16):
    return engine_inputs("decode", tokens, heads, dtype, device)


# --------------------------------------------------------------------- errors leave a usable process


def _bad_dtype(device):
    ql_nope, q_pe, q_out = _decode_args(device)
    return (ql_nope, q_pe.float(), q_out), "q_pe must have ql_nope's dtype torch.bfloat16, got torch.float32"


def _bad_shape(device):
    ql_nope, q_pe, _ = _decode_args(device)
    return (ql_nope, q_pe, random_bits((4, 16, 575), torch.bfloat16, device)), "q_out must be [tokens, heads"


def _overlap(device):
    ql_nope, _, q_out = _decode_args(device)
    return (ql_nope, q_out[..., 512:], q_out), "q_out must not overlap q_pe in memory"


def _mixed_devices(device):
    ql_nope, q_pe, q_out = _decode_args(device)
    return (ql_nope, q_pe.cpu(), q_out), "q_pe must be on ql_nope's device cuda:0, got cpu"


REJECTIONS = {"dtype": _bad_dtype, "shape": _bad_shape, "overlap": _overlap, "mixed-devices": _mixed_devices}


@pytest.mark.parametrize("rejection", list(REJECTIONS))
def test_process_stays_usable_after_a_rejected_call(device, rejection):
    """A rejected call is followed by valid calls that are bit-exact; on CUDA nothing is left
    behind (no sticky error: synchronize and an unrelated kernel succeed). Three rounds, so the
    state after a valid call following an error is covered too."""
    if rejection == "mixed-devices" and device != "cuda":
        pytest.skip("mixed devices need CUDA")
    for _ in range(3):
        args, message = REJECTIONS[rejection](device)
        check_rejected(args, message)
        check_writes_reference(*_decode_args(device))
        check_writes_reference(contiguous((3, 2, 8), torch.float16, device), one_head((3, 1, 8), torch.float16, device),
                               inside_bigger((3, 2, 16), torch.float16, device))
        if device == "cuda":
            torch.cuda.synchronize()
            assert torch.arange(1000, device=device).sum().item() == 499500


# -------------------------------------------------------------------------------------- threads

THREADS, CALLS_PER_THREAD = 8, 50


def _thread_problem(device, index: int):
    """Alternates a row-parallel size (tens of thousands of elements: at::parallel_for splits it on
    CPU) with small ones, over several layouts."""
    dtype = (torch.float16, torch.bfloat16)[index % 2]
    if index % 3 == 0:
        return (heads_major((32, 16, 512), dtype, device), split_of_wider((32, 16, 64), dtype, device),
                contiguous((32, 16, 576), dtype, device))
    if index % 3 == 1:
        return (last_dim_stride_2((5, 3, 24), dtype, device), one_head((5, 1, 8), dtype, device),
                inside_bigger((5, 3, 32), dtype, device))
    return (contiguous((2, 4, 512), dtype, device), contiguous((2, 4, 64), dtype, device),
            last_dim_stride_2((2, 4, 576), dtype, device))


def test_concurrent_calls_from_threads_are_bit_exact(device):
    """8 threads x 50 calls at once, each thread on its own tensors (on CUDA, its own stream):
    every result bit-exact, nothing outside q_out written. Each thread prepares all its problems,
    waits for the others, then calls back to back, so the calls overlap."""
    barrier = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            stream = torch.cuda.Stream() if device == "cuda" else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                problems = [_thread_problem(device, thread + i) for i in range(CALLS_PER_THREAD)]
                checks = [expect_reference(*args) for args in problems]
                barrier.wait(timeout=60)
                for args in problems:
                    op(*args)
                for check in checks:
                    check()
        except BaseException as error:  # noqa: BLE001  (re-raised in the main thread)
            barrier.abort()
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:  # the root cause, not the other threads' broken barrier
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


RSS_GROWTH_LIMIT = 8 << 20


@pytest.mark.parametrize("outcome, calls", [("accepted", 100_000), ("rejected", 50_000)])
def test_many_calls_do_not_grow_memory(device, outcome, calls):
    """100k accepted calls (50k rejected ones: an error is slower) of 1 token x 2 heads x 8/8: host
    RSS grows by at most 8 MB between the first tenth and the end (a leak of ~100 bytes a call
    fails), and on CUDA the caching allocator holds exactly as much as before. Takes ~1 s on CPU."""
    ql_nope, q_pe = random_bits((1, 2, 8), torch.bfloat16, device), random_bits((1, 2, 8), torch.bfloat16, device)
    q_out = random_bits((1, 2, 16), torch.bfloat16, device)
    if outcome == "rejected":
        q_out = random_bits((1, 2, 15), torch.bfloat16, device)
    allocated = torch.cuda.memory_allocated() if device == "cuda" else 0
    warmup = calls // 10
    rss = 0
    for i in range(calls):
        if i == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            rss = _rss_bytes()
        try:
            op(ql_nope, q_pe, q_out)
        except RuntimeError:
            if outcome == "accepted":
                raise
        else:
            assert outcome == "accepted", "an invalid call was accepted"
    if device == "cuda":
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == allocated
    growth = _rss_bytes() - rss
    assert growth <= RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.1f} MiB over {calls - warmup} calls"
    if outcome == "accepted":
        assert_bitwise_equal(q_out, reference(ql_nope, q_pe))


# --------------------------------------------------------------------------------- torch.export


class _Allocating(torch.nn.Module):
    def forward(self, ql_nope, q_pe):
        q_out = ql_nope.new_empty(ql_nope.shape[0], ql_nope.shape[1], ql_nope.shape[2] + q_pe.shape[2])
        torch.ops._C.concat_mla_q(ql_nope, q_pe, q_out)
        return q_out


class _Filling(torch.nn.Module):
    def forward(self, ql_nope, q_pe, q_out):
        torch.ops._C.concat_mla_q(ql_nope, q_pe, q_out)
        return q_out


def test_export_of_a_module_allocating_q_out(device):
    """Exported with a dynamic token count; the exported module runs at the example's and at other
    token counts and matches eager (and torch.cat) bit for bit."""
    tokens = torch.export.Dim("tokens", min=2, max=4096)
    example = _decode_args(device, tokens=5)[:2]
    exported = torch.export.export(_Allocating(), example,
                                   dynamic_shapes={"ql_nope": {0: tokens}, "q_pe": {0: tokens}})
    assert "torch.ops._C.concat_mla_q.default" in str(exported.graph_module.code)
    module = exported.module()
    for count in (5, 2, 37):
        ql_nope, q_pe, _ = _decode_args(device, tokens=count)
        result = module(ql_nope, q_pe)
        assert_bitwise_equal(result, _Allocating()(ql_nope, q_pe), f"tokens={count}: exported vs eager")
        assert_bitwise_equal(result, reference(ql_nope, q_pe), f"tokens={count}: exported vs torch.cat")


def test_export_of_a_module_filling_a_given_q_out(device):
    """The module writes the caller's q_out (a view with gaps inside a bigger buffer) and returns
    it: the exported module leaves q_out with torch.cat's bits, the gaps untouched, and returns
    those bits too."""
    tokens = torch.export.Dim("tokens", min=2, max=4096)
    ql_nope, q_pe, _ = _decode_args(device, tokens=5)
    example = (ql_nope, q_pe, inside_bigger((5, 16, 576), torch.bfloat16, device))
    exported = torch.export.export(_Filling(), example, dynamic_shapes={
        "ql_nope": {0: tokens}, "q_pe": {0: tokens}, "q_out": {0: tokens}})
    module = exported.module()
    for count in (5, 3, 19):
        ql_nope, q_pe, _ = _decode_args(device, tokens=count)
        q_out = inside_bigger((count, 16, 576), torch.bfloat16, device)
        returned = check_writes_reference(ql_nope, q_pe, q_out, call=module)
        assert_bitwise_equal(returned, reference(ql_nope, q_pe), f"tokens={count}: returned")
