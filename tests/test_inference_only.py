"""The ops' inference-only contract, for every op: in grad mode an argument that requires grad is
refused (eager, and compiled: an error, never a wrong gradient), under no_grad and inference_mode it
is accepted; an inference q_out is written inside inference mode and under no_grad, refused in grad
mode; a call in grad mode counts as an in-place write of q_out (its version goes up), a call outside
it does not; a refused call leaves a usable process and no leak; and outside grad mode an eager call
runs no Python below the op's own call (docs/design.md, "Host path")."""

from __future__ import annotations

import sys

import pytest
import torch

from mla_helpers import (
    CALLS,
    OPS,
    assert_memory_stays_flat,
    assert_process_usable,
    assert_refused,
    assert_storages,
    assert_writes_reference,
    call_raw,
    snapshot,
    valid_args,
)
from vllm_mla_ops.testing import random_bits

INFERENCE_ONLY = "{op} is inference-only (no autograd formula): got {arg} with requires_grad=True"
INFERENCE_OUT = ("{op}: q_out is an inference tensor (created under torch.inference_mode()) and cannot be "
                 "written outside inference mode; call the op under torch.inference_mode() or pass a q_out "
                 "created outside it")


def _decode_args(op, device):
    return valid_args(op, device, case="decode", tokens=4, heads=16)


# ------------------------------------------------------------------------------------- autograd


def _with_grad(op, device, which: str) -> dict:
    """Decode-layout arguments with `which` requiring grad: a leaf, or (the `-view` forms) a view
    of a leaf, which autograd treats differently for in-place writes."""
    args = _decode_args(op, device)
    name = which.removesuffix("-view")
    if which.endswith("-view"):
        base = random_bits((2, *args[name].shape), args[name].dtype, device).requires_grad_()
        args[name] = base[1]
    else:
        args[name] = args[name].requires_grad_()
    return args


# Every tensor argument of each op, and views of a leaf as ql_nope and q_out.
GRAD_ARGS = [pytest.param(op.values[0], which, id=f"{op.id}-{which}") for op in OPS
             for which in op.values[0].tensor_args + ["ql_nope-view", "q_out-view"]]


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("op, which", GRAD_ARGS)
def test_grad_mode_rejects_tensors_requiring_grad(device, op, which, call):
    args = _with_grad(op, device, which)
    assert_refused(op, args, INFERENCE_ONLY.format(op=op.name, arg=which.removesuffix("-view")), call=call)


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("op, which", GRAD_ARGS)
def test_no_grad_and_inference_mode_accept_tensors_requiring_grad(device, op, which, mode, call):
    args = _with_grad(op, device, which)
    with mode():
        assert_writes_reference(op, args, call=call)


class _SavesForBackward(torch.autograd.Function):
    """weight -> weight, saving `t` for backward as any op that needs its input's value does."""

    @staticmethod
    def forward(ctx, weight, t):
        ctx.save_for_backward(t)
        return weight.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.saved_tensors  # raises if `t` was written in place since forward
        return grad, None


@pytest.mark.parametrize("op", OPS)
def test_grad_mode_without_grad_tensors_works_and_bumps_the_version(device, op):
    """Nothing requires grad: the call succeeds bit-exact in grad mode, and it counts as an in-place
    write of q_out (its version goes up by one, no other argument's), so a backward that saved q_out
    before the write refuses to run."""
    assert torch.is_grad_enabled()
    args = _decode_args(op, device)
    weight = torch.ones((), device=device, requires_grad=True)
    saved = _SavesForBackward.apply(weight, args["q_out"])
    versions = {name: t._version for name, t in args.items()}
    assert_writes_reference(op, args)
    assert {name: t._version for name, t in args.items()} == {
        name: v + (name == "q_out") for name, v in versions.items()}
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


def _compiled_loss(op, names: list[str], out_dtype: torch.dtype):
    """A function of `names` (op's arguments, q_out possibly left out) that calls the raw op, first
    allocating q_out (of `out_dtype`) when it is not given, and returns a loss of q_out. ql_nope and
    q_pe also reach the loss directly, so a graph that silently dropped the op's gradient would
    still backpropagate (and give a wrong gradient) instead of failing."""

    raw, schema_order = op.raw, op.arg_names  # read outside the traced function

    def loss(*values):
        given = dict(zip(names, values))
        ql_nope, q_pe = given["ql_nope"], given["q_pe"]
        if "q_out" not in given:
            given["q_out"] = ql_nope.new_empty(
                (ql_nope.shape[0], ql_nope.shape[1], ql_nope.shape[2] + q_pe.shape[2]), dtype=out_dtype)
            raw(*(given[name] for name in schema_order))
            return given["q_out"].float().sum() + ql_nope.float().sum() + q_pe.float().sum()
        raw(*(given[name] for name in schema_order))
        return given["q_out"].float().sum()

    return loss


