"""Misuse and hostile environments, for every op: what happens after a refused call, from many
threads, over many calls, and under torch.export. (After a refusal for autograd's sake, and loading
a broken or mismatched build: test_inference_only.py and test_loading.py.)"""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from mla_helpers import (
    OPS,
    assert_memory_stays_flat,
    assert_process_usable,
    assert_refused,
    assert_writes_reference,
    call_raw,
    expect_writes,
    valid_args,
)
from vllm_mla_ops.testing import (
    contiguous,
    heads_major,
    inside_bigger,
    last_dim_stride_2,
    one_head,
    split_of_wider,
)


def _decode_args(op, device, tokens=4):
    return valid_args(op, device, case="decode", tokens=tokens, heads=16)


# --------------------------------------------------------------------- errors leave a usable process


def _bad_dtype(op, device):
    args = _decode_args(op, device)
    args["q_pe"] = args["q_pe"].float()
    return args, f"{op.name}: q_pe must have ql_nope's dtype torch.bfloat16, got torch.float32"


def _bad_shape(op, device):
    args = _decode_args(op, device)
    args["q_out"] = args["q_out"][..., 1:]
    return args, f"{op.name}: q_out must be [tokens, heads"


def _overlap(op, device):
    """q_pe is the last bytes of q_out's rows (q_out[..., 512:] where they share a dtype)."""
    args = _decode_args(op, device)
    q_pe = args["q_pe"]
    args["q_pe"] = args["q_out"].view(torch.uint8)[..., -64 * q_pe.element_size() :].view(q_pe.dtype)
    return args, f"{op.name}: q_out must not overlap q_pe in memory"


def _mixed_devices(op, device):
    args = _decode_args(op, device)
    args["q_pe"] = args["q_pe"].cpu()
    return args, f"{op.name}: q_pe must be on ql_nope's device cuda:0, got cpu"


REFUSALS = {"dtype": _bad_dtype, "shape": _bad_shape, "overlap": _overlap, "mixed-devices": _mixed_devices}


@pytest.mark.parametrize("refusal", list(REFUSALS))
@pytest.mark.parametrize("op", OPS)
def test_process_stays_usable_after_a_refused_call(device, op, refusal):
    """A refused call is followed by valid calls that are bit-exact, and on CUDA nothing is left
    behind (see assert_process_usable). Three rounds, so the state after a valid call following an
    error is covered too."""
    if refusal == "mixed-devices" and device != "cuda":
        pytest.skip("mixed devices need CUDA")
    for _ in range(3):
        args, message = REFUSALS[refusal](op, device)
        assert_refused(op, args, message)
        assert_process_usable(op, device)


# -------------------------------------------------------------------------------------- threads

THREADS, CALLS_PER_THREAD = 8, 50


def _thread_problem(op, device, index: int) -> dict:
    """Alternates a row-parallel size (tens of thousands of elements: at::parallel_for splits it on
    CPU) with small ones, over several layouts."""
    dtype = (torch.float16, torch.bfloat16)[index % 2]
    if index % 3 == 0:
        return valid_args(op, device, dtype=dtype, tokens=32, heads=16, nope_dim=512, rope_dim=64,
                          layouts=(heads_major, split_of_wider, contiguous))
    if index % 3 == 1:
        return valid_args(op, device, dtype=dtype, tokens=5, heads=3, nope_dim=24, rope_dim=8, pe_heads=1,
                          layouts=(last_dim_stride_2, one_head, inside_bigger))
    return valid_args(op, device, dtype=dtype, tokens=2, heads=4, nope_dim=512, rope_dim=64,
                      layouts=(contiguous, contiguous, last_dim_stride_2))


