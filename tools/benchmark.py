#!/usr/bin/env python3
"""Benchmark ``torch.ops._C.concat_mla_q`` (writes ``[ql_nope | q_pe]`` into ``q_out``) against
``torch.cat(out=)``, slice-assignment copies and a same-byte-count copy ceiling.

Modes
  --main    DeepSeek-V3 shapes (nope 512, rope 64, 128 heads) on the best device: decode (1, 16, 64
            tokens, decode layout) and prefill (1024 and 4096 tokens on CUDA, 256 and 1024 on CPU,
            contiguous layout); bit-exact check, then ours vs torch.cat. What `tools/dev.sh main` runs.
  default   the full sweep over --dtypes x --layouts x --heads x --tokens, with a final table, a host
            (launch) overhead table on CUDA, and CSV, JSON and PNG files in --out.
  --fp8     the same sweep for torch.ops._C.concat_mla_q_fp8 (concat fused with static per-tensor
            float8_e4m3fn quantization; bf16 inputs by default). Contenders: ours; "cat+quant", eager
            torch (cat into a temporary, then reciprocal, mul, clamp_, copy_ into the fp8 q_out: five
            kernels on preallocated buffers); "compiled-dyn", the reference under torch.compile with
            the token dim of both inputs marked dynamic (how vLLM compiles it; at 1 token a hint
            only, since Dynamo specializes size 1), compiled first at the sweep's largest token
            count (Inductor tunes its kernel to the sizes it first compiles for);
            "compiled-static", the same with dynamic=False (one compile per shape); and the
            ceiling dst_fp8.copy_(src) over numel(q_out) contiguous elements (reads 2 bytes, writes
            1 byte each: an SM conversion kernel, also in a graph).
            Each case is checked first: ours and every baseline must equal the reference
            (torch.cat(...).float() * scale.reciprocal()).clamp(-448, 448).to(torch.float8_e4m3fn)
            byte for byte, up to the sign of a NaN; if ours differs the case is FAIL and not timed,
            if only a baseline does it is BASE! and still timed; either makes the exit status 1.
            GB/s counts numel(q_out) * (element_size + 1). Compiled contenders compile on first use
            (in the check, before any graph capture), with fresh Dynamo caches per (dtype, layout,
            heads); on CPU they are skipped unless --fp8-compiled yes. Files: fp8_sweep_<device>.*
            (the columns speedup_vs_<baseline> = baseline time / contender time).

Layouts (inputs are [tokens, heads, width])
  contiguous  ql_nope and q_pe contiguous.
  decode      what MLA decode hands over: ql_nope = torch.empty(H, T, N).transpose(0, 1) (a
              transposed bmm output), q_pe = q[..., 128:128+R], a split view of q = [T, H, 128+R].
  q_out is contiguous and preallocated in both. Inputs are random (never zeros).

Correctness
  Before any timing each case is checked once: q_out is poisoned (every int16 word 0xFFFF, a NaN in
  fp16 and bf16 that randn never yields), each contender that writes q_out runs, and q_out viewed as
  int16 must equal torch.cat's result viewed as int16. A failing case is reported as FAIL, is not
  timed, and makes the tool exit with status 1.

Timing (CUDA)
  graph     Kernel time with L2 warm for sizes that fit it. One CUDA graph holds 100 back-to-back
            calls on the same buffers (warmed up on a side stream before capture); after a few warm-up
            replays, many replays are timed one by one with CUDA events and the per-call time is the
            median replay time / 100. Capturing 100 calls amortises the graph launch: a graph of a
            single call timed with events reads about 15 us whatever the size, which hides the kernel.
  do_bench  triton.testing.do_bench(fn, return_mode="median"): one eager call per sample with L2
            flushed in between (L2 cold). Skipped when triton is not installed.
  host      Launch cost for engines that do not capture graphs: 10,000 back-to-back eager calls
            with no synchronisation in between (one sync before the clock starts). "host" is the
            time read before the final sync, "wall" after it; wall close to host means the GPU, not
            the host, was the bottleneck (the launch queue filled and throttled the host).
Timing (CPU)
  perf_counter  median over 7 repeats; each repeat is a loop of calls sized to take ~20 ms.

Ceiling
  An SM-driven copy of the same byte count: torch.bitwise_not(src, out=dst) over contiguous int16
  tensors of numel(q_out) elements (reads and writes numel * 2 bytes, like the concat). A plain
  copy_ is not used: inside a CUDA graph it becomes a memcpy node, slower than an SM copy, which
  would put a slow kernel above 100%. "% ceil" = ceiling_time / time * 100, from the same run and
  timing method; "x cat" = cat_time / our_time. GB/s counts bytes read + written:
  2 * numel(q_out) * element_size.

Output
  The tables are printed at the end (one per timing method, then the host table); the header records
  the device name, torch / CUDA / triton versions, UTC time and the command line. Files in --out:
  {main,sweep}_{cpu,cuda}.csv and .json (one row per case x method x contender, every number; the
  JSON adds the header data and the host table) and, for the sweep when matplotlib is installed,
  sweep_<device>_<method>_<dtype>.png (per layout/heads: % of ceiling and us vs tokens).

Contenders are a list of named callables (CONTENDERS for concat_mla_q, FP8_CONTENDERS for --fp8,
which has its own byte count and ceiling); adding one is a new entry there.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

try:
    import vllm_mla_ops  # noqa: F401  (loads the extension: registers torch.ops._C.concat_mla_q)
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(f"benchmark: cannot import vllm_mla_ops ({exc}); build it first: "
             "pip install --no-build-isolation -e .")

REPO = Path(__file__).resolve().parent.parent

# -- constants ----------------------------------------------------------------------------------

QK_NOPE_DIM = 128  # DeepSeek-V3: q per head is [qk_nope 128 | qk_rope R]; q_pe is its rope part
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = ("contiguous", "decode")
POISON = -1  # int16 0xFFFF: NaN in fp16 and bf16

OURS, CAT, CEILING = "ours", "cat", "ceiling"

GRAPH_CALLS = 100            # calls captured in one graph
GRAPH_SIDE_WARMUP = 3        # eager calls on a side stream before capture
GRAPH_WARMUP_REPLAYS = 3     # warm-up replays; their median only sizes the measured run
GRAPH_MIN_REPLAYS, GRAPH_MAX_REPLAYS = 5, 200
GRAPH_BUDGET_S = 0.25        # replays timed per measurement ~ this much GPU time
DO_BENCH_WARMUP_MS, DO_BENCH_REP_MS = 25, 100
CPU_REPEATS, CPU_REPEAT_S = 7, 0.02
HOST_WARMUP_CALLS = 100

SWEEP_DEFAULTS = {  # device type -> defaults of the full sweep
    "cuda": {"dtypes": ["bf16", "fp16"], "tokens": [1, 4, 16, 64, 256, 1024, 4096, 16384]},
    "cpu": {"dtypes": ["bf16"], "tokens": [1, 16, 64, 256, 1024]},
}
MAIN_HEADS = 128
MAIN_DECODE_TOKENS = [1, 16, 64]
MAIN_PREFILL_TOKENS = {"cuda": [1024, 4096], "cpu": [256, 1024]}

# -- cases and inputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    dtype: str
    layout: str
    heads: int
    tokens: int
    nope: int
    rope: int

    @property
    def out_numel(self) -> int:
        return self.tokens * self.heads * (self.nope + self.rope)

    @property
    def bytes_moved(self) -> int:
        """Bytes read + written by one call: the inputs once, q_out once."""
        return 2 * self.out_numel * DTYPES[self.dtype].itemsize

    def label(self) -> str:
        return f"{self.dtype} {self.layout} heads={self.heads} tokens={self.tokens}"


@dataclass
class Inputs:
    ql_nope: torch.Tensor
    q_pe: torch.Tensor
    q_out: torch.Tensor


def make_inputs(layout: str, tokens: int, heads: int, nope: int, rope: int, dtype: torch.dtype,
                device: torch.device) -> Inputs:
    """Random inputs in the given layout and a contiguous, uninitialised q_out."""
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=dtype, device=device)

    if layout == "contiguous":
        ql_nope, q_pe = randn(tokens, heads, nope), randn(tokens, heads, rope)
    elif layout == "decode":
        ql_nope = randn(heads, tokens, nope).transpose(0, 1)        # transposed bmm output
        q_pe = randn(tokens, heads, QK_NOPE_DIM + rope)[..., QK_NOPE_DIM:]  # split view of q
    else:
        raise ValueError(f"unknown layout {layout!r}")
    q_out = torch.empty(tokens, heads, nope + rope, dtype=dtype, device=device)
    return Inputs(ql_nope, q_pe, q_out)


def case_inputs(case: Case, device: torch.device) -> Inputs:
    return make_inputs(case.layout, case.tokens, case.heads, case.nope, case.rope,
                       DTYPES[case.dtype], device)

# -- contenders ---------------------------------------------------------------------------------

Fn = Callable[[], object]


@dataclass(frozen=True)
class Contender:
    """A named way to produce q_out; ``bind`` turns a case's inputs into a no-argument call."""
    name: str
    doc: str
    bind: Callable[[Inputs], Fn]
    writes_q_out: bool = True  # checked bit-exact against torch.cat before timing


