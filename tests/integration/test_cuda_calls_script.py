# A GPU script's CUDA calls on a CPU-only machine: AP on 2 CPU ranks trains it as written, like one device.
"""The script (tests/scripts/cuda_calls_train.py) makes ``torch.cuda.set_device``, ``manual_seed(_all)``,
``model.to(cuda)``, ``model.cuda()``, tensor ``.to(cuda/int)``, ``.cuda()``, ``synchronize`` and
``empty_cache``; AP on 2 ranks (a pinned dp 2 configuration: what the planner would pick does not matter
here, and a fresh 2-rank calibration costs ~50 s) is compared with the same script run on one device
(``MOREH_ENABLE_ADVANCED_PARALLELIZATION=0``: the calls are still accepted). The random stream the script
draws its batches from is the same before every step (engagement included) on both ranks; that planning and
calibration draw privately is tested in tests/unit/test_rng_isolation.py."""
import json
import subprocess
import sys

import pytest
import torch

from tests.helpers.results import result_records
from tests.helpers.env import clean_subprocess_env
from tests.helpers.paths import REPO_ROOT

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only acceptance of CUDA calls")]

SCRIPT = REPO_ROOT / "tests" / "scripts" / "cuda_calls_train.py"


def _run(tmp_path, **extra) -> list[dict]:
    env = clean_subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), TRANSFORMERS_VERBOSITY="error",
                               MOREH_AP_CACHE_DIR=str(tmp_path / "cache"), MOREH_AP_RANK_OUTPUT="all", **extra)
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = result_records(proc.stdout)
    return sorted(results, key=lambda r: r["rank"]), proc.stderr


def test_cuda_calls_script_trains_on_two_cpu_ranks_as_on_one_device(tmp_path):
    (off,), _ = _run(tmp_path, MOREH_ENABLE_ADVANCED_PARALLELIZATION="0")
    assert off["devices"] == ["cpu"] and len(off["loss"]) == 3
    pinned = {"num_stages": 1, "num_micro_batches": 1, "batch_per_device": 2, "mixed_precision": False}
    on, stderr = _run(tmp_path, MOREH_AP_NPROC="2", MOREH_AP_CONFIG=json.dumps(pinned))
    assert [r["rank"] for r in on] == [0, 1]
    assert "batch_per_device : 2" in stderr  # engaged with the pinned dp 2 configuration
    for res in on:
        assert res["devices"] == ["cpu"]
        assert res["loss"] == pytest.approx(off["loss"], rel=1e-5)
        assert res["rng"] == off["rng"]  # the script's generator: untouched by planning and engagement
