"""Shared pytest setup: real broker fixtures come from tests/brokers.py; `gpu` tests skip without CUDA."""

import pytest
import torch

pytest_plugins = ["tests.brokers"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on a GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
