#!/usr/bin/env python3
"""The default benchmark on whatever machine runs it (what `bash tools/dev.sh main` runs), DeepSeek-V3
geometry (nope 512, rope 64, 128 heads): the scripts below, run in this process one after the other,
with these options (any option given here is passed on to each, and wins; bench_concat_mla_rope.py
has no --layout):
  CUDA  bench_concat_mla_q.py --layout decode,prefill --heads 128 --bmm
        bench_concat_mla_q_fp8.py --layout decode --heads 128
        bench_concat_mla_rope.py --heads 128
        bench_host_time.py
  CPU   bench_concat_mla_q.py --layout decode,prefill
        bench_concat_mla_q_fp8.py
        bench_host_time.py
About a minute on a 2-core CPU (bench_concat_mla_rope.py alone takes about as long there, so the CPU
set leaves it out).
"""

import runpy
import sys
from pathlib import Path

import harness as h

RUNS = {"cuda": [["bench_concat_mla_q.py", "--layout", "decode,prefill", "--heads", "128", "--bmm"],
                 ["bench_concat_mla_q_fp8.py", "--layout", "decode", "--heads", "128"],
                 ["bench_concat_mla_rope.py", "--heads", "128"],
                 ["bench_host_time.py"]],
        "cpu": [["bench_concat_mla_q.py", "--layout", "decode,prefill"],
                ["bench_concat_mla_q_fp8.py"],
                ["bench_host_time.py"]]}


def main() -> int:
    given = sys.argv[1:]
    args = h.parser(__doc__, "decode,prefill").parse_args(given)
    status = 0
    for script, *options in RUNS[args.device.type]:
        # Run as scripts, not imported, but in this process: torch and the extension load once, and
        # each report's header names the command that reproduces it.
        sys.argv = [str(Path(sys.argv[0]).with_name(script)), *options, *given]
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as exit:
            status |= exit.code or 0
    return status


if __name__ == "__main__":
    sys.exit(main())
