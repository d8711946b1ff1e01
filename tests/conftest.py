"""Shared pytest setup: real broker fixtures come from tests/brokers.py."""

pytest_plugins = ["tests.brokers"]
