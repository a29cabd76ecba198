"""Build vllm_mla_ops: setuptools hands the extension to CMake (CMakeLists.txt), vLLM style.

Environment:
  VLLM_MLA_OPS_TARGET    cpu | cuda (default: cuda when torch has CUDA and nvcc is found, else cpu).
                         An explicit cuda that cannot be built fails; it never falls back to cpu.
  TORCH_CUDA_ARCH_LIST   CUDA archs, torch's syntax ("9.0", "8.0;9.0+PTX"); default "9.0".
  MAX_JOBS               parallel compile jobs (default: CPU count).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(cuda_home) / "bin" / "nvcc"] if cuda_home else []
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for path in candidates:
        if path.is_file():
            return str(path)
    return shutil.which("nvcc")


def tool(name: str) -> str:
    """The build tool installed next to this Python (a venv's pip cmake/ninja), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else (shutil.which(name) or name)


def build_target(torch) -> str:
    target = os.environ.get("VLLM_MLA_OPS_TARGET", "").strip().lower()
    if target not in ("", "cpu", "cuda"):
        raise RuntimeError(f"VLLM_MLA_OPS_TARGET must be 'cpu' or 'cuda', got {target!r}")
    if target == "cuda" and torch.version.cuda is None:
        raise RuntimeError(f"VLLM_MLA_OPS_TARGET=cuda, but the installed torch {torch.__version__} has no CUDA")
    if target == "cuda" and find_nvcc() is None:
        raise RuntimeError("VLLM_MLA_OPS_TARGET=cuda, but no nvcc was found (set CUDA_HOME)")
    if target:
        return target
    return "cuda" if torch.version.cuda is not None and find_nvcc() is not None else "cpu"


def cuda_architectures(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0a+PTX") to CMAKE_CUDA_ARCHITECTURES ("80-real;90a-real;90a-virtual")."""
    archs = []
    for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not item:
            continue
        name = item.removesuffix("+PTX").replace(".", "")
        if not name[:2].isdigit():
            raise RuntimeError(f"TORCH_CUDA_ARCH_LIST entries look like 9.0, 9.0a or 9.0+PTX; got {item!r}")
        archs.append(f"{name}-real")
        if item.endswith("+PTX"):
            archs.append(f"{name}-virtual")
    return ";".join(archs)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch

        target = build_target(torch)
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / f"cmake-{target}"
        build_dir.mkdir(parents=True, exist_ok=True)
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or "9.0"
        args = [
            f"-DVLLM_MLA_OPS_TARGET={target}",
            f"-DVLLM_MLA_OPS_OUTPUT={output}",
            f"-DVLLM_MLA_OPS_TORCH_DIR={Path(torch.__file__).parent}",
            f"-DVLLM_MLA_OPS_TORCH_VERSION={torch.__version__}",
            f"-DVLLM_MLA_OPS_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if target == "cuda":
            args += [
                f"-DCMAKE_CUDA_COMPILER={find_nvcc()}",
                f"-DVLLM_MLA_OPS_CUDA_ARCHS={cuda_architectures(arch_list)}",
            ]
        ninja = tool("ninja")
        if Path(ninja).is_file():
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        print(f"vllm_mla_ops: building target={target} for torch {torch.__version__}"
              + (f", TORCH_CUDA_ARCH_LIST={arch_list}" if target == "cuda" else ""))
        subprocess.run([tool("cmake"), "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([tool("cmake"), "--build", str(build_dir), "-j", jobs], check=True)


setup(ext_modules=[Extension("vllm_mla_ops._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
