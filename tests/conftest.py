"""Test tiers: `slow` tests (tens of seconds each) run only with --run-slow or R1C_RUN_SLOW=1; the
gpu / tensorrt / kernels tiers skip themselves with a reason when what they need is absent."""

from __future__ import annotations

import os
from typing import Any

import pytest
from cpu_kernels import any_level, kernel, kernels  # noqa: F401  (r1c's CPU kernel libraries, shared fixtures)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (the stock torch.onnx exports, benchmarks with peers)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow") or os.environ.get("R1C_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (or R1C_RUN_SLOW=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stock_tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The stock torch.onnx export of transformers' DeepseekV3, tiny preset, opset 18 (tests/stock_models.py)."""
    from stock_models import export_tiny_stock

    return export_tiny_stock(tmp_path_factory.mktemp("stock_tiny"))


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny preset (seed 3) as a one-rank and as sharded bundles, each built on first use
    (`dist_helpers.TinyBundles`: `tiny_bundles["tp2"]`)."""
    from dist_helpers import TinyBundles

    return TinyBundles(tmp_path_factory.mktemp("tiny_bundles"))
