"""Misuse and hostile environments: what happens after an error, under autograd, from many threads,
over many calls, under torch.export, with a broken or mismatched build; and docs/errors.md kept in
step with the messages the code raises."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

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

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(vllm_mla_ops.__file__).resolve().parent
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


def _requires_grad(device):
    ql_nope, q_pe, q_out = _decode_args(device)
    return (ql_nope.requires_grad_(), q_pe, q_out), "concat_mla_q is inference-only"


def _mixed_devices(device):
    ql_nope, q_pe, q_out = _decode_args(device)
    return (ql_nope, q_pe.cpu(), q_out), "q_pe must be on ql_nope's device cuda:0, got cpu"


REJECTIONS = {"dtype": _bad_dtype, "shape": _bad_shape, "overlap": _overlap, "requires-grad": _requires_grad,
              "mixed-devices": _mixed_devices}


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


# ------------------------------------------------------------------------------------- autograd

INFERENCE_ONLY = "concat_mla_q is inference-only (no autograd formula): got {} with requires_grad=True"


def _with_grad(device, which: str):
    """Decode-layout arguments with `which` requiring grad: a leaf, or (the `-view` forms) a view
    of a leaf, which autograd treats differently for in-place writes."""
    ql_nope, q_pe, q_out = _decode_args(device)
    args = {"ql_nope": ql_nope, "q_pe": q_pe, "q_out": q_out}
    name = which.removesuffix("-view")
    if which.endswith("-view"):
        base = random_bits((2, *args[name].shape), args[name].dtype, device).requires_grad_()
        args[name] = base[1]
    else:
        args[name] = args[name].requires_grad_()
    return args["ql_nope"], args["q_pe"], args["q_out"]


GRAD_ARGS = ["ql_nope", "q_pe", "q_out", "ql_nope-view", "q_out-view"]


@pytest.mark.parametrize("call", ENTRY_POINTS)
@pytest.mark.parametrize("which", GRAD_ARGS)
def test_grad_mode_rejects_tensors_requiring_grad(device, which, call):
    args = _with_grad(device, which)
    check_rejected(args, INFERENCE_ONLY.format(which.removesuffix("-view")), call=call)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("which", GRAD_ARGS)
def test_no_grad_and_inference_mode_accept_tensors_requiring_grad(device, which, mode):
    ql_nope, q_pe, q_out = _with_grad(device, which)
    with mode():
        check_writes_reference(ql_nope, q_pe, q_out)


def test_grad_mode_without_grad_tensors_works_and_bumps_the_version(device):
    """Nothing requires grad: the call succeeds bit-exact in grad mode, and it counts as an in-place
    write of q_out, so a backward that saved q_out before the write refuses to run."""
    assert torch.is_grad_enabled()
    ql_nope, q_pe, q_out = _decode_args(device)
    weight = torch.ones((), dtype=q_out.dtype, device=device, requires_grad=True)
    product = weight * q_out  # saves q_out (at version v) for weight's gradient
    version = q_out._version
    check_writes_reference(ql_nope, q_pe, q_out)
    assert q_out._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        product.float().sum().backward()


def _allocating(ql_nope, q_pe):
    q_out = ql_nope.new_empty(ql_nope.shape[0], ql_nope.shape[1], ql_nope.shape[2] + q_pe.shape[2])
    torch.ops._C.concat_mla_q(ql_nope, q_pe, q_out)
    # ql_nope and q_pe also reach the loss directly, so a graph that silently dropped the op's
    # gradient would still backpropagate (and give a wrong gradient) instead of failing.
    return q_out.float().sum() + ql_nope.float().sum() + q_pe.float().sum()


def _filling(ql_nope, q_pe, q_out):
    torch.ops._C.concat_mla_q(ql_nope, q_pe, q_out)
    return q_out.float().sum()


@pytest.mark.parametrize("which", ["ql_nope", "q_pe", "q_out-view"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_call_with_grad_raises_never_a_wrong_gradient(device, backend, which):
    """torch.compile(fullgraph=True) of a function calling the op with an argument that requires
    grad: an error when compiling/running it, or at latest in backward; backward never completes."""
    torch._dynamo.reset()
    ql_nope, q_pe, q_out = _with_grad(device, which)
    if which == "q_out-view":
        fn, args = _filling, (ql_nope, q_pe, q_out)
    else:
        fn, args = _allocating, (ql_nope, q_pe)
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    try:
        before = snapshot(q_out)
        try:
            loss = compiled(*args)
        except RuntimeError as error:  # torch._dynamo.exc.TorchRuntimeError is one
            assert "inference-only" in str(error), error
            assert_storages(before, (q_out,), "a call rejected at trace time wrote q_out")
            return
        with pytest.raises(RuntimeError):
            loss.backward()
            leaves = [t for t in (ql_nope, q_pe, q_out._base) if t is not None and t.requires_grad]
            pytest.fail(f"backward completed, with gradients {[t.grad for t in leaves]}")
    finally:
        torch._dynamo.reset()


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


@pytest.mark.parametrize("outcome, calls", [("accepted", 100_000), ("rejected", 50_000),
                                            ("rejected-autograd", 50_000)])
def test_many_calls_do_not_grow_memory(device, outcome, calls):
    """100k accepted calls (50k rejected ones: an error is slower) of 1 token x 2 heads x 8/8: host
    RSS grows by at most 8 MB between the first tenth and the end (a leak of ~100 bytes a call
    fails), and on CUDA the caching allocator holds exactly as much as before. Takes ~1 s on CPU."""
    ql_nope, q_pe = random_bits((1, 2, 8), torch.bfloat16, device), random_bits((1, 2, 8), torch.bfloat16, device)
    q_out = random_bits((1, 2, 16), torch.bfloat16, device)
    if outcome == "rejected":
        q_out = random_bits((1, 2, 15), torch.bfloat16, device)
    elif outcome == "rejected-autograd":
        ql_nope.requires_grad_()
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


# --------------------------------------------------------------------------------------- loading


def _copy_package(destination: Path) -> Path:
    shutil.copytree(PACKAGE_DIR, destination, ignore=shutil.ignore_patterns("__pycache__"))
    return destination


def _import_in_subprocess(package: str, site: Path) -> subprocess.CompletedProcess:
    """Imports `package` from `site` in a fresh interpreter; prints the ImportError and whether the
    op got registered (it must not be: the library must not have been loaded)."""
    program = textwrap.dedent(f"""
        import torch
        try:
            import {package}
        except ImportError as error:
            print("IMPORT-ERROR:", error)
        else:
            print("IMPORTED")
        print("REGISTERED:", hasattr(torch.ops._C, "concat_mla_q"))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", program], cwd=site, env=env, capture_output=True, text=True,
                          timeout=240)