def _bind_ours(x: Inputs) -> Fn:
    return partial(torch.ops._C.concat_mla_q, x.ql_nope, x.q_pe, x.q_out)


def _bind_cat(x: Inputs) -> Fn:
    return partial(torch.cat, (x.ql_nope, x.q_pe), dim=-1, out=x.q_out)


def _bind_slice(x: Inputs) -> Fn:
    nope = x.ql_nope.shape[-1]

    def run() -> None:
        x.q_out[..., :nope].copy_(x.ql_nope)
        x.q_out[..., nope:].copy_(x.q_pe)
    return run


def _bind_ceiling(x: Inputs) -> Fn:
    # Same bytes as the concat of 16-bit dtypes: numel(q_out) int16 words read and written.
    # (A quantising op writes fewer bytes than it reads and will need its own ceiling.)
    numel = x.q_out.numel()
    src = torch.randint(-2**15, 2**15, (numel,), dtype=torch.int16, device=x.q_out.device)
    return partial(torch.bitwise_not, src, out=torch.empty_like(src))


CONTENDERS: tuple[Contender, ...] = (
    Contender(OURS, "torch.ops._C.concat_mla_q(ql_nope, q_pe, q_out)", _bind_ours),
    Contender(CAT, "torch.cat((ql_nope, q_pe), dim=-1, out=q_out)", _bind_cat),
    Contender("slice", "q_out[..., :N].copy_(ql_nope); q_out[..., N:].copy_(q_pe)", _bind_slice),
    Contender(CEILING, "torch.bitwise_not(src, out=dst), int16, numel(q_out) each", _bind_ceiling,
              writes_q_out=False),
)
MAIN_CONTENDERS = (OURS, CAT)
HOST_CONTENDERS = (OURS, CAT, "slice")


def pick(names: Iterable[str]) -> list[Contender]:
    wanted = set(names)
    return [c for c in CONTENDERS if c.name in wanted]

# -- correctness --------------------------------------------------------------------------------


def verify(x: Inputs, contenders: Sequence[Contender]) -> list[str]:
    """Runs each q_out-writing contender once on a poisoned q_out; returns failure messages."""
    expected = torch.cat((x.ql_nope, x.q_pe), dim=-1).view(torch.int16)
    out = x.q_out.view(torch.int16)
    failures = []
    for c in contenders:
        if not c.writes_q_out:
            continue
        out.fill_(POISON)
        try:
            c.bind(x)()
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            failures.append(f"{c.name} raised {type(exc).__name__}: {exc}")
            continue
        if not torch.equal(out, expected):
            bad = int((out != expected).sum())
            failures.append(f"{c.name} differs from torch.cat in {bad} of {out.numel()} elements")
    return failures

# -- timers (seconds per call) ------------------------------------------------------------------


