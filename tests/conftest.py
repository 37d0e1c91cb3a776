# Shared pytest set-up: a clean MOREH_* environment and a fresh option state for every test.
import os

import pytest

from moreh_ap import env as _env
from moreh_ap import option as _option


@pytest.fixture(autouse=True)
def _clean_moreh_env(monkeypatch, tmp_path):
    for name in _env.ALL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(_env.CACHE_DIR, str(tmp_path / "moreh_ap_cache"))
    _option.disable_advanced_parallelization()
    yield
    _option.disable_advanced_parallelization()


def clean_subprocess_env(**extra: str) -> dict:
    """os.environ without MOREH_* variables, plus ``extra``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MOREH_")}
    environ.update(extra)
    return environ


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: calibration timings with 2 OpenMP threads on a busy 2-core
    machine take seconds (spinning threads)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
