"""What the benchmark scripts share: one command line, the correctness gate, interleaved timing with
paired ratios, the same-run ceilings, and tables under the run's metadata.

The timing is the libraries': ``triton.testing.do_bench_cudagraph`` on CUDA (one CUDA graph of
back-to-back calls on fixed buffers, replayed; per call: the median replay over its calls) and
``torch.utils.benchmark.Timer.blocked_autorange`` on CPU. Kept here is what they do not do:

- The gate: before any timing, each contender that produces the op's result runs once on fresh
  random bits with its output poisoned and is compared with vllm_mla_ops.testing's reference, bit
  for bit. A wrong result is printed as FAIL, is not timed, and makes the exit status 1.
- Interleaving: ``rounds`` rounds, each timing every contender of a row once, in turn, so that drift
  (clocks, heat, other processes) hits them alike. A ratio is computed within each round; the table
  shows its median and its lowest and highest round, which is how noisy the run was.
- Ceilings (CUDA): the op's bytes moved by a tuned Triton flat copy and by torch.bitwise_not, in
  the same run.

A script builds a ``Table`` per shape, calls ``measure`` once per row with a function that makes the
row's ``Contender``s (the op with its check, what it replaces, ``ceilings(...)``), then ``report``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import functools
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch

import vllm_mla_ops  # noqa: F401  (registers torch.ops._C.*)

# torch.utils.benchmark imports torch's extension builder, which warns on import when a CUDA build of
# torch finds no CUDA runtime; the timer builds no extension.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils.benchmark import Timer  # noqa: E402

LAYOUTS = {"decode": "decode", "prefill": "contiguous", "k_side": "k_side"}  # -> engine_inputs' case
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Default tokens by device and layout, and heads by device (DeepSeek-V3's at TP8 and on one rank).
TOKENS = {"cuda": dict.fromkeys(LAYOUTS, [1, 4, 16, 64, 256, 1024, 4096, 16384]),
          "cpu": {"decode": [1, 16, 64], "prefill": [256, 1024], "k_side": [256, 1024]}}
HEADS = {"cuda": [16, 128], "cpu": [128]}
CEILING = "ceiling"
NOISY = 0.2  # a time whose rounds spread wider than this fraction of its median: a note under the table
_LOAD_AT_START = os.getloadavg()[0]

# ------------------------------------------------------------------------------------ command line


def names(choices) -> Callable[[str], list[str]]:
    """An argparse type: a comma list of ``choices``."""
    def parse(text: str) -> list[str]:
        bad = [x for x in text.split(",") if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad}: not one of {', '.join(choices)}")
        return text.split(",")
    return parse


def parser(doc: str, layouts: str | None) -> argparse.ArgumentParser:
    """The options of every script (``--layout`` only with default ``layouts``); a script adds its
    own, if any, before parsing."""
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",")]

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda where available)")
    p.add_argument("--tokens", type=ints, help="comma list (default: see above)")
    p.add_argument("--heads", type=ints, help="comma list (default: see above)")
    if layouts:
        p.add_argument("--layout", type=names(LAYOUTS), default=layouts,
                       help=f"comma list of {', '.join(LAYOUTS)} (default: {layouts})")
    p.add_argument("--dtype", type=names(DTYPES), default="bf16", help="comma list of bf16, fp16 (default: bf16)")
    p.add_argument("--out", type=Path, default=Path("bench_out"),
                   help="folder for the tables (.md), every round's time (.csv) and plots (.png)")
    p.add_argument("--rounds", type=int,
                   help="interleaved rounds per row (default: kernels 5 on CUDA, 15 on CPU; host time 50)")
    # Threads of a parallel region wait for each other: one sharing its core with another process
    # stalls the whole region for scheduler slices, so the default leaves out the cores that were busy
    # when this process started (later, the load average counts this process too).
    busy = int(_LOAD_AT_START + 0.5)
    p.add_argument("--threads", type=int, default=max(1, min(torch.get_num_threads(), os.cpu_count() - busy)),
                   help="CPU kernel timings: torch threads (default: %(default)s, torch's threads less the "
                        "cores the load average says are busy)")
    return p


def shapes(args: argparse.Namespace, tokens: dict = TOKENS, heads: dict = HEADS
           ) -> list[tuple[str, str, int, list[int]]]:
    """(dtype, layout, heads, tokens) of each table the options ask for; ``tokens`` and ``heads``
    hold the defaults, by device (and layout)."""
    kind = args.device.type
    return [(dtype, layout, n, args.tokens or tokens[kind][layout])
            for dtype in args.dtype for layout in args.layout for n in args.heads or heads[kind]]


# ------------------------------------------------------------------------------------------ timing


@dataclass
class Contender:
    name: str
    fn: Callable[[], object]
    check: Callable[[], str | None] | None = None  # raises on a wrong result; a string is a note
    ceiling: bool = False  # the table shows the fastest ceiling of each round as one column


@dataclass
class Timing:
    time: Callable[[Callable[[], object]], float]  # one round of one contender -> us per call
    rounds: int
    method: str  # for the header
    # Summarize a contender by its best round rather than the median: for host times, which other
    # processes can only lengthen, and whose short rounds they hit often on a busy machine.
    best: bool = False


@dataclass
class Table:
    title: str
    size_name: str  # what a row is: "tokens", "mode"
    derived: dict[str, Callable[[dict[str, float]], float]]  # column -> figure from one round's us
    meaning: str  # what the derived columns say: one line under the table
    timing: Timing
    rows: dict[object, dict[str, list[float] | None]] = field(default_factory=dict)  # None: FAIL
    ceilings: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


def kernel_timing(args: argparse.Namespace) -> Timing:
    rounds = args.rounds or (5 if args.device.type == "cuda" else 15)
    if args.device.type == "cuda":
        from triton.testing import do_bench_cudagraph
        side = torch.cuda.Stream()  # capture needs one; older Triton leaves making it to the caller

        def time_cuda(fn: Callable[[], object]) -> float:
            torch.cuda.synchronize()  # the side stream does not wait for ours, where the inputs were written
            with torch.cuda.stream(side):
                return 1e3 * do_bench_cudagraph(fn, rep=10, return_mode="median")
        return Timing(time_cuda, rounds, "triton.testing.do_bench_cudagraph(rep=10): per call, the median "
                      "replay of a CUDA graph of back-to-back calls; under torch.inference_mode()")

    def time_cpu(fn: Callable[[], object]) -> float:
        timer = Timer("fn()", globals={"fn": fn}, num_threads=args.threads)
        return 1e6 * timer.blocked_autorange(min_run_time=0.02).median
    return Timing(time_cpu, rounds, f"torch.utils.benchmark.Timer.blocked_autorange(min_run_time=0.02), "
                  f"torch threads: {args.threads}; median block; under torch.inference_mode()")


def host_timing(args: argparse.Namespace, calls: int = 200) -> Timing:
    """Host time of eager calls. On CUDA the GPU is synchronized only between rounds, outside the
    timed loop; a round's kernels stay well short of the launch queue's depth, so no launch waits."""
    sync = torch.cuda.synchronize if args.device.type == "cuda" else lambda: None

    def time_host(fn: Callable[[], object]) -> float:
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        sync()
        return 1e6 * elapsed / calls
    return Timing(time_host, args.rounds or 50, f"time.perf_counter() around {calls} eager calls, per call",
                  best=True)


def measure(table: Table, size: object, setup: Callable[[], list[Contender]],
            before_timing: Callable[[], None] | None = None) -> None:
    """Adds a row to ``table``: the contenders ``setup()`` makes, gated, then timed in interleaved
    rounds. ``before_timing`` runs between the two (e.g. to time on realistic values)."""
    row, timed = {}, []
    for c in setup():
        try:
            note = c.check() if c.check else None
        except Exception as exc:  # noqa: BLE001 - a wrong or failing contender is a result
            table.notes.append(f"{size}: {c.name}: FAIL: {type(exc).__name__}: {exc}")
            row[c.name] = None
            continue
        if note:
            table.notes.append(f"{size}: {c.name}: {note}")
        timed.append(c)
        row[c.name] = []
        if c.ceiling:
            table.ceilings.add(c.name)
    if before_timing:
        before_timing()
    for _ in range(table.timing.rounds):
        for c in timed:
            row[c.name].append(table.timing.time(c.fn))
    table.rows[size] = row
    print(f"  {table.title}, {table.size_name} {size}: done", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- ceilings


def ceilings(n_read: int, n_write: int, device: torch.device, dst_dtype: torch.dtype = torch.int16
             ) -> list[Contender]:
    """CUDA: the ceilings of an op that reads ``n_read`` 16-bit elements and writes ``n_write`` of
    ``dst_dtype``: the tuned Triton flat copy (exactly those bytes) and, for int16 writes with
    ``n_read >= n_write``, torch.bitwise_not over ``n_write`` int16 elements (it reads what it
    writes: the op's bytes, less any extra reads, such as the cos/sin rows of a RoPE); and the
    launch floor (a one-element fill: what any kernel costs). A graph-captured ``copy_`` is a memcpy
    node, slower than both: no ceiling."""
    if device.type != "cuda":
        return []
    src = torch.randint(-32768, 32768, (n_read,), dtype=torch.int16, device=device)
    out = [Contender("triton copy", flat_copy(src, torch.empty(n_write, dtype=dst_dtype, device=device)),
                     ceiling=True)]
    if n_read >= n_write and dst_dtype == torch.int16:
        out.append(Contender("bitwise_not", partial(torch.bitwise_not, src[:n_write],
                                                    out=torch.empty(n_write, dtype=torch.int16, device=device)),
                             ceiling=True))
    one = torch.empty(1, device=device)
    return out + [Contender("launch floor", partial(one.fill_, 1.0))]


def flat_copy(src: torch.Tensor, dst: torch.Tensor) -> Callable[[], object]:
    """A Triton kernel that reads all of 1-D ``src`` and writes all of 1-D ``dst`` (converted to its
    type, zeros past src's end): an op's bytes without its indexing. Block size tuned per size."""
    kernel = _flat_copy_kernel()
    n_read, n_write = src.numel(), dst.numel()
    assert max(n_read, n_write) < 2**31, "32-bit offsets"
    return lambda: kernel[lambda meta: (-(-max(n_read, n_write) // meta["BLOCK"]),)](src, dst, n_read, n_write)


def autotune(configs: list, key: list[str]):
    """``triton.autotune`` that times each config as the kernels are timed here (back to back in a
    CUDA graph, inputs warm in L2; the autotuner's default benchmark flushes L2 between calls), from
    a side stream of its own (capture needs one). A kernel tunes at its first call with a new key,
    running many times on that call's arguments: a kernel that works in place must first be called
    on throwaway data."""
    import triton
    from triton.testing import do_bench_cudagraph

    def bench(fn, quantiles):
        torch.cuda.synchronize()  # the side stream does not wait for ours
        with torch.cuda.stream(torch.cuda.Stream()):
            return do_bench_cudagraph(fn, rep=5, quantiles=quantiles)
    return triton.autotune(configs, key=key, do_bench=bench)


@functools.cache
def _flat_copy_kernel():
    # Imported here so that a CPU run never imports Triton; as globals, because a Triton kernel
    # resolves its names (tl) in its module's globals.
    global triton, tl
    import triton
    import triton.language as tl

    @autotune([triton.Config({"BLOCK": b}) for b in (1024, 2048, 4096, 8192)], key=["n_read", "n_write"])
    @triton.jit
    def copy(src, dst, n_read, n_write, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(src + offs, mask=offs < n_read, other=0)
        tl.store(dst + offs, x.to(dst.dtype.element_ty), mask=offs < n_write)
    return copy


# ------------------------------------------------------------------------------------------ report


def report(title: str, tables: list[Table], args: argparse.Namespace, tag: str) -> int:
    """Prints the tables under the run's metadata and writes them (``tag``.md), every round's time
    (.csv) and a plot of the tables by size (.png, where matplotlib is importable) to --out.
    Returns the exit status: 1 if a contender failed the gate."""
    methods = "; ".join(dict.fromkeys(f"{t.timing.method}; {t.timing.rounds} interleaved rounds" for t in tables))
    lines = [f"## {title}", "",
             f"device: {_device_name(args.device)}; torch {torch.__version__}; "
             f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"command: `{shlex.join([Path(sys.executable).name] + sys.argv)}`",
             f"timing: {methods}",
             f"load average: {_LOAD_AT_START:.2f} before this process started work, "
             f"{os.getloadavg()[0]:.2f} now (this process included), {os.cpu_count()} cores", ""]
    for t in tables:
        lines += _markdown(t)
    text = "\n".join(lines)
    print(text, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = [args.out / f"{tag}.md", args.out / f"{tag}.csv"]
    paths[0].write_text(text + "\n")
    with paths[1].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["table", "row", "contender", "round", "us_per_call"])
        w.writerows([t.title, size, name, i, f"{us:.4f}"] for t in tables for size, row in t.rows.items()
                    for name, times in row.items() for i, us in enumerate(times or []))
    if _plot(tables, args.out / f"{tag}.png"):
        paths.append(args.out / f"{tag}.png")
    print("files: " + ", ".join(map(str, paths)) + "\n", flush=True)
    return int(any(times is None for t in tables for row in t.rows.values() for times in row.values()))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _markdown(t: Table) -> list[str]:
    """A row per size: each contender's us per call (the fastest ceiling of each round as one column),
    then the derived figures, each with its lowest and highest round."""
    names = [n for n in dict.fromkeys(n for row in t.rows.values() for n in row) if n not in t.ceilings]
    cols = [t.size_name] + [f"{n} us" for n in names] + [f"{CEILING} us"] * bool(t.ceilings) + list(t.derived)
    lines = [f"### {t.title}", "", "| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    widest = max((((max(times) - min(times)) / statistics.median(times), f"{t.size_name} {size}, {name}")
                  for size, row in t.rows.items() for name, times in row.items() if times), default=(0.0, ""))
    for size, row in t.rows.items():
        rounds = [{n: times[i] for n, times in row.items() if times} for i in range(t.timing.rounds)]
        best = {n: min(times) for n, times in row.items() if times}
        for r in rounds + [best]:
            if t.ceilings & r.keys():
                r[CEILING] = min(r[c] for c in t.ceilings & r.keys())
        summary = (lambda n: best[n]) if t.timing.best else lambda n: statistics.median(r[n] for r in rounds)
        cells = [str(size)] + ["" if n not in row else "FAIL" if row[n] is None else f"{summary(n):.2f}"
                               for n in names]
        cells += [f"{summary(CEILING):.2f}" if CEILING in best else ""] * bool(t.ceilings)
        for figure in t.derived.values():
            try:
                values = [figure(r) for r in rounds]
                mid = figure(best) if t.timing.best else statistics.median(values)
            except KeyError:  # a contender it needs failed or is absent
                cells.append("")
                continue
            cells.append(f"{mid:.2f} ({min(values):.2f}-{max(values):.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    how = "from each contender's best" if t.timing.best else "the median"
    lines += ["", f"{t.meaning}. Each: {how} of {t.timing.rounds} interleaved rounds (in parentheses: the "
              "lowest and highest round)."]
    if widest[0] > NOISY:
        lines.append(f"Noisy machine: a time varied by {100 * widest[0]:.0f}% of its median from round to round "
                     f"({widest[1]}); differences within the ranges are not findings.")
    return lines + [f"- {n}" for n in t.notes] + [""]


def _plot(tables: list[Table], path: Path) -> bool:
    tables = [t for t in tables if all(isinstance(size, int) for size in t.rows)]
    plt = _pyplot() if tables else None
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 4), squeeze=False)
    for ax, t in zip(axes[0], tables):
        for name in dict.fromkeys(n for row in t.rows.values() for n in row):
            points = [(size, statistics.median(row[name])) for size, row in t.rows.items() if row.get(name)]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, label=name, ls=":" if name in t.ceilings else "-")
        ax.set(xscale="log", yscale="log", xlabel=t.size_name, ylabel="us per call", title=t.title)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


@functools.cache
def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot", file=sys.stderr)
        return None
    return plt


def poisoned(fn: Callable[[], object], out: torch.Tensor, byte: int, expect: Callable[[], None]):
    """The gate's check of an op writing ``out``: ``out`` filled with ``byte`` first, compared after."""
    def check() -> None:
        out.view(torch.uint8).fill_(byte)
        fn()
        expect()
    return check