@pytest.mark.parametrize("op", OPS)
def test_concurrent_calls_from_threads_are_bit_exact(device, op):
    """8 threads x 50 calls at once, each thread on its own tensors (on CUDA, its own stream):
    every result bit-exact, nothing outside q_out written. Each thread prepares all its problems,
    waits for the others, then calls back to back, so the calls overlap."""
    barrier = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            stream = torch.cuda.Stream() if device == "cuda" else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                problems = [_thread_problem(op, device, thread + i) for i in range(CALLS_PER_THREAD)]
                checks = [expect_writes(op, args) for args in problems]
                barrier.wait(timeout=60)
                for args in problems:
                    call_raw(op, args)
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


@pytest.mark.parametrize("outcome, calls", [("accepted", 100_000), ("refused", 50_000)])
@pytest.mark.parametrize("op", OPS)
def test_many_calls_do_not_grow_memory(device, op, outcome, calls):
    """100k accepted calls (50k refused ones, for a q_out one column short: an error is slower) of
    1 token x 2 heads x 8/8: no host memory growth, no CUDA memory held (see
    assert_memory_stays_flat); the last accepted call's result is exact."""
    args = valid_args(op, device, tokens=1, heads=2, nope_dim=8, rope_dim=8)
    if outcome == "refused":
        args["q_out"] = args["q_out"][..., 1:]
    raw, values = op.raw, tuple(args.values())

    def one_call():
        try:
            raw(*values)
        except RuntimeError:
            if outcome == "accepted":
                raise
        else:
            assert outcome == "accepted", "an invalid call was accepted"

    assert_memory_stays_flat(device, calls, one_call)
    if outcome == "accepted":
        for name, value in op.reference(args).items():
            op.compare(args[name], value, name)


# --------------------------------------------------------------------------------- torch.export


class _Module(torch.nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, *args):
        return self.function(*args)


def _inputs(args: dict, op) -> dict:
    return {name: t for name, t in args.items() if name != op.out}


@pytest.mark.parametrize("op", OPS)
def test_export_of_a_module_allocating_q_out(device, op):
    """Exported with a dynamic token count; the exported module runs at the example's and at other
    token counts and matches eager (and the reference) bit for bit."""
    allocating = op.allocating(op.out_dtype(torch.bfloat16))
    tokens = torch.export.Dim("tokens", min=2, max=4096)
    example = _inputs(_decode_args(op, device, tokens=5), op)
    dynamic = [{0: tokens} if t.dim() == 3 else None for t in example.values()]
    exported = torch.export.export(_Module(allocating), tuple(example.values()), dynamic_shapes=(tuple(dynamic),))
    assert f"torch.ops._C.{op.name}.default" in str(exported.graph_module.code)
    module = exported.module()
    for count in (5, 2, 37):
        args = _decode_args(op, device, tokens=count)
        inputs = tuple(_inputs(args, op).values())
        result = module(*inputs)
        op.compare(result, allocating(*inputs), f"tokens={count}: exported vs eager")
        op.compare(result, op.reference(args)[op.out], f"tokens={count}: exported vs reference")


@pytest.mark.parametrize("op", OPS)
def test_export_of_a_module_filling_a_given_q_out(device, op):
    """The module writes the caller's q_out (a view with gaps inside a bigger buffer) and returns
    it: the exported module leaves q_out with the reference's bits, the gaps untouched, and returns
    those bits too."""
    def padded(count):
        args = _decode_args(op, device, tokens=count)
        args["q_out"] = inside_bigger(args["q_out"].shape, args["q_out"].dtype, device)
        return args

    tokens = torch.export.Dim("tokens", min=2, max=4096)
    example = padded(5)
    dynamic = [{0: tokens} if t.dim() == 3 else None for t in example.values()]
    exported = torch.export.export(_Module(op.filling()), tuple(example.values()), dynamic_shapes=(tuple(dynamic),))
    module = exported.module()
    for count in (5, 3, 19):
        args = padded(count)
        returned = assert_writes_reference(op, args, call=lambda op, a: module(*a.values()))
        op.compare(returned, op.reference(args)[op.out], f"tokens={count}: returned")
