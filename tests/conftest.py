"""Shared fixtures of the vllm_mla_ops suite: the device parametrization, the per-test seed and the
``--run-large`` switch. The data helpers (random bits, layouts, checks) live in mla_helpers.py."""

from __future__ import annotations

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


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """Every test draws its own reproducible random bits (seeded from its node id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
