import os

import pytest

# Multi-process tests on 2 cores are 7x slower without this (ENVIRONMENT.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (the CI's `-n 2`), every test that starts processes or a Ray instance
    runs in one worker, one at a time, while the other worker takes the single-process tests:
    two cores never carry two process groups at once, so no rank waits past its timeouts."""
    for item in items:
        if item.get_closest_marker("multiprocess") or item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.xdist_group("processes"))
