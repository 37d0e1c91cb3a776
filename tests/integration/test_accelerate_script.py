# run_clm_no_trainer.py's shape (accelerate) with AP on 2 ranks vs off: losses, perplexity, save_state/load_state.
"""tests/scripts/accelerate_clm.py: a random GPT-2 with tied embeddings, ``Accelerator(gradient_accumulation_steps=2)``,
``prepare``, ``accumulate`` + ``backward``, ``save_state`` after step 2, ``gather_for_metrics``,
``save_pretrained(save_function=accelerator.save)``. AP off (one process) is the reference; AP on runs with
``MOREH_AP_NPROC=2`` and a pinned dp 2 config (fp32), once from the start and once resumed from the AP run's
``save_state`` directory (``load_state``) for steps 3-4. Losses compared at rel 1e-5."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.results import result_records
from tests.helpers.env import clean_subprocess_env
from tests.helpers.paths import REPO_ROOT

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

SCRIPT = REPO_ROOT / "tests" / "scripts" / "accelerate_clm.py"
DP2 = json.dumps({"num_stages": 1, "num_micro_batches": 1, "batch_per_device": 2, "mixed_precision": False})
STATE_FILES = {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"}


def _run(cwd: Path, out: str, *, ap: bool, resume: str | None = None):
    env = clean_subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), TRANSFORMERS_VERBOSITY="error",
                               HF_HUB_DISABLE_PROGRESS_BARS="1", MOREH_AP_CACHE_DIR=str(cwd / "cache"),
                               MOREH_AP_RANK_OUTPUT="all")
    if ap:
        env.update(MOREH_AP_NPROC="2", MOREH_AP_CONFIG=DP2)
    cmd = [sys.executable, str(SCRIPT), str(cwd / out), "--ap", "line" if ap else "off"]
    if resume:
        cmd += ["--resume", str(cwd / resume)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = sorted(result_records(proc.stdout), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == list(range(2 if ap else 1)), proc.stdout[-2000:]
    return results


def _tensors_close(a: dict, b: dict, *, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=rtol, atol=atol), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("accelerate")
    (off,) = _run(cwd, "off", ap=False)
    on = _run(cwd, "on", ap=True)
    resumed = _run(cwd, "resumed", ap=True, resume="on/step_2")
    return cwd, off, on, resumed


def test_accelerate_script_with_ap_on_two_ranks_matches_one_device(runs):
    from safetensors.torch import load_file

    cwd, off, on, _ = runs
    assert len(off["losses"]) == 8 and off["completed"] == 4
    for res in on:
        assert res["losses"] == pytest.approx(off["losses"], rel=1e-5)
        assert res["perplexity"] == pytest.approx(off["perplexity"], rel=1e-5)
    # save_state and save_pretrained: written once (rank 0), the one-device content
    assert {p.name for p in (cwd / "on" / "step_2").iterdir()} == STATE_FILES
    for path in ("step_2/model.safetensors", "final/model.safetensors"):
        _tensors_close(load_file(str(cwd / "off" / path)), load_file(str(cwd / "on" / path)), rtol=1e-4, atol=2e-5)
    off_opt = torch.load(cwd / "off" / "step_2" / "optimizer.bin", weights_only=True)
    on_opt = torch.load(cwd / "on" / "step_2" / "optimizer.bin", weights_only=True)
    assert on_opt["param_groups"] == off_opt["param_groups"]
    for i, state in off_opt["state"].items():
        _tensors_close(state, on_opt["state"][i], rtol=1e-4, atol=1e-7)


def test_accelerate_load_state_under_ap_continues_with_the_same_losses(runs):
    _, off, _, resumed = runs
    for res in resumed:
        assert res["completed"] == 4
        assert res["losses"] == pytest.approx(off["losses"][4:], rel=1e-5)  # steps 3-4 (micro-steps 5-8)
        assert res["perplexity"] == pytest.approx(off["perplexity"], rel=1e-5)
