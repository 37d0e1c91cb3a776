# Shared pytest set-up: a clean MOREH_* environment and a fresh option state for every test; test tiers.
"""Tiers: ``unit/`` (one process, pure or with fake process groups), ``distributed/`` (several gloo
CPU ranks compared with one process; every test there carries the ``multirank`` marker, checked at
collection), ``integration/`` (scripts, the launcher and the start-up hook in fresh interpreters).
Shared builders and harnesses live in ``helpers/``; tests import them as ``tests.helpers.<module>``."""

import pytest

from moreh_ap import env as _env
from moreh_ap import option as _option


@pytest.fixture(autouse=True)
def _clean_moreh_env(monkeypatch, tmp_path):
    for name in _env.ALL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(_env.CACHE_DIR, str(tmp_path / "moreh_ap_cache"))
    # the suite runs on CPU unless a test says otherwise (it compares with CPU references): on a CUDA
    # machine parallelize() would otherwise put the model on cuda:LOCAL_RANK
    monkeypatch.setenv("MOREH_AP_DEVICE", "cpu")
    # scripts' ranks share one console pipe in several tests: unbuffered (-u), print() writes the text and
    # its newline in two writes and lines of different ranks interleave mid-line; buffered, each flushed
    # print is one write
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    _option.disable_advanced_parallelization()
    yield
    _option.disable_advanced_parallelization()


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: calibration timings with 2 OpenMP threads on a busy 2-core
    machine take seconds (spinning threads)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items
                if "/distributed/" in str(item.fspath) and item.get_closest_marker("multirank") is None]
    if unmarked:
        raise pytest.UsageError(f"tests under tests/distributed/ must carry the 'multirank' marker: {unmarked}")
