"""Build vllm_mla_ops: setuptools hands the extension to CMake (CMakeLists.txt), vLLM style.

The libraries use torch's stable ABI only (floor TORCH_FLOOR) and Python's limited API, so one abi3
wheel serves every Python from 3.10 and every torch from the floor up, whichever torch built it.
TORCH_FLOOR is the one place the floor is written: it becomes the package's torch requirement, the
stable ABI target in CMake (-DVLLM_MLA_OPS_TORCH_FLOOR) and the floor in _build_info.json, which the
loader checks at import.

Environment:
  VLLM_MLA_OPS_TARGET    cpu | cuda (default: cuda when torch has CUDA and nvcc is found, else cpu,
                         with a warning when torch has CUDA but no nvcc is found). An explicit cuda
                         that cannot be built fails; it never falls back to cpu.
  TORCH_CUDA_ARCH_LIST   CUDA archs, torch's syntax ("9.0", "8.0;9.0+PTX"); default: the GPUs
                         visible at build time, else DEFAULT_CUDA_ARCHS.
  MAX_JOBS               parallel compile jobs (default: CPU count).
"""

import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
VERSION = "0.2.0"
TORCH_FLOOR = "2.11"
# Ampere (A100), Ada (L40, RTX 40xx), Hopper (H100, H200), Blackwell data center (B200) and
# consumer (RTX 50xx), with PTX of the newest so that later GPUs compile it at load time.
DEFAULT_CUDA_ARCHS = "8.0;8.9;9.0;10.0;12.0+PTX"


def torch_release(version: str) -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


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


@functools.cache
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
    if torch.version.cuda is not None and find_nvcc() is None:
        warnings.warn(f"vllm_mla_ops: torch {torch.__version__} has CUDA but no nvcc was found (set CUDA_HOME): "
                      "building the CPU kernels only", stacklevel=1)
        return "cpu"
    return "cuda" if torch.version.cuda is not None else "cpu"


def cuda_arch_list(torch) -> str:
    """TORCH_CUDA_ARCH_LIST, else the archs of the GPUs visible now, else DEFAULT_CUDA_ARCHS."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        found = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in found)
    return DEFAULT_CUDA_ARCHS


def cuda_architectures(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0a+PTX") to CMAKE_CUDA_ARCHITECTURES ("80-real;90a-real;90a-virtual")."""
    archs = []
    for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not item:
            continue
        name = item.removesuffix("+PTX").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", name):
            raise RuntimeError(f"TORCH_CUDA_ARCH_LIST entries look like 9.0, 9.0a or 9.0+PTX; got {item!r}")
        archs.append(f"{name}-real")
        if item.endswith("+PTX"):
            archs.append(f"{name}-virtual")
    return ";".join(archs)


def nvcc_version(nvcc: str) -> str:
    found = re.search(r"release (\d+)\.(\d+)", subprocess.run([nvcc, "--version"], capture_output=True,
                                                              text=True, check=True).stdout)
    return f"{found.group(1)}.{found.group(2)}" if found else "unknown"


def local_version() -> str:
    """VERSION with the target as a local label (+cpu, +cu130), so the two builds' wheels differ."""
    import torch

    if build_target(torch) == "cpu":
        return f"{VERSION}+cpu"
    return f"{VERSION}+cu{nvcc_version(find_nvcc()).replace('.', '')}"


