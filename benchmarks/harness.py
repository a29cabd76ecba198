"""An op-agnostic benchmark harness: correctness first, then interleaved timing, then one table.

A benchmark is a list of ``Case``s (one row of a table each: a group name and a size). A case's
``setup()`` builds its buffers and returns ``Contender``s, zero-argument closures over those fixed
buffers. ``run()`` then, per case:

1. checks every contender that has a ``check`` (the bench file writes it: fresh random inputs, the
   output poisoned, the result compared with the reference). A check that raises marks the
   contender FAIL: it is not timed and the exit status becomes 1. A string it returns is a note.
2. times all contenders of the case interleaved: ``rounds`` rounds, each timing every contender in
   turn (A B C A B C ...), so clock, thermal and neighbour drift hit all of them alike.
   - CUDA: each contender's ``calls`` back-to-back calls are captured in one CUDA graph (after a
     warm-up on a side stream); each replay is timed with a pair of events and the per-call time
     is replay time / ``calls``. Capturing many calls amortises the graph launch: a graph of one
     call timed with events measures the events, not the kernel. Buffers are reused from call to
     call, so inputs that fit in L2 stay there, as in a decode step where the producer just wrote
     them. Summary: median and the 20th-80th percentile spread over >= 20 replays.
   - CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` per round at a fixed thread count;
     the blocks of all rounds are pooled. Summary: median and the interquartile range. A CPU case
     is set up, checked and timed under ``torch.inference_mode()``, as engines call these ops, so
     the host path timed is theirs.
3. prints a markdown table per group (us per call; for the contender with role "subject", % of the
   ceiling = fastest "ceiling" contender's time / its time, and "x <baseline>" = baseline time / its
   time), and writes CSV, JSON and, when matplotlib is importable, a PNG per group to ``out_dir``.

Ceilings for memory-bound ops come with the harness: ``flat_copy_ceilings`` (a Triton load/store
over flat buffers that reads and writes given element counts and types, one contender per block
size, so "the fastest ceiling" picks the best block per size), ``bitwise_not_ceiling`` (torch's own
SM copy of the same bytes; a graph-captured ``copy_`` is a memcpy node, slower, so no ceiling), and
``launch_floor`` (a one-element fill: the cost of any kernel at all).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.utils.benchmark as tbench

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: no Triton ceilings
    triton = None

SUBJECT, BASELINE, CEILING, OTHER = "subject", "baseline", "ceiling", "other"


@dataclass
class Contender:
    name: str
    fn: Callable[[], object]
    role: str = OTHER
    check: Callable[[], str | None] | None = None  # raises on a wrong result; a str is a note


@dataclass
class Case:
    group: str  # one table per group, e.g. "bf16 decode, 128 heads"
    size: int  # the row key and the plot's x axis, e.g. tokens
    setup: Callable[[], list[Contender]]  # called when the case runs: one case's buffers at a time
    extra: Callable[[dict[str, float]], dict[str, str]] | None = None  # medians (s) -> more columns
    # Runs after the checks, before timing: for ops whose speed depends on the values (a CPU
    # float conversion slows down on NaN, inf and subnormal inputs), time on realistic data.
    before_timing: Callable[[], None] | None = None


@dataclass
class Result:
    group: str
    size: int
    contender: str
    role: str
    status: str  # "ok" or "FAIL"
    median_us: float | None = None
    lo_us: float | None = None  # q20 (CUDA) or q25 (CPU)
    hi_us: float | None = None  # q80 (CUDA) or q75 (CPU)
    samples: int = 0
    round_us: list[float] = field(default_factory=list)  # per-round medians, in round order
    note: str = ""


@dataclass
class Settings:
    device: torch.device
    rounds: int | None = None  # None: 5 on CUDA; 15 short ones on CPU, where neighbours are noisier
    calls: int = 100  # CUDA: calls per graph
    round_s: float | None = None  # per contender per round; None: 50 ms on CUDA, 20 ms on CPU
    threads: int | None = None  # CPU; None: torch.get_num_threads() capped by the idle cores
    max_threads: int | None = None  # CPU; caps the None case, e.g. at the op's usual thread count

    def __post_init__(self):
        cuda = self.device.type == "cuda"
        self.rounds = self.rounds or (5 if cuda else 15)
        self.round_s = self.round_s or (0.05 if cuda else 0.02)
        self.threads_note = ""
        if not cuda and self.threads is None:
            self.threads = min(torch.get_num_threads(), self.max_threads or torch.get_num_threads())
            idle = _idle_cores()
            if idle is not None and idle + 0.5 < self.threads:
                # Threads of a parallel region wait for each other: one sharing its core with
                # other work stalls the whole region for scheduler slices, which no statistic
                # recovers. Fewer threads give numbers that mean something.
                self.threads_note = f" (of {self.threads}: only {idle:.1f} cores were idle)"
                self.threads = max(1, int(idle + 0.5))
        self.cpu_at_start = _cpu_seconds()


# ------------------------------------------------------------------------------------------ timing


class GraphTimer:
    """One CUDA graph of ``calls`` back-to-back calls of ``fn``; ``sample`` times whole replays."""

    def __init__(self, fn: Callable[[], object], calls: int, round_s: float):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # capture must not be the first use of lazy state (cuBLAS, Triton)
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for _ in range(calls):
                fn()
        self.calls = calls
        self.replays = 4  # warm-up replays; they size the replays of a round to ~round_s
        self.replays = max(4, min(100, int(round_s / calls / max(min(self.sample()), 1e-9))))

    def sample(self) -> list[float]:
        """Seconds per call of ``self.replays`` replays, each timed by its own pair of events."""
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.replays)]
        for start, end in events:
            start.record()
            self.graph.replay()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) * 1e-3 / self.calls for start, end in events]


def _time_cuda(contenders: list[Contender], s: Settings) -> dict[str, list[float]]:
    timers = {c.name: GraphTimer(c.fn, s.calls, s.round_s) for c in contenders}
    samples: dict[str, list[list[float]]] = {name: [] for name in timers}
    for _ in range(s.rounds):
        for name, timer in timers.items():
            samples[name].append(timer.sample())
    return samples


def _time_cpu(contenders: list[Contender], s: Settings) -> dict[str, list[float]]:
    timers = {c.name: tbench.Timer("fn()", globals={"fn": c.fn}, num_threads=s.threads)
              for c in contenders}
    samples: dict[str, list[list[float]]] = {name: [] for name in timers}
    for _ in range(s.rounds):
        for name, timer in timers.items():
            samples[name].append(timer.blocked_autorange(min_run_time=s.round_s).times)
    return samples


def summarize(times: list[float], cuda: bool) -> tuple[float, float, float]:
    """(median, lo, hi) in us: lo/hi the 20th/80th percentiles on CUDA, the quartiles on CPU."""
    if len(times) < 2:
        return times[0] * 1e6, times[0] * 1e6, times[0] * 1e6
    q = statistics.quantiles(times, n=20 if cuda else 4, method="inclusive")
    lo, hi = (q[3], q[15]) if cuda else (q[0], q[2])
    return statistics.median(times) * 1e6, lo * 1e6, hi * 1e6


# ------------------------------------------------------------------------------------- ceilings

if triton is not None:
    @triton.jit
    def _flat_copy(src, dst, n_read, n_write, BLOCK: tl.constexpr):
        # Reads n_read elements and writes n_write (converted to dst's type): the bytes an op moves,
        # with none of its indexing.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(src + offs, mask=offs < n_read, other=0)
        tl.store(dst + offs, x.to(dst.dtype.element_ty), mask=offs < n_write)


def flat_copy(src: torch.Tensor, dst: torch.Tensor, block: int) -> Callable[[], object]:
    """The Triton flat copy of all of 1-D ``src`` into all of 1-D ``dst`` (zeros past src's end)."""
    n_read, n_write = src.numel(), dst.numel()
    assert max(n_read, n_write) < 2**31, "32-bit offsets"
    grid = (triton.cdiv(max(n_read, n_write), block),)
    return lambda: _flat_copy[grid](src, dst, n_read, n_write, BLOCK=block)


def flat_copy_ceilings(n_read: int, n_write: int, device: torch.device,
                       src_dtype: torch.dtype = torch.int16, dst_dtype: torch.dtype = torch.int16,
                       blocks: tuple[int, ...] = (1024, 2048, 4096, 8192)) -> list[Contender]:
    """One Triton flat-copy contender per block size, on one shared pair of buffers."""
    if triton is None or device.type != "cuda":
        return []
    src = torch.randint(-100, 100, (n_read,), device=device).to(src_dtype)  # never time zeros
    dst = torch.empty(n_write, dtype=dst_dtype, device=device)
    return [Contender(f"triton copy {b}", flat_copy(src, dst, b), CEILING) for b in blocks]


def bitwise_not_ceiling(numel: int, device: torch.device) -> list[Contender]:
    """torch.bitwise_not over int16 buffers of ``numel`` elements: reads and writes 2 * numel bytes."""
    if device.type != "cuda":
        return []
    src = torch.randint(-32768, 32768, (numel,), dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    return [Contender("bitwise_not", lambda: torch.bitwise_not(src, out=dst), CEILING)]


def launch_floor(device: torch.device) -> list[Contender]:
    """A one-element fill: what any kernel costs in a graph on this device."""
    if device.type != "cuda":
        return []
    one = torch.empty(1, device=device)
    return [Contender("launch floor", lambda: one.fill_(1.0))]


# ------------------------------------------------------------------------------------------ runs


def run(cases: list[Case], s: Settings) -> list[Result]:
    results = []
    cuda = s.device.type == "cuda"
    for case in cases:
        # CPU: buffers made and calls timed under inference mode, as engines call the ops; a CPU
        # call's time includes its host path, and this is the path they take. CUDA times are graph
        # replays, which run no host code.
        with contextlib.nullcontext() if cuda else torch.inference_mode():
            results += _run_case(case, s)
        print(f"  {case.group}: {case.size} done", file=sys.stderr, flush=True)
    return results


def _run_case(case: Case, s: Settings) -> list[Result]:
    results = []
    cuda = s.device.type == "cuda"
    contenders = case.setup()
    timed = []
    for c in contenders:
        try:
            note = c.check() if c.check else None
        except Exception as exc:  # noqa: BLE001 - a wrong or raising contender is a result
            results.append(Result(case.group, case.size, c.name, c.role, "FAIL",
                                  note=f"{type(exc).__name__}: {exc}"))
            continue
        timed.append((c, note or ""))
    if case.before_timing:
        case.before_timing()
    start = _cpu_seconds()
    samples = (_time_cuda if cuda else _time_cpu)([c for c, _ in timed], s)
    others = None if cuda else _others_cores(start)
    if others is not None and others >= 0.2 and timed:  # see _other_work: a row that may be noise
        c, note = timed[0]
        timed[0] = (c, (note + "; " if note else "") + f"other processes used {others:.1f} cores")
    for c, note in timed:
        rounds = samples[c.name]
        med, lo, hi = summarize([t for r in rounds for t in r], cuda)
        results.append(Result(case.group, case.size, c.name, c.role, "ok", med, lo, hi,
                              sum(map(len, rounds)),
                              [statistics.median(r) * 1e6 for r in rounds], note))
    medians = {r.contender: r.median_us * 1e-6 for r in results
               if r.group == case.group and r.size == case.size and r.status == "ok"}
    if case.extra:
        for key, value in case.extra(medians).items():
            results.append(Result(case.group, case.size, key, "extra", "ok", note=value))
    del contenders, timed
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------------------------------- output


def header(title: str, s: Settings) -> dict[str, str]:
    if s.device.type == "cuda":
        name = torch.cuda.get_device_name(s.device)
        timing = "CUDA graph of {} calls, median replay / {} (q20-q80 spread)".format(s.calls, s.calls)
    else:
        name = _cpu_name()
        timing = (f"torch.utils.benchmark blocked_autorange, {s.threads} thread(s){s.threads_note}, "
                  "under torch.inference_mode() (median, IQR spread)")
        name += f" ({os.cpu_count()} cores{_other_work(s.cpu_at_start)})"
    return {"title": title, "device": name, "torch": torch.__version__,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": shlex.join([Path(sys.executable).name] + sys.argv),
            "timing": f"{timing}; {s.rounds} interleaved rounds"}


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(wall, CPU seconds used by every process, by this one) now; None where /proc/stat is not."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    t = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
    return t.elapsed, busy, t.user + t.system + t.children_user + t.children_system


def _idle_cores(seconds: float = 0.5) -> float | None:
    """Cores that other processes left idle over the next ``seconds``."""
    start = _cpu_seconds()
    time.sleep(seconds)
    others = _others_cores(start)
    return None if others is None else os.cpu_count() - others


def _others_cores(start: tuple[float, float, float] | None) -> float | None:
    """Cores that other processes used on average since ``start``."""
    end = _cpu_seconds()
    if start is None or end is None or end[0] <= start[0]:
        return None
    return ((end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0])


def _other_work(start: tuple[float, float, float] | None) -> str:
    others = _others_cores(start)
    if others is None:
        return ""
    if others < 0.2:
        return f"; other processes used {others:.1f} cores meanwhile"
    return f"; other processes used {others:.1f} cores meanwhile: expect noise"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _us(r: Result) -> str:
    if r.status != "ok":
        return "FAIL"
    spread = (r.hi_us - r.lo_us) / 2 / r.median_us * 100
    return f"{r.median_us:.2f} ±{spread:.0f}%"


def _ratio(base: Result, subject: Result) -> str:
    """base / subject, paired round by round (a neighbour's burst slows both halves of a round
    alike, so it cancels): the median ratio, and the quartiles of the per-round ratios."""
    ratios = [b / a for a, b in zip(subject.round_us, base.round_us)]
    if len(ratios) < 4:
        return f"{statistics.median(ratios):.2f}x"
    q = statistics.quantiles(ratios, n=4, method="inclusive")
    return f"{statistics.median(ratios):.2f}x ({q[0]:.2f}-{q[2]:.2f})"


def tables(results: list[Result], meta: dict[str, str], size_name: str = "size") -> str:
    """One markdown table per group: a row per size, us per call (± half the spread) per shown
    contender, then the best ceiling, % of it and "x baseline" for the subject, then extra columns."""
    out = [f"## {meta['title']}", "", f"device: {meta['device']}; torch {meta['torch']}; "
           f"{meta['date']}", f"command: `{meta['command']}`", f"timing: {meta['timing']}", ""]
    for group in dict.fromkeys(r.group for r in results):
        rows = [r for r in results if r.group == group]
        def named(*roles: str) -> list[str]:
            return list(dict.fromkeys(r.contender for r in rows if r.role in roles))
        shown, others, extras = named(SUBJECT, BASELINE), named(OTHER), named("extra")
        baselines = named(BASELINE)
        has_ceiling = any(r.role == CEILING for r in rows)
        cols = [size_name] + [f"{n} us" for n in shown] + ["ceiling us", "% of ceiling"] * has_ceiling
        cols += [f"x {b}" for b in baselines] + [f"{n} us" for n in others] + extras
        lines = [f"### {group}", "", "| " + " | ".join(cols) + " |",
                 "|" + "|".join("---:" for _ in cols) + "|"]
        notes = []
        for size in dict.fromkeys(r.size for r in rows):
            at = {r.contender: r for r in rows if r.size == size}
            ok = {n: r.median_us for n, r in at.items() if r.status == "ok" and r.median_us}
            subject = next((r for r in at.values() if r.role == SUBJECT), None)
            cells = [str(size)] + [_us(at[n]) if n in at else "" for n in shown]
            if has_ceiling:
                ceil = min((r for r in at.values() if r.role == CEILING and r.contender in ok),
                           key=lambda r: r.median_us, default=None)
                cells.append(f"{ceil.median_us:.2f} ({ceil.contender})" if ceil else "")
                cells.append(f"{100 * ceil.median_us / ok[subject.contender]:.0f}%"
                             if ceil and subject and subject.contender in ok else "")
            for b in baselines:
                cells.append(_ratio(at[b], subject) if subject and b in ok and subject.contender in ok
                             else "")
            cells += [_us(at[n]) if n in at else "" for n in others]
            cells += [at[e].note if e in at else "" for e in extras]
            lines.append("| " + " | ".join(cells) + " |")
            notes += [f"- {size}: {r.contender}: {r.status}, {r.note}" for r in at.values()
                      if r.note and r.role != "extra"]
        out += lines + [""] + notes + ([""] if notes else [])
    return "\n".join(out)


def write(results: list[Result], meta: dict[str, str], out_dir: Path, tag: str,
          size_name: str = "size") -> list[Path]:
    """CSV (a row per case x contender), JSON (the header and the rows) and PNG per group."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in results]
    paths = [out_dir / f"{tag}.csv", out_dir / f"{tag}.json", out_dir / f"{tag}.md"]
    with paths[0].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["group"])
        writer.writeheader()
        writer.writerows(rows)
    paths[1].write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    paths[2].write_text(tables(results, meta, size_name) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot", file=sys.stderr)
        return paths
    groups = list(dict.fromkeys(r.group for r in results))
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        timed = [r for r in results if r.group == group and r.median_us]
        for name in dict.fromkeys(r.contender for r in timed):
            pts = [(r.size, r.median_us) for r in timed if r.contender == name]
            ax.plot(*zip(*pts), marker="o", ms=3, label=name,
                    ls=":" if any(r.role == CEILING for r in timed if r.contender == name) else "-")
        ax.set(xscale="log", yscale="log", xlabel=size_name, ylabel="us per call", title=group)
        ax.legend(fontsize=6)
    fig.suptitle(f"{meta['title']} on {meta['device']}, torch {meta['torch']}, {meta['date']}",
                 fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / f"{tag}.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def report(results: list[Result], s: Settings, title: str, out_dir: Path, tag: str,
           size_name: str = "size") -> int:
    """Writes the files, prints the tables; returns the exit status (1 if anything failed)."""
    meta = header(title, s)
    paths = write(results, meta, out_dir, tag, size_name)
    print(tables(results, meta, size_name))
    print("files: " + ", ".join(str(p) for p in paths))
    return int(any(r.status == "FAIL" for r in results))
