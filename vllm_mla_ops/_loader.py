"""Loads the compiled libraries: vllm_mla_ops._C (schemas and CPU kernels, registered by its static
initializers) and, where torch has CUDA, _C_cuda.so (the CUDA kernels).

Every check here runs before a library is loaded, because the failures they prevent cannot be caught
afterwards: registering an op that already exists terminates the process from inside a static
initializer (a second copy of this library), and the dynamic loader maps a truncated file and lets
the process die of SIGBUS when it touches the missing part. The torch floor is checked first for a
clear message; the build info and the ELF headers are all that is read of the files.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.machinery
import importlib.util
import json
import os
import re
import struct
import sys
from pathlib import Path

import torch

OP_NAME = "_C::concat_mla_q"
REBUILD_HINT = "rebuild it with `pip install -e .` (or reinstall the wheel) in this environment"


def _torch_release(version: str) -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def _elf_problem(path: Path) -> str | None:
    """Why the file is not a complete 64-bit ELF shared library, or None. Reads the ELF header and
    the program headers only."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        header = file.read(64)
        if len(header) < 64 or header[:6] != b"\x7fELF\x02\x01":
            return "not a 64-bit little-endian ELF file"
        phoff, = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        if phentsize < 40 or phoff + phnum * phentsize > size:
            return f"its program headers end past the end of the file ({size} bytes)"
        file.seek(phoff)
        table = file.read(phnum * phentsize)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
        if p_type == 1 and p_offset + p_filesz > size:  # PT_LOAD
            return f"a loaded segment ends at byte {p_offset + p_filesz}, past the end of the file ({size} bytes)"
    return None


def _is_loaded(path: str) -> bool:
    """Whether the shared library at `path` is already mapped into this process (loads nothing)."""
    try:
        ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return False
    return True


def _op_registered() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(OP_NAME, "")
    except RuntimeError:
        return False
    return True


def _registered_by() -> str:
    """Names the library that registered OP_NAME: a mapped copy of our extension if there is one."""
    copies = []
    with open("/proc/self/maps") as maps:
        mapped = {line.split(maxsplit=5)[-1].strip() for line in maps}
    for path in sorted(p for p in mapped if p.startswith("/") and ".so" in os.path.basename(p)):
        try:
            library = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue
        if hasattr(library, "vllm_mla_ops_library_marker"):
            copies.append(path)
    if copies:
        return "the copy of vllm_mla_ops loaded from " + ", ".join(copies)
    return "another library (" + torch._C._dispatch_dump(OP_NAME).strip().replace("\n", "; ") + ")"


def _missing(package: str, package_dir: Path) -> str:
    """Why the compiled extension is missing. A source checkout (setup.py and CMakeLists.txt beside
    the package folder) has none until built in place; Python finds it first when it is the current
    directory or on PYTHONPATH, ahead of a copy installed with `pip install .`."""
    root = package_dir.parent
    if not ((root / "setup.py").is_file() and (root / "CMakeLists.txt").is_file()):
        return f"vllm_mla_ops: the compiled extension {package}._C is missing from {package_dir}; {REBUILD_HINT}"
    elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != root]
    installed = importlib.machinery.PathFinder.find_spec(package, elsewhere)
    message = (f"vllm_mla_ops: importing the source tree at {package_dir}, which has no compiled libraries, not an "
               "installed package")
    if installed is not None and installed.origin is not None:
        message += (f"; it hides the installed copy at {Path(installed.origin).parent} because Python looks in "
                    f"{root} first (the current directory or PYTHONPATH)")
    return message + (f". Run Python from another directory to use an installed copy, or build the source tree in "
                      f"place with `pip install -e .` in {root}")


def _checked(path: Path) -> str:
    problem = _elf_problem(path)
    if problem is not None:
        raise ImportError(f"vllm_mla_ops: cannot load the compiled extension {path}: the file is not a complete shared "
                          f"library ({problem}); {REBUILD_HINT}")
    return str(path)


def load_extension(package: str, package_dir: str) -> dict:
    """Loads the libraries of `package` (a folder `package_dir`) and returns its build info."""
    name = f"{package}._C"
    spec = importlib.util.find_spec(name)
    info_path = Path(package_dir) / "_build_info.json"
    if spec is None or spec.origin is None or not info_path.is_file():
        raise ImportError(_missing(package, Path(package_dir)))
    info = json.loads(info_path.read_text())
    floor = info["torch_floor"]
    if _torch_release(torch.__version__) < _torch_release(floor):
        raise ImportError(f"vllm_mla_ops: this build needs torch >= {floor}, found torch {torch.__version__}; upgrade torch")
    path = _checked(Path(spec.origin).resolve())
    if _op_registered() and not _is_loaded(path):
        raise ImportError(
            f"vllm_mla_ops: {OP_NAME} is already registered by {_registered_by()}; loading a second copy ({path}) would "
            "register it again, which aborts the process. Import one copy per process.")
    try:
        importlib.import_module(name)
    except (ImportError, OSError) as error:
        raise ImportError(f"vllm_mla_ops: cannot load the compiled extension {path} with torch {torch.__version__}: "
                          f"{error}; {REBUILD_HINT}") from error
    cuda_library = Path(package_dir) / "_C_cuda.so"
    if torch.version.cuda is not None and cuda_library.is_file():
        cuda_path = _checked(cuda_library.resolve())
        try:
            torch.ops.load_library(cuda_path)
        except OSError as error:
            raise ImportError(f"vllm_mla_ops: cannot load the CUDA kernels {cuda_path} with torch {torch.__version__}: "
                              f"{error}; {REBUILD_HINT}") from error
    return info