def _import_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (f"the importing process died: exit code {result.returncode}\n"
                                    f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-3000:]}")
    assert "IMPORT-ERROR:" in result.stdout, result.stdout
    assert "REGISTERED: False" in result.stdout, result.stdout
    return result.stdout.split("IMPORT-ERROR:", 1)[1].split("REGISTERED:", 1)[0].strip()


BUILD_INFO = re.compile(rb"vllm_mla_ops build info: torch=([^;\0]*);")
REBUILD = "pip install --no-build-isolation -e ."


def _record_torch_version(package_dir: Path, version: str) -> None:
    """Rewrites the torch version the copied build records: in _build_info.json if the build writes
    one, else in the build-info string embedded in the library (same length, NUL padded)."""
    info = package_dir / "_build_info.json"
    if info.exists():
        data = json.loads(info.read_text())
        data["torch_version"] = version
        info.write_text(json.dumps(data))
        return
    library = next(package_dir.glob("_C*.so"))
    content = library.read_bytes()
    found = BUILD_INFO.search(content)
    assert found, f"no build info in {package_dir} (neither _build_info.json nor an embedded string)"
    start, end = found.span(1)
    assert len(version) <= end - start
    library.write_bytes(content[:start] + version.encode() + b";" + b"\0" * (end - start - len(version))
                        + content[end + 1 :])


def test_extension_built_for_another_torch_raises_import_error(tmp_path):
    package = "vllm_mla_ops_oldtorch"
    _record_torch_version(_copy_package(tmp_path / package), "2.0.0")
    message = _import_error(_import_in_subprocess(package, tmp_path))
    assert "was built against torch 2.0.0" in message, message
    assert f"but torch {torch.__version__} is running" in message, message
    assert REBUILD in message, message


