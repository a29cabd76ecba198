"""Loading the extension: the registrations it makes, what the package reports about its build, that
the libraries use torch's stable ABI only, coexistence with another owner of the _C namespace,
harmless reloads of the same library, and ImportErrors (never a dead process, never a registered op)
for a second copy of the package, a missing, broken, truncated or garbled library and a torch below
the build's floor. Process-level cases run in subprocesses."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import vllm_mla_ops

PACKAGE_DIR = Path(vllm_mla_ops.__file__).resolve().parent
EXTENSION = Path(vllm_mla_ops._C.__file__).resolve()
CUDA_LIBRARY = PACKAGE_DIR / "_C_cuda.so"
REBUILD = "pip install -e ."

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
    assert result.returncode == 0, (f"exit code {result.returncode}\nstdout:\n{result.stdout}\n"
                                    f"stderr:\n{result.stderr[-3000:]}")


def copy_package(destination: Path, with_libraries: bool = True) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", *(() if with_libraries else ("*.so", "_build_info.json")))
    shutil.copytree(PACKAGE_DIR, destination, ignore=ignore)
    return destination


def import_error(tmp_path: Path, package: str) -> str:
    """The ImportError message of importing `package` from tmp_path/site in a fresh process, which
    must survive and must not have registered the op."""
    result = run_python(f"""
        try:
            import {package}
        except ImportError as error:
            print("IMPORT-ERROR:", error)
        print("REGISTERED:", hasattr(torch.ops._C, "concat_mla_q"))
    """, tmp_path, extra_path=tmp_path / "site")
    assert_clean_exit(result)
    assert "IMPORT-ERROR:" in result.stdout, result.stdout
    assert "REGISTERED: False" in result.stdout, result.stdout
    return result.stdout.split("IMPORT-ERROR:", 1)[1].split("REGISTERED:", 1)[0].strip()


# ------------------------------------------------------------------------------ registrations


def test_schemas():
    assert str(torch.ops._C.concat_mla_q.default._schema) == (
        "_C::concat_mla_q(Tensor ql_nope, Tensor q_pe, Tensor(a!) q_out) -> ()")
    assert str(torch.ops._C.concat_mla_q_fp8.default._schema) == (
        "_C::concat_mla_q_fp8(Tensor ql_nope, Tensor q_pe, Tensor(a!) q_out, Tensor scale) -> ()")
    assert str(torch.ops._C.concat_mla_rope.default._schema) == (
        "_C::concat_mla_rope(Tensor ql_nope, Tensor q_pe, Tensor positions, Tensor cos_sin_cache, bool is_neox, "
        "Tensor(a!) q_out, Tensor? q_scale, Tensor? kv_c, Tensor? k_pe, Tensor(b!)? kv_cache, Tensor? slot_mapping, "
        "Tensor? k_scale) -> ()")


@pytest.mark.parametrize("op, cuda_file", [("concat_mla_q", "concat_mla_q_kernels"),
                                           ("concat_mla_q_fp8", "concat_mla_q_kernels"),
                                           ("concat_mla_rope", "concat_mla_rope_kernels")])
def test_dispatch_table(op, cuda_file):
    """CPU kernel from the bindings file, CUDA kernel from the CUDA file (when the build has one and
    torch has CUDA), the fake (Meta), and the Python math-bit and nested-tensor kernels (the
    inference-only guard's keys are test_inference_only.py's)."""
    table = torch._C._dispatch_dump_table(f"_C::{op}")
    library = r"\S*vllm_mla_ops/_library\.py"
    for key, where in (("CPU", r"\S*csrc/torch_bindings\.cpp"), ("Meta", r"\S*"),
                       ("Negative", library), ("Conjugate", library), ("NestedTensorCPU", library)):
        assert re.search(rf"^{key}: registered at {where}", table, re.M), f"{key}:\n{table}"
    has_cuda_kernel = re.search(rf"^CUDA: registered at \S*csrc/{cuda_file}\.cu", table, re.M) is not None
    expected = vllm_mla_ops.build_info()["target"] == "cuda" and torch.version.cuda is not None
    assert has_cuda_kernel == expected, table
    if os.environ.get("VLLM_MLA_OPS_TARGET") == "cuda":  # the build was forced to CUDA (CI does this)
        assert has_cuda_kernel, f"VLLM_MLA_OPS_TARGET=cuda but no CUDA kernel is registered:\n{table}"


@pytest.mark.parametrize("name", ["concat_mla_q", "concat_mla_q_fp8", "concat_mla_rope"])
def test_raw_ops_have_docstrings(name):
    """help(torch.ops._C.<op>) shows the schema and the contract: the docstring of the Python
    function of the same name follows the schema, on the packet and on the overload."""
    packet = getattr(torch.ops._C, name)
    function_doc = inspect.cleandoc(getattr(vllm_mla_ops, name).__doc__)
    for doc in (packet.__doc__, packet.default.__doc__):
        assert doc.startswith(str(packet.default._schema)), doc
        assert doc.endswith(function_doc), doc


def test_build_info_and_version():
    info = vllm_mla_ops.build_info()
    assert set(info) == {"version", "target", "torch_floor", "built_with_torch", "cuda", "cuda_arch_list"}
    assert vllm_mla_ops.__version__ == info["version"]
    assert info["version"].endswith("+cpu" if info["target"] == "cpu" else f"+cu{info['cuda'].replace('.', '')}")
    assert re.fullmatch(r"\d+\.\d+", info["torch_floor"]), info
    assert (info["cuda"] is None) == (info["target"] == "cpu") == (info["cuda_arch_list"] is None)
    assert importlib.metadata.version("vllm-mla-ops") == vllm_mla_ops.__version__
    requires = importlib.metadata.requires("vllm-mla-ops") or []
    assert f"torch>={info['torch_floor']}" in requires, requires  # both from setup.py's TORCH_FLOOR


def test_extension_is_an_abi3_module_of_the_package():
    assert EXTENSION.parent == PACKAGE_DIR
    assert EXTENSION.name == "_C.abi3.so"
    assert vllm_mla_ops.__all__ == ["__version__", "build_info", "concat_mla_q", "concat_mla_q_fp8", "concat_mla_rope"]


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_libraries_use_only_the_stable_abi():
    """No symbol of ATen, c10 or torch's C++ API is imported (they change between torch releases);
    the libraries call torch only through the stable C shim (aoti_torch_*, torch_*)."""
    libraries = [EXTENSION] + ([CUDA_LIBRARY] if CUDA_LIBRARY.is_file() else [])
    for library in libraries:
        undefined = subprocess.run(["nm", "-D", "--undefined-only", str(library)], capture_output=True, text=True,
                                   check=True).stdout.split()
        unstable = [s for s in undefined if re.match(r"_ZN(K)?(2at|3c10|5torch|8pybind11)", s)]
        assert not unstable, f"{library.name} imports C++ symbols of torch: {unstable[:10]}"
        assert any(s.startswith(("aoti_torch_", "torch_")) for s in undefined), undefined


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
    copy_so = (copy_dir / EXTENSION.name).resolve()
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


def test_missing_extension_raises_import_error_with_rebuild_hint(tmp_path):
    copy_package(tmp_path / "site" / "vllm_mla_ops_noext", with_libraries=False)
    message = import_error(tmp_path, "vllm_mla_ops_noext")
    assert "the compiled extension vllm_mla_ops_noext._C is missing" in message, message
    assert REBUILD in message, message


@pytest.mark.parametrize("installed", [False, True], ids=["source-tree-only", "source-tree-hides-installed"])
def test_unbuilt_source_tree_raises_import_error_saying_so(tmp_path, installed):
    """Importing an unbuilt checkout (setup.py and CMakeLists.txt beside the package folder), e.g.
    from the checkout after `pip install .`: the message names the source tree, the installed copy
    it hides if there is one, and both ways out."""
    tmp_path = tmp_path.resolve()
    checkout = tmp_path / "checkout"
    copy_package(checkout / "vllm_mla_ops_src", with_libraries=False)
    (checkout / "setup.py").touch()
    (checkout / "CMakeLists.txt").touch()
    if installed:
        copy_package(tmp_path / "site" / "vllm_mla_ops_src")
    result = run_python("""
        try:
            import vllm_mla_ops_src
        except ImportError as error:
            print("IMPORT-ERROR:", error)
    """, checkout, extra_path=tmp_path / "site")
    assert_clean_exit(result)
    message = result.stdout.split("IMPORT-ERROR:", 1)[1].strip()
    assert f"importing the source tree at {checkout / 'vllm_mla_ops_src'}, which has no compiled libraries" in message
    assert ("hides the installed copy at " + str(tmp_path / "site" / "vllm_mla_ops_src") in message) == installed, message
    assert "Run Python from another directory" in message and f"`{REBUILD}` in {checkout}" in message, message


def test_torch_below_the_build_floor_raises_import_error(tmp_path):
    """The build info's floor above the running torch: refused before the library is loaded."""
    copy_dir = copy_package(tmp_path / "site" / "vllm_mla_ops_future")
    info = json.loads((copy_dir / "_build_info.json").read_text())
    info["torch_floor"] = "99.0"
    (copy_dir / "_build_info.json").write_text(json.dumps(info))
    message = import_error(tmp_path, "vllm_mla_ops_future")
    assert f"this build needs torch >= 99.0, found torch {torch.__version__}" in message, message


