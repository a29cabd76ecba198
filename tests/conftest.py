"""Shared fixtures of the vllm_mla_ops suite: the device parametrization, the per-test seed, the
``--run-large`` switch and the summary line that says why tests were skipped. Data, layouts and
references come from vllm_mla_ops.testing; the op list, pytest parameters and the storage-wide
checks from mla_helpers.py."""

from __future__ import annotations

import re
import zlib

import pytest
import torch

import vllm_mla_ops  # noqa: F401  (loads the extension: registers torch.ops._C.concat_mla_q)

HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]),
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-large", action="store_true", default=False,
                     help="run the tests marked `large` (tens of GB on the GPU)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_large = pytest.mark.skip(reason="large: opt in with --run-large")
    skip_cuda = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "large" in item.keywords and not config.getoption("--run-large"):
            item.add_marker(skip_large)
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


# Why a run skipped tests wholesale (a pattern of the skip reasons, and what the summary says).
SKIP_REASONS = {r"\bneeds? CUDA\b": "they need CUDA (no GPU here)",
                r"^large: ": "they are marked large (opt in with --run-large)"}


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """One line for each reason above that skipped tests, so a CPU-only run says why most of the
    suite did not run."""
    counts = dict.fromkeys(SKIP_REASONS, 0)
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        pattern = next((p for p in SKIP_REASONS if re.search(p, reason)), None)
        if pattern is not None:
            counts[pattern] += 1
    for pattern, count in counts.items():
        if count:
            terminalreporter.write_line(f"{count} tests skipped: {SKIP_REASONS[pattern]}")


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """Every test draws its own reproducible random bits (seeded from its node id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ------------------------------------------------------------------------ hypothesis profiles
# tests/test_properties.py draws random shapes and layouts. "ci" (the default) is a fixed,
# derandomized set of examples that fits the suite's time budget; "gpu" is a long randomized hunt
# for a GPU machine. Select one with HYPOTHESIS_PROFILE=ci|gpu.

import os  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

_HYPOTHESIS_HEALTH_CHECKS = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    # The `device` and `_seed` fixtures are function-scoped but hold no per-example state.
    HealthCheck.function_scoped_fixture,
]
settings.register_profile("ci", max_examples=150, derandomize=True, deadline=None, database=None,
                          print_blob=True, suppress_health_check=_HYPOTHESIS_HEALTH_CHECKS)
settings.register_profile("gpu", max_examples=2000, derandomize=False, deadline=None, database=None,
                          print_blob=True, suppress_health_check=_HYPOTHESIS_HEALTH_CHECKS)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