def _replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> list[float]:
    """Times each replay with its own pair of events; one sync at the end."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def time_graph(fn: Fn) -> float:
    """Median replay time of a CUDA graph of GRAPH_CALLS back-to-back calls, / GRAPH_CALLS."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture requires
        for _ in range(GRAPH_SIDE_WARMUP):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    estimate_ms = statistics.median(_replay_ms(graph, GRAPH_WARMUP_REPLAYS))
    replays = int(GRAPH_BUDGET_S * 1e3 / max(estimate_ms, 1e-6))
    replays = max(GRAPH_MIN_REPLAYS, min(GRAPH_MAX_REPLAYS, replays))
    replay_ms = statistics.median(_replay_ms(graph, replays))
    graph.reset()
    return replay_ms * 1e-3 / GRAPH_CALLS


def time_do_bench(fn: Fn) -> float:
    from triton.testing import do_bench
    ms = do_bench(fn, warmup=DO_BENCH_WARMUP_MS, rep=DO_BENCH_REP_MS, return_mode="median")
    return float(ms) * 1e-3


def time_cpu(fn: Fn) -> float:
    """Median over CPU_REPEATS of (loop of calls sized to ~CPU_REPEAT_S) / calls."""
    fn()
    start = time.perf_counter()
    fn()
    loops = max(1, int(CPU_REPEAT_S / max(time.perf_counter() - start, 1e-9)))
    samples = []
    for _ in range(CPU_REPEATS):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        samples.append((time.perf_counter() - start) / loops)
    return statistics.median(samples)


def time_host(fn: Fn, calls: int) -> tuple[float, float]:
    """(host, wall) seconds per eager call over ``calls`` back-to-back calls, no sync in between."""
    for _ in range(HOST_WARMUP_CALLS):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return host / calls, wall / calls


@dataclass(frozen=True)
class Method:
    name: str
    doc: str
    timer: Callable[[Fn], float]


METHOD_GRAPH = Method("graph", f"CUDA graph of {GRAPH_CALLS} calls, median replay / "
                      f"{GRAPH_CALLS} (kernel only; L2 warm where buffers fit)", time_graph)
METHOD_DO_BENCH = Method("do_bench", "triton.testing.do_bench median (L2 flushed between calls)",
                         time_do_bench)
METHOD_CPU = Method("perf_counter", f"time.perf_counter, median of {CPU_REPEATS} repeats of a "
                    f"~{CPU_REPEAT_S * 1e3:.0f} ms loop of calls", time_cpu)


def have_triton() -> bool:
    try:
        import triton.testing  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no do_bench column
        return False
    return True


def methods_for(device: torch.device, main: bool) -> list[Method]:
    if device.type != "cuda":
        return [METHOD_CPU]
    if main or not have_triton():
        return [METHOD_GRAPH]
    return [METHOD_GRAPH, METHOD_DO_BENCH]

# -- running ------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    case: Case
    failures: list[str]
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> contender -> s

    @property
    def ok(self) -> bool:
        return not self.failures

    def us(self, method: str, name: str) -> float | None:
        s = self.seconds.get(method, {}).get(name)
        return None if s is None else s * 1e6

    def gbps(self, method: str, name: str) -> float | None:
        s = self.seconds.get(method, {}).get(name)
        return None if not s else self.case.bytes_moved / s / 1e9

    def ratio(self, method: str, num: str, den: str) -> float | None:
        """seconds[num] / seconds[den]: ceiling/x is x's fraction of the ceiling, cat/ours a speedup."""
        times = self.seconds.get(method, {})
        if times.get(num) is None or not times.get(den):
            return None
        return times[num] / times[den]

    def pct_ceiling(self, method: str, name: str) -> float | None:
        r = self.ratio(method, CEILING, name)
        return None if r is None else 100 * r


def run_case(case: Case, contenders: Sequence[Contender], methods: Sequence[Method],
             device: torch.device) -> CaseResult:
    x = case_inputs(case, device)
    result = CaseResult(case, verify(x, contenders))
    if result.ok:
        result.seconds = time_contenders(x, contenders, methods)
    del x
    release_cached_memory(device)
    return result


def time_contenders(x: Inputs, contenders: Sequence[Contender],
                    methods: Sequence[Method]) -> dict[str, dict[str, float]]:
    """{method: {contender: seconds per call}} over one case's inputs."""
    return {m.name: {c.name: m.timer(c.bind(x)) for c in contenders} for m in methods}