@pytest.mark.parametrize("which", ["ql_nope", "q_pe", "q_out-view"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("op", OPS)
def test_compiled_call_with_grad_raises_never_a_wrong_gradient(device, op, backend, which):
    """torch.compile(fullgraph=True) of a function calling the op with an argument that requires
    grad (allocating q_out, or filling a q_out that is a view of a leaf): an error when
    compiling/running it, or at latest in backward; backward never completes."""
    torch._dynamo.reset()
    args = _with_grad(op, device, which)
    q_out = args["q_out"]
    names = [name for name in args if which == "q_out-view" or name != "q_out"]
    compiled = torch.compile(_compiled_loss(op, names, q_out.dtype), backend=backend, fullgraph=True)
    try:
        before = snapshot(q_out)
        try:
            loss = compiled(*(args[name] for name in names))
        except RuntimeError as error:  # torch._dynamo.exc.TorchRuntimeError is one
            assert "inference-only" in str(error), error
            assert_storages(before, (q_out,), "a call rejected at trace time wrote q_out")
            return
        with pytest.raises(RuntimeError):
            loss.backward()
            leaves = [t for t in (args["ql_nope"], args["q_pe"], q_out._base) if t is not None and t.requires_grad]
            pytest.fail(f"backward completed, with gradients {[t.grad for t in leaves]}")
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------- inference tensors

@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("all_inference", [False, True], ids=["out-only", "all-arguments"])
@pytest.mark.parametrize("op", OPS)
def test_inference_q_out_in_grad_mode_is_refused(device, op, all_inference, call):
    """A q_out created under inference_mode, passed in grad mode, with normal inputs or with every
    argument an inference tensor: the inference-tensor message, nothing written."""
    args = valid_args(op, device)
    with torch.inference_mode():
        made = valid_args(op, device)
    args = dict(made) if all_inference else dict(args, q_out=made["q_out"])
    assert all(t.is_inference() == (all_inference or name == "q_out") for name, t in args.items())
    assert torch.is_grad_enabled()
    assert_refused(op, args, INFERENCE_OUT.format(op=op.name), call=call)


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("all_inference", [False, True], ids=["out-only", "all-arguments"])
@pytest.mark.parametrize("op", OPS)
def test_inference_q_out_under_no_grad_is_written(device, op, all_inference, call):
    """Under no_grad the op does not ask whether q_out is an inference tensor (that would cost every
    call a dispatcher round trip): it writes it exactly, as a plain C++ extension op does. An
    inference tensor can never have been saved for backward, so no gradient can be wrong."""
    args = valid_args(op, device)
    with torch.inference_mode():
        made = valid_args(op, device)
    args = dict(made) if all_inference else dict(args, q_out=made["q_out"])
    with torch.no_grad():
        assert_writes_reference(op, args, call=call)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("op", OPS)
def test_no_grad_and_inference_mode_leave_versions_alone(device, op, mode):
    """Outside grad mode the C++ kernel bumps no version counter (the stable ABI has no call for it,
    and a Python one would cost the eager call more than its kernel): every argument keeps its
    version, normal tensors made outside inference mode included."""
    args = _decode_args(op, device)
    versions = {name: t._version for name, t in args.items()}
    with mode():
        assert_writes_reference(op, args)
    assert {name: t._version for name, t in args.items()} == versions


@pytest.mark.parametrize("made_inside", [True, False], ids=["inference-q_out", "normal-q_out"])
@pytest.mark.parametrize("op", OPS)
def test_q_out_written_inside_inference_mode_is_exact(device, op, made_inside):
    """Under inference_mode the op writes an inference q_out (all arguments inference tensors) and a
    q_out created outside it (normal inputs), exactly, and nothing else."""
    if made_inside:
        with torch.inference_mode():
            args = valid_args(op, device)
    else:
        args = valid_args(op, device)
    with torch.inference_mode():
        assert_writes_reference(op, args)
    assert args["q_out"].is_inference() == made_inside


# ------------------------------------------------------------------------- after a refused call


@pytest.mark.parametrize("op", OPS)
def test_process_stays_usable_after_a_refused_grad_call(device, op):
    """A call refused for an argument requiring grad is followed by valid calls that are bit-exact
    and, on CUDA, leaves no sticky error. Three rounds, so the state after a valid call following
    a refusal is covered too."""
    for _ in range(3):
        assert_refused(op, _with_grad(op, device, "ql_nope"), f"{op.name} is inference-only")
        assert_process_usable(op, device)


@pytest.mark.parametrize("op", OPS)
def test_many_refused_grad_calls_do_not_grow_memory(device, op):
    """50k calls refused for an argument requiring grad, 1 token x 2 heads x 8/8: no host memory
    growth, no CUDA memory held (see assert_memory_stays_flat)."""
    args = valid_args(op, device, tokens=1, heads=2, nope_dim=8, rope_dim=8)
    args["ql_nope"].requires_grad_()

    def one_call():
        try:
            call_raw(op, args)
        except RuntimeError:
            pass
        else:
            raise AssertionError("a call with an argument requiring grad was accepted")

    assert_memory_stays_flat(device, 50_000, one_call)


# ---------------------------------------------------------------------------------- registration


def _python_functions_run(fn) -> set[str]:
    """The Python functions (file:name) that run while `fn()` runs, below `fn` itself."""
    seen: set[str] = set()

    def profile(frame, event, arg):
        if event == "call":
            seen.add(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return {name for name in seen if not name.endswith(":fn") and "/torch/_ops.py:" not in name}


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode, torch.enable_grad])
@pytest.mark.parametrize("op", OPS)
def test_python_runs_on_the_eager_path_only_in_grad_mode(device, op, mode):
    """The raw op's eager call runs no Python below torch.ops' own call (the Autograd key falls
    through to the C++ kernel) under no_grad and inference_mode; in grad mode the C++ validator calls
    the grad-mode guard, whose kernel is Python."""
    args = _decode_args(op, device)
    raw, positional = op.raw, [args[name] for name in op.arg_names]

    def fn():
        raw(*positional)

    with mode():
        fn()  # warm: first calls may import or cache
        ran = _python_functions_run(fn)
    guard = {name for name in ran if name.endswith("vllm_mla_ops/_library.py:_grad_mode_guard")}
    if mode is torch.enable_grad:
        assert guard, ran
    else:
        assert not ran, ran