def torch_headers(torch, build_root: Path) -> Path:
    """A copy of torch's headers, made once per torch release: the torch of an isolated build is a
    fresh install with new paths and new file times, and compiling against it directly would make
    every isolated build recompile everything."""
    copy = build_root / f"torch-{torch.__version__}-include"
    if not copy.is_dir():
        partial = build_root / f"{copy.name}.partial-{os.getpid()}"
        shutil.copytree(Path(torch.__file__).parent / "include", partial, symlinks=True)
        try:
            partial.rename(copy)
        except OSError:  # another build made it first
            shutil.rmtree(partial)
    return copy


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch

        target = build_target(torch)
        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        output_dir.mkdir(parents=True, exist_ok=True)
        if torch_release(torch.__version__) < torch_release(TORCH_FLOOR):
            raise RuntimeError(f"vllm_mla_ops builds against torch >= {TORCH_FLOOR} (its stable ABI target); "
                               f"found torch {torch.__version__}")
        torch_dir = Path(torch.__file__).parent
        ninja = tool("ninja")
        generator = "Ninja" if Path(ninja).is_file() else "default"
        # One persistent CMake tree per configuration whose compile commands differ (target, torch
        # release, Python, generator), never per path: an isolated build (pip install ., pip wheel .)
        # runs in a new temporary environment each time. Paths are passed at each configure and the
        # headers come from a copy per torch release, so a rebuild with the torch and cmake of a new
        # environment relinks and recompiles only what changed.
        python = f"{sys.implementation.cache_tag}|{Path(sys.base_prefix).resolve()}"
        key = hashlib.sha256(f"{target}|{torch.__version__}|{python}|{generator}".encode()).hexdigest()[:10]
        build_dir = ROOT / "build" / f"cmake-{target}-{key}"
        build_dir.mkdir(parents=True, exist_ok=True)
        info = {"version": self.distribution.get_version(), "target": target, "torch_floor": TORCH_FLOOR,
                "built_with_torch": torch.__version__, "cuda": None, "cuda_arch_list": None}
        args = [
            f"-DVLLM_MLA_OPS_TARGET={target}",
            f"-DVLLM_MLA_OPS_OUTPUT_DIR={output_dir}",
            f"-DVLLM_MLA_OPS_TORCH_DIR={torch_dir}",
            f"-DVLLM_MLA_OPS_TORCH_INCLUDE_DIR={torch_headers(torch, ROOT / 'build')}",
            f"-DVLLM_MLA_OPS_TORCH_FLOOR={TORCH_FLOOR}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if target == "cuda":
            nvcc = find_nvcc()
            info["cuda"] = nvcc_version(nvcc)
            info["cuda_arch_list"] = cuda_arch_list(torch)
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}",
                     f"-DVLLM_MLA_OPS_CUDA_ARCHS={cuda_architectures(info['cuda_arch_list'])}"]
        if generator == "Ninja":
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        summary = (f"vllm_mla_ops {info['version']}: target={target}, torch floor {TORCH_FLOOR} "
                   f"(building with torch {torch.__version__})"
                   + (f", CUDA {info['cuda']}, TORCH_CUDA_ARCH_LIST={info['cuda_arch_list']}" if target == "cuda" else ""))
        print(summary, file=sys.stderr)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        # Two builds at once in one CMake tree would corrupt ninja's logs: the second one waits.
        with open(build_dir / "build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            subprocess.run([tool("cmake"), "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
            subprocess.run([tool("cmake"), "--build", str(build_dir), "-j", jobs], check=True)
        (output_dir / "_build_info.json").write_text(json.dumps(info, indent=1) + "\n")
        # Editable installs copy only the registered extension (_C) into the source tree: the CUDA
        # library and the build info follow it here, and a CPU rebuild removes a stale CUDA library.
        package_dir = ROOT / "vllm_mla_ops"
        for folder in {output_dir, package_dir} if (self.editable_mode or self.inplace) else {output_dir}:
            if target == "cpu":
                (folder / "_C_cuda.so").unlink(missing_ok=True)
            if folder != output_dir:
                for name in ("_build_info.json", "_C_cuda.so"):
                    if (output_dir / name).is_file():
                        shutil.copy2(output_dir / name, folder / name)


(ROOT / "build").mkdir(exist_ok=True)  # egg_base below, which must exist in a fresh checkout
setup(
    version=local_version(),
    install_requires=[f"torch>={TORCH_FLOOR}"],
    ext_modules=[Extension("vllm_mla_ops._C", sources=[], py_limited_api=True)],
    cmdclass={"build_ext": CMakeBuild},
    # egg-info under build/: in the source root it would be found by importlib.metadata first when
    # Python runs from there, with the version of whichever build wrote it last.
    options={"bdist_wheel": {"py_limited_api": "cp310"}, "egg_info": {"egg_base": "build"}},
)