def release_cached_memory(device: torch.device) -> None:
    """Between cases: the next case's buffers should not inherit this one's cached blocks."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_cases(cases: Sequence[Case], contenders: Sequence[Contender], methods: Sequence[Method],
              device: torch.device, runner: Callable[..., CaseResult] | None = None,
              status: Callable[[CaseResult], str] | None = None) -> list[CaseResult]:
    results = []
    for i, case in enumerate(cases, 1):
        result = (runner or run_case)(case, contenders, methods, device)
        summary = ", ".join(f"{m.name} {_fmt_us(result.us(m.name, OURS))} us" for m in methods)
        timed = bool(result.seconds)
        state = status(result) if status else ("PASS" if result.ok else "FAIL")
        print(f"[{i:>{len(str(len(cases)))}}/{len(cases)}] {case.label():<48} {state}"
              + (f"  ours: {summary}" if timed else ""), flush=True)
        for msg in result.failures:
            print(f"    FAIL: {msg}", file=sys.stderr, flush=True)
        results.append(result)
    return results


@dataclass
class HostResult:
    case: Case
    contender: str
    host_us: float
    wall_us: float


def run_host(cases: Sequence[Case], calls: int, device: torch.device,
             contenders: Sequence[Contender] | None = None,
             inputs: Callable[[Case, torch.device], Any] | None = None) -> list[HostResult]:
    out = []
    for case in cases:
        x = (inputs or case_inputs)(case, device)
        for c in (pick(HOST_CONTENDERS) if contenders is None else contenders):
            host, wall = time_host(c.bind(x), calls)
            out.append(HostResult(case, c.name, host * 1e6, wall * 1e6))
        del x
    return out

# -- reporting ----------------------------------------------------------------------------------


def _fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _is_number(cell: str) -> bool:
    try:
        float(cell.rstrip("x%"))
    except ValueError:
        return cell == "-"
    return True


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Markdown table with fixed-width columns: numeric columns right-aligned, text left-aligned."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in rows) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w)
                                 for c, w, num in zip(cells, widths, numeric)) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" if num else "-" * (w + 2)
                          for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), rule] + [line(r) for r in rows])


def sweep_table(results: Sequence[CaseResult], method: str, contenders: Sequence[str]) -> str:
    baselines = [n for n in contenders if n not in (OURS, CEILING)]
    has_ceiling = CEILING in contenders
    headers = ["dtype", "layout", "heads", "tokens", "check", "ours us", "GB/s"]
    headers += ["% ceil"] * has_ceiling + ["x cat"]
    for name in baselines:
        headers += [f"{name} us"] + [f"{name} %ceil"] * has_ceiling
    headers += ["ceil us", "ceil GB/s"] * has_ceiling
    rows = []
    for r in results:
        c = r.case
        row = [c.dtype, c.layout, str(c.heads), str(c.tokens), "PASS" if r.ok else "FAIL",
               _fmt_us(r.us(method, OURS)), _fmt(r.gbps(method, OURS), ".0f")]
        row += [_fmt(r.pct_ceiling(method, OURS), ".0f", "%")] * has_ceiling
        row += [_fmt(r.ratio(method, CAT, OURS), ".2f", "x")]
        for name in baselines:
            row += [_fmt_us(r.us(method, name))]
            row += [_fmt(r.pct_ceiling(method, name), ".0f", "%")] * has_ceiling
        if has_ceiling:
            row += [_fmt_us(r.us(method, CEILING)), _fmt(r.gbps(method, CEILING), ".0f")]
        rows.append(row)
    return format_table(headers, rows)


def main_table(results: Sequence[CaseResult], method: str) -> str:
    headers = ["phase", "layout", "tokens", "check", "ours us", "ours GB/s", "cat us", "cat GB/s",
               "speedup"]
    rows = []
    for r in results:
        c = r.case
        rows.append([
            "decode" if c.layout == "decode" else "prefill", c.layout, str(c.tokens),
            "PASS" if r.ok else "FAIL",
            _fmt_us(r.us(method, OURS)), _fmt(r.gbps(method, OURS), ".1f"),
            _fmt_us(r.us(method, CAT)), _fmt(r.gbps(method, CAT), ".1f"),
            _fmt(r.ratio(method, CAT, OURS), ".2f", "x"),
        ])
    return format_table(headers, rows)


def host_table(results: Sequence[HostResult]) -> str:
    headers = ["dtype", "layout", "heads", "tokens", "contender", "host us/call", "wall us/call"]
    rows = [[h.case.dtype, h.case.layout, str(h.case.heads), str(h.case.tokens), h.contender,
             _fmt_us(h.host_us), _fmt_us(h.wall_us)] for h in results]
    return format_table(headers, rows)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty" if dirty else "")


def collect_meta(device: torch.device, methods: Sequence[Method],
                 contenders: Sequence[Contender]) -> dict[str, Any]:
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"{_cpu_name()} ({torch.get_num_threads()} torch threads)"
    triton_version = None
    if have_triton():
        import triton
        triton_version = triton.__version__
    argv = getattr(sys, "orig_argv", [sys.executable] + sys.argv)
    return {
        "utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join(argv),
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "git": _git_revision(),
        "bytes_per_call": "2 * numel(q_out) * element_size (inputs read + q_out written)",
        "methods": {m.name: m.doc for m in methods},
        "contenders": {c.name: c.doc for c in contenders},
    }


def print_meta(meta: dict[str, Any], title: str = "concat_mla_q") -> None:
    print(f"# {title} benchmark  {meta['utc']}")
    print(f"# command: {meta['command']}")
    print(f"# device: {meta['device_name']} ({meta['device']}); torch {meta['torch']}, "
          f"CUDA {meta['cuda']}, triton {meta['triton']}, python {meta['python']}, "
          f"git {meta['git']}")
    for name, doc in meta["methods"].items():
        print(f"# timing {name}: {doc}")
    print(f"# GB/s counts {meta['bytes_per_call']}", flush=True)


def result_rows(results: Sequence[CaseResult], baselines: Sequence[str] = (CAT,),
                status: Callable[[CaseResult], str] = lambda r: "PASS" if r.ok else "FAIL",
                ) -> list[dict[str, Any]]:
    """One flat row per case x method x contender (untimed cases: one row, no timings), with each
    contender's speedup over each baseline (baseline s / its s)."""
    rows = []
    for r in results:
        base = {**asdict(r.case), "bytes": r.case.bytes_moved, "check": status(r)}
        if not r.seconds:
            rows.append({**base, "method": None, "contender": None})
        for method, times in r.seconds.items():
            for name in times:
                rows.append({**base, "method": method, "contender": name,
                             "us": r.us(method, name), "gbps": r.gbps(method, name),
                             "pct_ceiling": r.pct_ceiling(method, name),
                             **{f"speedup_vs_{n}": r.ratio(method, n, name) for n in baselines}})
    return rows