def _not_elf(library: Path) -> None:
    library.write_bytes(b"not an ELF file\0" * 8)


def _truncated(library: Path) -> None:
    """An interrupted copy: the file ends inside a segment the dynamic loader maps."""
    library.write_bytes(library.read_bytes()[: library.stat().st_size // 2])


def _garbled_header(library: Path) -> None:
    content = bytearray(library.read_bytes())
    content[16:64] = b"\xff" * 48  # e_type .. e_shoff: the ELF magic stays, the rest is garbage
    library.write_bytes(bytes(content))


@pytest.mark.parametrize("damage, reason", [
    (_not_elf, "not a 64-bit little-endian ELF file"),
    (_truncated, "past the end of the file"),
    (_garbled_header, "past the end of the file"),
], ids=["not-elf", "truncated", "garbled-header"])
def test_damaged_extension_raises_import_error(tmp_path, damage, reason):
    """A damaged library file (an interrupted copy or download): an ImportError that names the problem
    and says how to rebuild, in a process that survives and never registered the op."""
    copy_dir = copy_package(tmp_path / "site" / "vllm_mla_ops_damaged")
    damage(copy_dir / EXTENSION.name)
    message = import_error(tmp_path, "vllm_mla_ops_damaged")
    assert "is not a complete shared library" in message and reason in message, message
    assert REBUILD in message, message
