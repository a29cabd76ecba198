"""csrc/dispatch_utils.h: which dtypes each macro reaches, with which C++ type, and the macro's error for
the rest. A test-only library (tests/dispatch_macros_op.cpp, never part of the package) is compiled
against the header on the stable ABI, as the package is; its ops take an empty tensor of the dtype
and return the name of the scalar_t it reached, or (the _check forms) raise the macro's error."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

import vllm_mla_ops

TESTS = Path(__file__).resolve().parent
CSRC = TESTS.parent / "csrc"

# The names (toString) of the dtypes probed; those a torch lacks are skipped. Quantized dtypes are
# not probed: the stable ABI cannot carry them into a kernel (they never reach one of ours either).
ATEN_NAMES = {
    "float32": "Float", "float16": "Half", "bfloat16": "BFloat16", "float64": "Double",
    "complex32": "ComplexHalf", "complex64": "ComplexFloat", "complex128": "ComplexDouble",
    "int8": "Char", "uint8": "Byte", "int16": "Short", "int32": "Int", "int64": "Long", "bool": "Bool",
    "uint16": "UInt16", "uint32": "UInt32", "uint64": "UInt64",
    "float8_e4m3fn": "Float8_e4m3fn", "float8_e5m2": "Float8_e5m2",
    "float8_e4m3fnuz": "Float8_e4m3fnuz", "float8_e5m2fnuz": "Float8_e5m2fnuz",
}
DTYPES = [getattr(torch, name) for name in ATEN_NAMES if hasattr(torch, name)]

# op -> (the name it dispatches under, the dtypes it must reach)
MACROS = {
    "floating_types": ("vllm_dispatch_floating", {torch.float32, torch.float16, torch.bfloat16}),
    "half_types": ("vllm_dispatch_half", {torch.float16, torch.bfloat16}),
    "case_floating_types_and_double": ("vllm_dispatch_case_floating",
                                       {torch.float32, torch.float16, torch.bfloat16, torch.float64}),
    "case_half_types_and_int": ("vllm_dispatch_case_half", {torch.float16, torch.bfloat16, torch.int32}),
}


# A folder under build/ (git-ignored) that outlives the run: ninja rebuilds the test library only
# when its source or a header it includes changed, not on every run. One per torch release: torch's
# extension builder leaves a lock file that another release takes for a build in progress and waits
# on forever (CI runs the suite under two torch releases from one checkout).
BUILD = TESTS.parent / "build" / f"test-dispatch-macros-torch-{torch.__version__}"


def _target_version() -> str:
    """The package's torch floor (its build info) as TORCH_TARGET_VERSION spells it, 0xMMmm...ULL."""
    major, minor = (int(part) for part in vllm_mla_ops.build_info()["torch_floor"].split("."))
    return f"0x{major:02x}{minor:02x}000000000000ULL"


@pytest.fixture(scope="module")
def dispatch_ops(tmp_path_factory):
    try:
        BUILD.mkdir(parents=True, exist_ok=True)
        build = BUILD
    except OSError:  # a read-only checkout
        build = tmp_path_factory.mktemp("dispatch_macros_build")
    saved_path = os.environ.get("PATH", "")
    # The build needs ninja, which the test environment's venv provides next to its python.
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), saved_path])
    try:
        torch.utils.cpp_extension.load(
            name="vllm_mla_ops_dispatch_test",
            sources=[str(TESTS / "dispatch_macros_op.cpp")],
            extra_include_paths=[str(CSRC)],
            build_directory=str(build),
            is_python_module=False,
            with_cuda=False,
            extra_cflags=["-DTORCH_STABLE_ONLY", f"-DTORCH_TARGET_VERSION={_target_version()}"],
            # As for the package (CMakeLists.txt): a compiler that links its C++ runtime statically
            # must keep that copy private, or formatting an error message crashes.
            extra_ldflags=["-Wl,--exclude-libs,ALL"],
        )
    finally:
        os.environ["PATH"] = saved_path
    return torch.ops.vllm_mla_ops_dispatch_test


def _aten_name(dtype: torch.dtype) -> str:
    return ATEN_NAMES[str(dtype).removeprefix("torch.")]


# Making the complex32 probe warns that ComplexHalf support is experimental: expected here.
@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("macro", list(MACROS))
def test_macro_reaches_exactly_its_dtypes(dispatch_ops, macro, dtype):
    dispatch_name, reached = MACROS[macro]
    probe = torch.empty(0, dtype=dtype)  # the ops read the probe's dtype
    check = getattr(dispatch_ops, f"{macro}_check")
    if dtype in reached:
        assert getattr(dispatch_ops, macro)(probe) == _aten_name(dtype)  # scalar_t is that dtype's C++ type
        check(probe)
    else:
        message = f"\"{dispatch_name}\" not implemented for '{_aten_name(dtype)}'"
        with pytest.raises(RuntimeError, match=re.escape(message)):
            check(probe)