def write_files(out_dir: Path, tag: str, meta: dict[str, Any], results: Sequence[CaseResult],
                host: Sequence[HostResult], rows: list[dict[str, Any]] | None = None,
                fields: Sequence[str] | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result_rows(results) if rows is None else rows
    csv_path, json_path = out_dir / f"{tag}.csv", out_dir / f"{tag}.json"
    fields = fields or ["dtype", "layout", "heads", "tokens", "nope", "rope", "bytes", "check", "method",
                        "contender", "us", "gbps", "pct_ceiling", "speedup_vs_cat"]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    payload = {
        "meta": meta,
        "results": rows,
        "failures": {r.case.label(): r.failures for r in results if not r.ok},
        "host": [{**asdict(h.case), "contender": h.contender, "host_us": h.host_us,
                  "wall_us": h.wall_us} for h in host],
    }
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    return [csv_path, json_path]


def write_plots(out_dir: Path, tag: str, results: Sequence[CaseResult],
                methods: Sequence[Method], contenders: Sequence[str],
                title: str = "concat_mla_q") -> list[Path]:
    """Per method and dtype, one PNG: a column per (layout, heads); top row % of ceiling vs tokens,
    bottom row us per call vs tokens; log x."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no PNG plot written")
        return []
    paths = []
    lines = [n for n in contenders if n != CEILING]
    for method in methods:
        for dtype in sorted({r.case.dtype for r in results}):
            ok = [r for r in results if r.seconds and r.case.dtype == dtype and method.name in r.seconds]
            panels = sorted({(r.case.layout, r.case.heads) for r in ok})
            if not panels:
                continue
            fig, axes = plt.subplots(2, len(panels), figsize=(4.5 * len(panels), 7.5),
                                     squeeze=False, sharex=True)
            for col, (layout, heads) in enumerate(panels):
                sel = sorted((r for r in ok if (r.case.layout, r.case.heads) == (layout, heads)),
                             key=lambda r: r.case.tokens)
                tokens = [r.case.tokens for r in sel]
                top, bottom = axes[0][col], axes[1][col]
                for name in lines:
                    if CEILING in contenders:
                        top.plot(tokens, [r.pct_ceiling(method.name, name) for r in sel],
                                 marker="o", label=name)
                    bottom.plot(tokens, [r.us(method.name, name) for r in sel], marker="o", label=name)
                if CEILING in contenders:
                    bottom.plot(tokens, [r.us(method.name, CEILING) for r in sel], "k--",
                                label=CEILING)
                top.axhline(100, color="k", linestyle="--", linewidth=0.8)
                top.set_title(f"{layout}, {heads} heads")
                top.set_ylabel("% of ceiling")
                bottom.set_ylabel("us per call")
                bottom.set_xlabel("tokens")
                bottom.set_yscale("log")
                for ax in (top, bottom):
                    ax.set_xscale("log")
                    ax.grid(True, which="both", alpha=0.3)
                top.legend(fontsize=8)
                bottom.legend(fontsize=8)
            fig.suptitle(f"{title}, {dtype}, {method.name}: {method.doc}", fontsize=9)
            fig.tight_layout()
            path = out_dir / f"{tag}_{method.name}_{dtype}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths

# -- fp8 mode: concat_mla_q_fp8 (--fp8) ----------------------------------------------------------
# The same machinery for the fused concat + static per-tensor float8_e4m3fn quantization. Its
# contract is the reference below, bit for bit (up to the sign of a NaN), so every contender that
# produces q_out is checked against it; the bytes moved are numel(q_out) * (element_size + 1).

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
CAT_QUANT, COMPILED_DYNAMIC, COMPILED_STATIC = "cat+quant", "compiled-dyn", "compiled-static"
FP8_BASELINES = (CAT_QUANT, COMPILED_DYNAMIC, COMPILED_STATIC)
FP8_SWEEP_DEFAULTS = {
    "cuda": {"dtypes": ["bf16"], "tokens": [1, 16, 64, 256, 1024, 4096, 16384]},
    "cpu": {"dtypes": ["bf16"], "tokens": [1, 16, 64, 256]},
}
FP8_RECOMPILE_LIMIT = 64  # compiled-static compiles once per token count of a (dtype, layout, heads)
FP8_BYTES_DOC = "numel(q_out) * (element_size + 1) (inputs read once, float8 q_out written once)"
FP8_POISON = 0x7F  # e4m3fn NaN, which the finite random inputs never yield


class Fp8Case(Case):
    """A Case of the fp8 op: same fields (and CSV/JSON columns), fp8 byte count."""

    @property
    def bytes_moved(self) -> int:
        return self.out_numel * (DTYPES[self.dtype].itemsize + 1)

    def label(self) -> str:
        return f"{self.dtype}->fp8 {self.layout} heads={self.heads} tokens={self.tokens}"


@dataclass
class Fp8Inputs(Inputs):
    """q_out is float8_e4m3fn and contiguous."""
    scale: torch.Tensor  # float32, one element, on the device


def fp8_reference(ql_nope: torch.Tensor, q_pe: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The contract: vLLM's static per-tensor QuantFP8.forward_native applied to torch.cat."""
    return (torch.cat((ql_nope, q_pe), -1).float() * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


# Two textually separate copies of the reference, so the two compiled forms get their own code
# objects and Dynamo caches (torch.compile of one function object twice would share its cache).
def _reference_for_dynamic(ql_nope: torch.Tensor, q_pe: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (torch.cat((ql_nope, q_pe), -1).float() * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _reference_for_static(ql_nope: torch.Tensor, q_pe: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (torch.cat((ql_nope, q_pe), -1).float() * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


def _compiled(kind: str) -> Callable[..., torch.Tensor]:
    """torch.compile'd reference, created once: "dynamic" (default dynamic=None; the caller marks
    the token dim dynamic, as vLLM does) or "static" (dynamic=False: one compile per shape)."""
    if kind not in _COMPILED:
        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # the newer name, then the older one
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), FP8_RECOMPILE_LIMIT))
                break
        if kind == "dynamic":
            _COMPILED[kind] = torch.compile(_reference_for_dynamic)
        else:
            _COMPILED[kind] = torch.compile(_reference_for_static, dynamic=False)
    return _COMPILED[kind]


def fp8_inputs(case: Case, device: torch.device) -> Fp8Inputs:
    """The case's random inputs (layout as in the bf16 sweep), a contiguous float8 q_out and a
    calibrated static scale: max |input| / 448, so the outputs span e4m3's range."""
    x = case_inputs(case, device)
    q_out = torch.empty(x.q_out.shape, dtype=FP8_DTYPE, device=device)
    amax = torch.maximum(x.ql_nope.abs().amax(), x.q_pe.abs().amax()).float()
    scale = (amax / FP8_MAX).reshape(1)
    return Fp8Inputs(x.ql_nope, x.q_pe, q_out, scale)


def _bind_fp8_ours(x: Fp8Inputs) -> Fn:
    return partial(torch.ops._C.concat_mla_q_fp8, x.ql_nope, x.q_pe, x.q_out, x.scale)


def _bind_cat_quant(x: Fp8Inputs) -> Fn:
    """Eager torch, 5 kernels on preallocated buffers (graph-capturable): cat into a 16-bit
    temporary, 1 / scale, multiply in float32 (bf16/fp16 * float32 promotes to float32: the bits of
    tmp.float() * r), clamp in place, and the float32 -> e4m3fn conversion into q_out."""
    tmp = torch.empty(x.q_out.shape, dtype=x.ql_nope.dtype, device=x.q_out.device)
    wide = torch.empty(x.q_out.shape, dtype=torch.float32, device=x.q_out.device)
    recip = torch.empty_like(x.scale)

    def run() -> torch.Tensor:
        torch.cat((x.ql_nope, x.q_pe), -1, out=tmp)
        torch.reciprocal(x.scale, out=recip)
        torch.mul(tmp, recip, out=wide)
        wide.clamp_(-FP8_MAX, FP8_MAX)
        return x.q_out.copy_(wide)
    return run


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A new tensor object over t's memory: Dynamo's marks live on the Python object, so the
    dynamic contender's marks never reach the tensors the static one is called with."""
    return t.as_strided(t.size(), t.stride(), t.storage_offset())


def _bind_compiled_dynamic(x: Fp8Inputs) -> Fn:
    ql_nope, q_pe = _alias(x.ql_nope), _alias(x.q_pe)
    # Dynamo specializes sizes 0 and 1, and mark_dynamic of a dim it specializes is an error, so
    # at 1 token the mark is a hint (a 1-token specialization is compiled).
    mark = torch._dynamo.mark_dynamic if ql_nope.shape[0] >= 2 else torch._dynamo.maybe_mark_dynamic
    mark(ql_nope, 0)
    mark(q_pe, 0)
    return partial(_compiled("dynamic"), ql_nope, q_pe, x.scale)


def _bind_compiled_static(x: Fp8Inputs) -> Fn:
    return partial(_compiled("static"), x.ql_nope, x.q_pe, x.scale)


def _bind_fp8_ceiling(x: Fp8Inputs) -> Fn:
    # numel(q_out) 16-bit elements read, numel(q_out) bytes written: an SM conversion kernel (a
    # dtype-converting copy_ is a kernel in a CUDA graph, not a memcpy node).
    numel = x.q_out.numel()
    src = torch.randn(numel, dtype=x.ql_nope.dtype, device=x.q_out.device)
    return partial(torch.empty(numel, dtype=FP8_DTYPE, device=x.q_out.device).copy_, src)


FP8_CONTENDERS: tuple[Contender, ...] = (
    Contender(OURS, "torch.ops._C.concat_mla_q_fp8(ql_nope, q_pe, q_out, scale)", _bind_fp8_ours),
    Contender(CAT_QUANT, "eager: torch.cat(out=tmp); torch.reciprocal(scale, out=r); "
              "torch.mul(tmp, r, out=f32); f32.clamp_(-448, 448); q_out.copy_(f32)", _bind_cat_quant),
    Contender(COMPILED_DYNAMIC, "torch.compile(reference), token dim marked dynamic on both inputs "
              "(torch._dynamo.mark_dynamic(x, 0); maybe_mark_dynamic at 1 token)", _bind_compiled_dynamic),
    Contender(COMPILED_STATIC, "torch.compile(reference, dynamic=False), one compile per shape",
              _bind_compiled_static),
    Contender(CEILING, "dst_fp8.copy_(src), src numel(q_out) of the input dtype, contiguous",
              _bind_fp8_ceiling, writes_q_out=False),
)


def fp8_mismatches(actual: torch.Tensor, expected: torch.Tensor) -> int:
    """Elements whose bytes differ, where a NaN (byte & 0x7f == 0x7f) matches a NaN of either sign."""
    a, e = actual.view(torch.uint8), expected.view(torch.uint8)
    if a.shape != e.shape:
        return e.numel()
    nan_e, nan_a = (e & 0x7F) == 0x7F, (a & 0x7F) == 0x7F
    return int(((nan_e != nan_a) | (~nan_e & (a != e))).sum())


def verify_fp8(x: Fp8Inputs, contenders: Sequence[Contender]) -> dict[str, str]:
    """Runs each checked contender once (q_out poisoned first); {name: failure} for those that
    raised or differ from fp8_reference. The first call of a compiled contender compiles it."""
    expected = fp8_reference(x.ql_nope, x.q_pe, x.scale)
    failures = {}
    for c in contenders:
        if not c.writes_q_out:
            continue
        x.q_out.view(torch.uint8).fill_(FP8_POISON)
        try:
            out = c.bind(x)()
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            failures[c.name] = f"{c.name} raised {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
            continue
        out = out if isinstance(out, torch.Tensor) else x.q_out
        bad = fp8_mismatches(out, expected)
        if bad:
            failures[c.name] = f"{c.name} differs from the reference in {bad} of {expected.numel()} elements"
    return failures


_fp8_group: tuple | None = None


def _reset_fp8_compiles() -> None:
    global _fp8_group
    torch._dynamo.reset()
    _fp8_group = None


def run_fp8_case(case: Case, contenders: Sequence[Contender], methods: Sequence[Method],
                 device: torch.device, first_compile_tokens: int = 0) -> CaseResult:
    """Checks, then times. A case whose op differs from the reference is not timed; a baseline
    that differs is still timed (and reported); one that raised is left out. compiled-dyn is
    compiled first at first_compile_tokens tokens (when 2 or more) of each (dtype, layout, heads)
    group: Inductor tunes its kernel to the sizes it first compiles for."""
    global _fp8_group
    group = (case.dtype, case.layout, case.heads)
    if group != _fp8_group:  # fresh Dynamo caches per (dtype, layout, heads): no stale recompiles
        _reset_fp8_compiles()
        _fp8_group = group
        if first_compile_tokens >= 2 and any(c.name == COMPILED_DYNAMIC for c in contenders):
            first = fp8_inputs(replace(case, tokens=first_compile_tokens), device)
            _bind_compiled_dynamic(first)()
            del first
    x = fp8_inputs(case, device)
    failures = verify_fp8(x, contenders)
    result = CaseResult(case, list(failures.values()))
    if OURS not in failures:
        timed = [c for c in contenders if not failures.get(c.name, "").startswith(f"{c.name} raised")]
        result.seconds = time_contenders(x, timed, methods)
    del x
    release_cached_memory(device)
    return result


def fp8_status(r: CaseResult) -> str:
    """PASS; FAIL (the op differs: not timed); BASE! (only a baseline differs or raised)."""
    if r.ok:
        return "PASS"
    return "BASE!" if r.seconds else "FAIL"


def fp8_table(results: Sequence[CaseResult], method: str, contenders: Sequence[str]) -> str:
    baselines = [n for n in FP8_BASELINES if n in contenders]
    has_ceiling = CEILING in contenders
    headers = ["dtype", "layout", "heads", "tokens", "check", "ours us", "GB/s"]
    headers += ["% ceil"] * has_ceiling + [f"x {n}" for n in baselines] + [f"{n} us" for n in baselines]
    headers += ["ceil us", "ceil GB/s"] * has_ceiling
    rows = []
    for r in results:
        c = r.case
        row = [c.dtype, c.layout, str(c.heads), str(c.tokens), fp8_status(r),
               _fmt_us(r.us(method, OURS)), _fmt(r.gbps(method, OURS), ".0f")]
        row += [_fmt(r.pct_ceiling(method, OURS), ".0f", "%")] * has_ceiling
        row += [_fmt(r.ratio(method, n, OURS), ".2f", "x") for n in baselines]
        row += [_fmt_us(r.us(method, n)) for n in baselines]
        if has_ceiling:
            row += [_fmt_us(r.us(method, CEILING)), _fmt(r.gbps(method, CEILING), ".0f")]
        rows.append(row)
    return format_table(headers, rows)


FP8_FIELDS = ["dtype", "layout", "heads", "tokens", "nope", "rope", "bytes", "check", "method", "contender",
              "us", "gbps", "pct_ceiling"] + [f"speedup_vs_{n}" for n in FP8_BASELINES]


def main_fp8(args: argparse.Namespace, device: torch.device) -> int:
    methods = methods_for(device, main=False)
    compiled = args.fp8_compiled == "yes" or (args.fp8_compiled == "auto" and device.type == "cuda")
    contenders = [c for c in FP8_CONTENDERS
                  if compiled or c.name not in (COMPILED_DYNAMIC, COMPILED_STATIC)]
    names = [c.name for c in contenders]
    cases = sweep_cases(args, device, FP8_SWEEP_DEFAULTS, Fp8Case)

    meta = collect_meta(device, methods, contenders)
    meta["op"] = "concat_mla_q_fp8"
    meta["bytes_per_call"] = FP8_BYTES_DOC
    meta["reference"] = ("(torch.cat((ql_nope, q_pe), -1).float() * scale.reciprocal()).clamp(-448, 448)"
                         ".to(torch.float8_e4m3fn), bytes equal up to the sign of a NaN")
    meta["scale"] = "max |input| / 448, float32 [1] on the device"
    print_meta(meta, title="concat_mla_q_fp8")
    print(f"# check: {meta['reference']}")
    if not compiled:
        print(f"note: compiled contenders ({COMPILED_DYNAMIC}, {COMPILED_STATIC}) skipped on {device.type}: "
              "Inductor's C++ build per shape is slow there; --fp8-compiled yes includes them")
    if device.type == "cuda" and METHOD_DO_BENCH not in methods:
        print("note: triton is not installed; no do_bench column")
    start = time.perf_counter()
    # compiled-dyn first compiles at the sweep's largest token count, as in an engine whose first
    # (profiling) pass runs its largest batch; first compiled at 16 tokens instead, the same
    # function ran 1.7x slower at 1024+ tokens on the H100 (docs/perf-notes.md).
    runner = partial(run_fp8_case, first_compile_tokens=max(c.tokens for c in cases))
    results = run_cases(cases, contenders, methods, device, runner=runner, status=fp8_status)

    host: list[HostResult] = []
    if device.type == "cuda" and args.host_calls > 0:
        _reset_fp8_compiles()
        host_contenders = [c for c in contenders if c.name != CEILING]
        host = run_host(host_cases(cases), args.host_calls, device, contenders=host_contenders,
                        inputs=fp8_inputs)

    print()
    for method in methods:
        print(f"## {method.name}: {method.doc}")
        print(fp8_table(results, method.name, names))
        print()
    if host:
        print(f"## host time per eager call: {args.host_calls} back-to-back calls, one sync before "
              "the clock starts; host = before the final sync, wall = after it")
        print(host_table(host))
        print()

    tag = f"fp8_sweep_{device.type}"
    written = write_files(args.out, tag, meta, results, host, rows=result_rows(results, FP8_BASELINES, fp8_status), fields=FP8_FIELDS)
    if not args.no_plot:
        written += write_plots(args.out, tag, results, methods, names, title="concat_mla_q_fp8")
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"elapsed {time.perf_counter() - start:.1f} s")

    failed = [r for r in results if not r.ok]
    if failed:
        print(f"FAIL: {len(failed)} of {len(results)} cases have a contender that differs from the "
              "reference or raised:", file=sys.stderr)
        for r in failed:
            for msg in r.failures:
                print(f"  {r.case.label()}: {msg}", file=sys.stderr)
        return 1
    print(f"PASS: all {len(results)} cases bit-exact vs the reference (ours and every baseline)")
    return 0


# -- command line -------------------------------------------------------------------------------


def _list_of(kind: Callable[[str], Any], choices: Sequence[str] | None = None
             ) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            items = [kind(s) for s in text.replace(" ", ",").split(",") if s]
        except ValueError:
            items = []
        if not items or (choices is not None and any(i not in choices for i in items)):
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list{f' of {list(choices)}' if choices else ''}, "
                f"got {text!r}")
        return items
    parse.__name__ = f"list of {kind.__name__}"
    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tools/benchmark.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python tools/benchmark.py --main\n"
               "  python tools/benchmark.py                      # full sweep, best device\n"
               "  python tools/benchmark.py --dtypes bf16 --layouts decode --heads 128 "
               "--tokens 1,16,64\n"
               "  python tools/benchmark.py --device cpu --out /tmp/bench\n"
               "  python tools/benchmark.py --fp8                # fused concat + fp8 quant sweep\n"
               "  python tools/benchmark.py --fp8 --device cpu --tokens 1,16 --heads 16\n")
    p.add_argument("--main", action="store_true",
                   help="DeepSeek-V3 decode/prefill shapes, ours vs torch.cat (ignores --tokens, "
                        "--heads, --layouts; --dtypes defaults to bf16)")
    p.add_argument("--device", default=None,
                   help="cuda, cuda:N or cpu (default: cuda when available, else cpu)")
    p.add_argument("--dtypes", type=_list_of(str, list(DTYPES)), default=None,
                   help="comma-separated, from bf16,fp16 (default: both on CUDA, bf16 on CPU and "
                        "in --main)")
    p.add_argument("--tokens", type=_list_of(int), default=None,
                   help="comma-separated token counts (default CUDA: "
                        f"{','.join(map(str, SWEEP_DEFAULTS['cuda']['tokens']))}; CPU: "
                        f"{','.join(map(str, SWEEP_DEFAULTS['cpu']['tokens']))})")
    p.add_argument("--heads", type=_list_of(int), default=[16, 128],
                   help="comma-separated head counts (default: 16,128)")
    p.add_argument("--layouts", type=_list_of(str, LAYOUTS), default=list(LAYOUTS),
                   help="comma-separated, from contiguous,decode (default: both)")
    p.add_argument("--nope", type=int, default=512, help="ql_nope width (default: 512)")
    p.add_argument("--rope", type=int, default=64, help="q_pe width (default: 64)")
    p.add_argument("--host-calls", type=int, default=10_000,
                   help="eager calls per host-overhead measurement on CUDA; 0 skips it "
                        "(default: 10000)")
    p.add_argument("--out", type=Path, default=Path("bench_out"),
                   help="directory for CSV, JSON and PNG (default: bench_out/)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--seed", type=int, default=0, help="random seed for the inputs (default: 0)")
    p.add_argument("--fp8", action="store_true",
                   help="sweep the fused concat_mla_q_fp8 instead (bf16 inputs by default; CUDA tokens "
                        f"{','.join(map(str, FP8_SWEEP_DEFAULTS['cuda']['tokens']))}, CPU "
                        f"{','.join(map(str, FP8_SWEEP_DEFAULTS['cpu']['tokens']))}); files "
                        "fp8_sweep_<device>.*")
    p.add_argument("--fp8-compiled", choices=("auto", "yes", "no"), default="auto",
                   help="with --fp8: time the torch.compile'd reference (auto: on CUDA only)")
    args = p.parse_args(argv)
    if args.fp8 and args.main:
        p.error("--fp8 has no --main mode; use --fp8 with --tokens/--heads/--layouts")
    if args.nope <= 0 or args.rope <= 0:
        p.error("--nope and --rope must be positive")
    return args


