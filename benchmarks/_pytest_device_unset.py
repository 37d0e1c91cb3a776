# pytest plugin for gpu_session's apex item: each test's body runs with MOREH_AP_DEVICE unset (the suite sets cpu).
"""``pytest -p benchmarks._pytest_device_unset``: tests/conftest.py sets ``MOREH_AP_DEVICE=cpu`` for every test
(an autouse fixture); this removes it after the set-up, so the test body sees a CUDA machine as a user's
script does (the fixture's monkeypatch restores the environment at teardown)."""
from __future__ import annotations

import os

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield
    os.environ.pop("MOREH_AP_DEVICE", None)
