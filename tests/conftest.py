import os

import pytest

# Multi-process tests on 2 cores are 7x slower without this (ENVIRONMENT.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`-n 2 --dist loadgroup`, the default addopts), the Ray tests run in
    one worker, one at a time: `ray stop` after a module would end another module's instance."""
    for item in items:
        if item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.xdist_group("ray"))
