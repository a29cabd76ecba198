"""Loading the extension: the registrations it makes, coexistence with another owner of the _C
namespace, harmless reloads of the same library, and ImportErrors (never a dead process) for a second
copy of the package, a missing extension and a broken one. Process-level cases run in subprocesses."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import vllm_mla_ops

PACKAGE_DIR = Path(vllm_mla_ops.__file__).resolve().parent
EXTENSION = Path(vllm_mla_ops._C.__file__).resolve()

# Runs in the subprocesses: the op on small random bits, checked bit for bit against torch.cat.
CHECK_OP = textwrap.dedent("""
    def check_op():
        nope = torch.randint(-32768, 32768, (3, 4, 7), dtype=torch.int16).view(torch.bfloat16)
        pe = torch.randint(-32768, 32768, (3, 1, 5), dtype=torch.int16).view(torch.bfloat16)
        out = torch.randint(-32768, 32768, (3, 4, 12), dtype=torch.int16).view(torch.bfloat16)
        torch.ops._C.concat_mla_q(nope, pe, out)
        expected = torch.cat([nope.view(torch.int16), pe.view(torch.int16).expand(3, 4, 5)], dim=-1)
        assert torch.equal(out.view(torch.int16), expected), "op result differs from torch.cat"
        print("OP-OK")
""")


def run_python(code: str, cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter that imports this very vllm_mla_ops (and `extra_path`)."""
    paths = [str(p) for p in (extra_path, PACKAGE_DIR.parent) if p is not None]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]))
    program = "import torch\n" + CHECK_OP + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", program], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=240)


def assert_clean_exit(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit code {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def copy_package(destination: Path, with_extension: bool = True) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", *(() if with_extension else ("*.so", "*.pyd")))
    shutil.copytree(PACKAGE_DIR, destination, ignore=ignore)
    return destination


# ------------------------------------------------------------------------------ registrations


def test_schema():
    assert str(torch.ops._C.concat_mla_q.default._schema) == (
        "_C::concat_mla_q(Tensor ql_nope, Tensor q_pe, Tensor(a!) q_out) -> ()"
    )


def test_dispatch_table_has_backend_kernels():
    table = torch._C._dispatch_dump_table("_C::concat_mla_q")
    assert re.search(r"^CPU: registered at \S*torch_bindings\.cpp", table, re.M), table
    assert re.search(r"^Meta: registered at ", table, re.M), table  # the fake implementation
    has_cuda_kernel = re.search(r"^CUDA: registered at ", table, re.M) is not None
    if os.environ.get("VLLM_MLA_OPS_TARGET") == "cuda":  # the build was forced to CUDA (CI does this)
        assert has_cuda_kernel, f"VLLM_MLA_OPS_TARGET=cuda but no CUDA kernel is registered:\n{table}"
    elif torch.version.cuda is not None and not has_cuda_kernel:
        warnings.warn("torch has CUDA but the extension was built without the CUDA kernel (CPU-only build)")


def test_extension_is_the_package_own():
    assert EXTENSION.parent == PACKAGE_DIR
    assert vllm_mla_ops.__all__ == ["concat_mla_q", "concat_mla_q_fp8", "ops"]


# --------------------------------------------------------------------------------- processes


def test_import_after_another_owner_of_the_namespace(tmp_path):
    """Another library owns `_C` (TORCH_LIBRARY-style DEF) first: the fragment still registers."""
    result = run_python("""
        owner = torch.library.Library("_C", "DEF")
        owner.define("other_owners_op(Tensor x) -> Tensor")
        import vllm_mla_ops
        check_op()
        assert hasattr(torch.ops._C, "other_owners_op")
    """, tmp_path)
    assert_clean_exit(result)
    assert "OP-OK" in result.stdout


def test_loading_the_same_library_again_is_harmless(tmp_path):
    result = run_python(f"""
        import importlib
        import re
        import vllm_mla_ops
        torch.ops.load_library({str(EXTENSION)!r})
        torch.ops.load_library({str(EXTENSION)!r})
        import vllm_mla_ops
        importlib.import_module("vllm_mla_ops._C")
        check_op()
        table = torch._C._dispatch_dump_table("_C::concat_mla_q")
        assert len(re.findall(r"^CPU: registered at .*torch_bindings", table, re.M)) == 1, table
    """, tmp_path)
    assert_clean_exit(result)
    assert "OP-OK" in result.stdout


@pytest.mark.parametrize("copy_first", [False, True], ids=["package-then-copy", "copy-then-package"])
def test_second_copy_of_the_package_raises_import_error(tmp_path, copy_first):
    """A copy of the package (its own .so) imported next to the original: ImportError naming the copy
    already loaded, the process survives and the loaded copy keeps working."""
    copy_dir = copy_package(tmp_path / "site" / "vllm_mla_ops_copy")
    copy_so = next(copy_dir.glob("_C*.so")).resolve()
    first, second = ("vllm_mla_ops_copy", "vllm_mla_ops") if copy_first else ("vllm_mla_ops", "vllm_mla_ops_copy")
    result = run_python(f"""
        import {first}
        try:
            import {second}
        except ImportError as error:
            print("IMPORT-ERROR:", error)
        else:
            print("SECOND-COPY-IMPORTED")
        check_op()
    """, tmp_path, extra_path=tmp_path / "site")
    assert_clean_exit(result)
    assert "SECOND-COPY-IMPORTED" not in result.stdout
    message = result.stdout.split("IMPORT-ERROR:", 1)[1]
    loaded, refused = (copy_so, EXTENSION) if copy_first else (EXTENSION, copy_so)
    assert f"already registered by the copy of vllm_mla_ops loaded from {loaded}" in message, message
    assert str(refused) in message, message
    assert "OP-OK" in result.stdout


def import_error(tmp_path, package: str) -> str:
    """The ImportError message of importing `package` from tmp_path/site in a fresh process."""
    result = run_python(f"""
        try:
            import {package}
        except ImportError as error:
            print("IMPORT-ERROR:", error)
    """, tmp_path, extra_path=tmp_path / "site")
    assert_clean_exit(result)
    assert "IMPORT-ERROR:" in result.stdout, result.stdout
    return result.stdout.split("IMPORT-ERROR:", 1)[1]


def test_missing_extension_raises_import_error_with_rebuild_hint(tmp_path):
    copy_package(tmp_path / "site" / "vllm_mla_ops_noext", with_extension=False)
    message = import_error(tmp_path, "vllm_mla_ops_noext")
    assert "the compiled extension vllm_mla_ops_noext._C is missing" in message, message
    assert "pip install --no-build-isolation -e ." in message, message


def test_broken_extension_raises_import_error_with_rebuild_hint(tmp_path):
    """An extension file that cannot be loaded (here: not a shared library at all, though it carries
    the build info of the running torch, so the loader gets as far as loading it)."""
    copy_dir = copy_package(tmp_path / "site" / "vllm_mla_ops_broken")
    build_info = f"vllm_mla_ops build info: torch={torch.__version__};".encode()
    next(copy_dir.glob("_C*.so")).write_bytes(b"not an ELF file\0" + build_info)
    message = import_error(tmp_path, "vllm_mla_ops_broken")
    assert "cannot load the compiled extension" in message, message
    assert "pip install --no-build-isolation -e ." in message, message
