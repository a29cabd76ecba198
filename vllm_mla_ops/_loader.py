"""Loads the compiled extension vllm_mla_ops._C, whose static initializers register the ops.

Registering an op that already exists terminates the process from inside a static initializer, so a
second copy of this library (another install, a copied build) must never be loaded next to a first
one. The checks here run before the load and turn that case into an ImportError.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import re
import struct

import torch

OP_NAME = "_C::concat_mla_q"
REBUILD_HINT = "rebuild it against the installed torch with `pip install --no-build-isolation -e .` in the source tree"


def _built_against(library: bytes) -> str | None:
    """The torch version recorded in the library (csrc/torch_bindings.cpp)."""
    found = re.search(rb"vllm_mla_ops build info: torch=([^;\0]*);", library)
    return found.group(1).decode() if found else None


def _elf_problem(library: bytes) -> str | None:
    """Why the file is not a complete 64-bit ELF shared library, or None. The dynamic loader does
    not check a file's size against its segments: it maps a truncated library, and the process dies
    of SIGBUS on first touching the missing part instead of failing to load."""
    if library[:6] != b"\x7fELF\x02\x01":
        return "not a 64-bit little-endian ELF file"
    phoff, = struct.unpack_from("<Q", library, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", library, 0x36)
    for i in range(phnum):
        start = phoff + i * phentsize
        if start + 40 > len(library):
            return f"its program headers end past the end of the file ({len(library)} bytes)"
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", library, start)
        if p_type == 1 and p_offset + p_filesz > len(library):  # PT_LOAD
            return f"a loaded segment ends at byte {p_offset + p_filesz}, past the end of the file ({len(library)} bytes)"
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
    mapped = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split(maxsplit=5)[-1].strip()
            if path.startswith("/") and ".so" in os.path.basename(path):
                mapped.add(path)
    copies = []
    for path in sorted(mapped):
        try:
            library = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue
        if hasattr(library, "vllm_mla_ops_library_marker"):
            copies.append(path)
    if copies:
        return "the copy of vllm_mla_ops loaded from " + ", ".join(copies)
    return "another library (" + torch._C._dispatch_dump(OP_NAME).strip().replace("\n", "; ") + ")"


def load_extension(package: str, package_dir: str) -> None:
    name = f"{package}._C"
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"vllm_mla_ops: the compiled extension {name} is missing from {package_dir}; {REBUILD_HINT}"
        )
    path = os.path.realpath(spec.origin)
    with open(path, "rb") as file:
        library = file.read()
    problem = _elf_problem(library)
    if problem is not None:
        raise ImportError(
            f"vllm_mla_ops: cannot load the compiled extension {path}: the file is not a complete shared "
            f"library ({problem}); {REBUILD_HINT}"
        )
    built_against = _built_against(library)
    if built_against != torch.__version__:
        raise ImportError(
            f"vllm_mla_ops: the compiled extension {path} was built against torch "
            f"{built_against or '(unknown: no build info in the file)'} but torch {torch.__version__} "
            f"is running; {REBUILD_HINT}"
        )
    if _op_registered() and not _is_loaded(path):
        raise ImportError(
            f"vllm_mla_ops: {OP_NAME} is already registered by {_registered_by()}; loading a second copy "
            f"({path}) would register it again, which aborts the process. Import one copy per process."
        )
    try:
        importlib.import_module(name)
    except (ImportError, OSError) as error:
        raise ImportError(
            f"vllm_mla_ops: cannot load the compiled extension {path} with torch {torch.__version__}: "
            f"{error}. It was probably built against another torch; {REBUILD_HINT}"
        ) from error