def pick_device(requested: str | None) -> torch.device:
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmark: --device cuda requested but torch.cuda.is_available() is False")
    if device.type not in ("cuda", "cpu"):
        sys.exit(f"benchmark: unsupported device {device}")
    if device.type == "cuda" and device.index is None:  # torch.cuda.set_device needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def main_cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    shapes = [("decode", t) for t in MAIN_DECODE_TOKENS]
    shapes += [("contiguous", t) for t in MAIN_PREFILL_TOKENS[device.type]]
    return [Case(dtype, layout, MAIN_HEADS, tokens, args.nope, args.rope)
            for dtype in (args.dtypes or ["bf16"]) for layout, tokens in shapes]


def sweep_cases(args: argparse.Namespace, device: torch.device, defaults_by_device=SWEEP_DEFAULTS,
                case=Case) -> list[Case]:
    """--dtypes x --layouts x --heads x --tokens, with the device's default dtypes and tokens."""
    defaults = defaults_by_device[device.type]
    return [case(dtype, layout, heads, tokens, args.nope, args.rope)
            for dtype in (args.dtypes or defaults["dtypes"])
            for layout in args.layouts
            for heads in args.heads
            for tokens in (args.tokens or defaults["tokens"])]


def host_cases(cases: Sequence[Case]) -> list[Case]:
    """A 1-token and a 64-token decode case at the largest head count and the first dtype."""
    first = cases[0]
    heads = max(c.heads for c in cases)
    return [Case(first.dtype, "decode", heads, tokens, first.nope, first.rope) for tokens in (1, 64)]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    if args.fp8:
        return main_fp8(args, device)
    methods = methods_for(device, args.main)
    contenders = pick(MAIN_CONTENDERS) if args.main else list(CONTENDERS)
    names = [c.name for c in contenders]
    cases = main_cases(args, device) if args.main else sweep_cases(args, device)

    meta = collect_meta(device, methods, contenders)
    print_meta(meta)
    if device.type == "cuda" and not args.main and METHOD_DO_BENCH not in methods:
        print("note: triton is not installed; no do_bench column")
    start = time.perf_counter()
    results = run_cases(cases, contenders, methods, device)

    host: list[HostResult] = []
    if device.type == "cuda" and not args.main and args.host_calls > 0:
        host = run_host(host_cases(cases), args.host_calls, device)

    print()
    for method in methods:
        print(f"## {method.name}: {method.doc}")
        print(main_table(results, method.name) if args.main else sweep_table(results, method.name, names))
        print()
    if host:
        print(f"## host time per eager call: {args.host_calls} back-to-back calls, one sync before "
              "the clock starts; host = before the final sync, wall = after it")
        print(host_table(host))
        print()

    tag = "main" if args.main else "sweep"
    written = write_files(args.out, f"{tag}_{device.type}", meta, results, host)
    if not args.main and not args.no_plot:
        written += write_plots(args.out, f"{tag}_{device.type}", results, methods, names)
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"elapsed {time.perf_counter() - start:.1f} s")

    failed = [r for r in results if not r.ok]
    if failed:
        print(f"FAIL: {len(failed)} of {len(results)} cases differ from torch.cat:", file=sys.stderr)
        for r in failed:
            for msg in r.failures:
                print(f"  {r.case.label()}: {msg}", file=sys.stderr)
        return 1
    print(f"PASS: all {len(results)} cases bit-exact vs torch.cat")
    return 0


if __name__ == "__main__":
    sys.exit(main())