def _loaded_segments(content: bytes) -> list[tuple[int, int]]:
    """[start, end) file offsets of the PT_LOAD segments of a little-endian ELF64 file."""
    assert content[:6] == b"\x7fELF\x02\x01", "expected a little-endian ELF64 library"
    (phoff,) = struct.unpack_from("<Q", content, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", content, 0x36)
    segments = []
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", content, phoff + i * phentsize)
        if p_type == 1 and p_filesz > 0:  # PT_LOAD
            segments.append((p_offset, p_offset + p_filesz))
    return segments


def _truncate(library: Path) -> None:
    """Cuts the file inside a segment the dynamic loader maps (an interrupted copy), after the
    embedded build info if there is one, so that the load itself meets the damage."""
    content = library.read_bytes()
    found = BUILD_INFO.search(content)
    keep = found.end() if found else 0
    start, end = [(s, e) for s, e in _loaded_segments(content) if e > keep + 1][-1]
    library.write_bytes(content[: max(start + (end - start) // 2, keep + 1)])


def _garble_elf_header(library: Path) -> None:
    content = bytearray(library.read_bytes())
    content[16:64] = b"\xff" * 48  # e_type .. e_shoff: the ELF magic stays, the rest is garbage
    library.write_bytes(bytes(content))


@pytest.mark.parametrize("corrupt", [_truncate, _garble_elf_header], ids=["truncated", "garbled-elf-header"])
def test_corrupt_extension_raises_import_error(tmp_path, corrupt):
    """A damaged library file (an interrupted copy or download): an ImportError that says how to
    rebuild, in a process that survives and never registered the op. (A missing library and a
    non-ELF file are in test_loading.py.)"""
    package = "vllm_mla_ops_corrupt"
    corrupt(next(_copy_package(tmp_path / package).glob("_C*.so")))
    message = _import_error(_import_in_subprocess(package, tmp_path))
    assert "vllm_mla_ops:" in message and "compiled extension" in message, message
    assert REBUILD in message, message


# -------------------------------------------------------------------------------- docs/errors.md


def _split_call_args(source: str, start: int) -> list[str]:
    """The top-level arguments of the C/C++ call whose '(' ends just before `start`."""
    args, depth, current, i = [], 0, [], start
    while True:
        c = source[i]
        if c in "\"'":  # a string or character literal, escapes included
            j = i + 1
            while source[j] != c:
                j += 2 if source[j] == "\\" else 1
            current.append(source[i : j + 1])
            i = j + 1
            continue
        if source.startswith("//", i):
            i = source.index("\n", i)
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                args.append("".join(current))
                return args
            depth -= 1
        elif c == "," and depth == 0:
            args.append("".join(current))
            current = []
            i += 1
            continue
        current.append(c)
        i += 1


STRING_LITERALS = re.compile(r'\s*(?:"(?:[^"\\]|\\.)*"\s*)+')


def _cpp_templates() -> list[tuple[str, list]]:
    """The message of every TORCH_CHECK* in csrc/: a list of literal strings (adjacent literals
    joined) and None for each interpolated expression."""
    found = []
    for path in sorted((ROOT / "csrc").glob("*")):
        if path.suffix not in (".cpp", ".cu", ".h", ".cuh"):
            continue
        source = path.read_text()
        for call in re.finditer(r"\bTORCH_CHECK\w*\s*\(", source):
            pieces = []
            for arg in _split_call_args(source, call.end())[1:]:
                if STRING_LITERALS.fullmatch(arg):
                    pieces.append("".join(ast.literal_eval(s) for s in re.findall(r'"(?:[^"\\]|\\.)*"', arg)))
                else:
                    pieces.append(None)
            found.append((f"{path.name}:{source.count(chr(10), 0, call.start()) + 1}", pieces))
    return found


def _py_templates() -> list[tuple[str, list]]:
    """The message of every torch._check(..., lambda: message) and `raise X(message)` in
    vllm_mla_ops/; f-string fields naming a module-level string constant are inlined."""
    found = []
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        constants = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                     and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                     for t in node.targets if isinstance(t, ast.Name)}

        def pieces(node):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                return [node.value]
            if isinstance(node, ast.JoinedStr):
                out = []
                for value in node.values:
                    if isinstance(value, ast.Constant):
                        out.append(value.value)
                    elif isinstance(value.value, ast.Name) and value.value.id in constants:
                        out.append(constants[value.value.id])
                    else:
                        out.append(None)
                return out
            return None

        for node in ast.walk(tree):
            message = None
            if (isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch._check", "_check")
                    and len(node.args) > 1 and isinstance(node.args[1], ast.Lambda)):
                message = node.args[1].body
            elif isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
                message = node.exc.args[0]
            if message is not None and pieces(message) is not None:
                found.append((f"{path.name}:{node.lineno}", pieces(message)))
    return found


def _template_regex(pieces: list) -> re.Pattern:
    return re.compile("".join(".+?" if p is None else re.escape(p) for p in pieces), re.S)


def _documented() -> list[dict]:
    """The rows of the table in docs/errors.md, as {column header: cell}."""
    lines = [line for line in (ROOT / "docs" / "errors.md").read_text().splitlines() if line.startswith("|")]
    split = lambda line: [cell.strip() for cell in line.strip().strip("|").split("|")]  # noqa: E731
    header = split(lines[0])
    rows = [dict(zip(header, split(line))) for line in lines[2:]]
    for row in rows:
        cell = row["Message template"]
        delimiter = "``" if cell.startswith("``") else "`"
        assert cell.startswith(delimiter) and cell.endswith(delimiter), cell
        row["template"] = cell[len(delimiter) : -len(delimiter)].strip()
    return rows


def test_error_table_matches_the_sources():
    """Every template in docs/errors.md is a message the code builds ({placeholders} where the code
    interpolates a value), with the right exception class; every message the code builds has a row."""
    sources = [(where, pieces, _template_regex(pieces)) for where, pieces in _cpp_templates() + _py_templates()]
    assert len(sources) >= 20, [where for where, _, _ in sources]
    rows = _documented()
    unmatched = []
    for row in rows:
        matches = [where for where, _, regex in sources if regex.fullmatch(row["template"])]
        if not matches:
            unmatched.append(row["template"])
            continue
        expected = "ImportError" if all(w.startswith("_loader.py") for w in matches) else "RuntimeError"
        assert row["Exception"].startswith(expected), (row["template"], row["Exception"], matches)
    assert not unmatched, "documented messages that no source builds:\n" + "\n".join(unmatched)
    undocumented = [f"{where}: {''.join('{}' if p is None else p for p in pieces)}"
                    for where, pieces, regex in sources if not any(regex.fullmatch(r["template"]) for r in rows)]
    assert not undocumented, "messages missing from docs/errors.md:\n" + "\n".join(undocumented)
