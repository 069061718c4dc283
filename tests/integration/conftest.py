"""Integration tier: tests that start a real server (the `triton` fixture lives in tests/conftest.py)."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
