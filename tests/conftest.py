"""Shared pytest setup: real broker fixtures come from tests/brokers.py; `gpu` tests skip without CUDA.

Every test gets its own state directory root (XDG_STATE_HOME), so the one-agent-per-line lock of an
agent a test starts never meets another test's, nor a real agent's on this machine.
"""

from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture(autouse=True)
def _own_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("XDG_STATE_HOME", str(root))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    yield root
