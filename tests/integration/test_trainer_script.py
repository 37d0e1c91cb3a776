# The HF Trainer script (run_clm.py's shape) with AP on 2 ranks vs off: per-step losses, checkpoint, resume.
"""tests/scripts/trainer_clm.py: a random GPT-2 (dropout 0), padded synthetic batches, accumulation 2,
``save_steps`` 2 of 4 steps, ``evaluate()``, then a second run resuming from ``checkpoint-2``. AP off (one
process) is the reference; AP on runs with ``MOREH_AP_NPROC=2`` and a pinned dp 2 config (fp32). Per-step
losses are the trainer's log history (``logging_steps=1``), compared at rel 1e-5."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.results import result_records
from tests.helpers.env import clean_subprocess_env
from tests.helpers.paths import REPO_ROOT

pytestmark = pytest.mark.timeout(900)

SCRIPT = REPO_ROOT / "tests" / "scripts" / "trainer_clm.py"
ARGS = ["--use_cpu", "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
        "--report_to", "none", "--learning_rate", "1e-2", "--seed", "0"]
DP2 = json.dumps({"num_stages": 1, "num_micro_batches": 1, "batch_per_device": 2, "mixed_precision": False})
CHECKPOINT_FILES = {"config.json", "generation_config.json", "model.safetensors", "optimizer.pt", "rng_state.pth",
                    "scheduler.pt", "trainer_state.json", "training_args.bin"}


def _run(cwd: Path, out: str, *, ap: str, resume: str | None = None):
    env = clean_subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), TRANSFORMERS_VERBOSITY="error",
                               HF_HUB_DISABLE_PROGRESS_BARS="1", MOREH_AP_CACHE_DIR=str(cwd / "cache"),
                               MOREH_AP_RANK_OUTPUT="all")
    if ap != "off":
        env.update(MOREH_AP_NPROC="2", MOREH_AP_CONFIG=DP2)
    if ap == "env":
        env["MOREH_ENABLE_ADVANCED_PARALLELIZATION"] = "1"
    cmd = [sys.executable, str(SCRIPT), "--output_dir", out, "--ap", ap, *ARGS]
    if resume:
        cmd += ["--resume_from_checkpoint", resume]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    results = sorted(result_records(proc.stdout), key=lambda r: r["rank"])
    return proc, results


def _ok(proc, results, n: int) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["rank"] for r in results] == list(range(n)), proc.stdout[-2000:]


def _weights_close(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        diff = (wa[k].float() - wb[k].float()).abs()
        # AdamW divides by sqrt(v): on elements whose gradient is ~0, fp32 summation-order differences move the
        # update by up to the learning rate per step (5e-5 here), so one element may differ by ~1e-5
        assert diff.max() < 2e-4 and diff.norm() <= 3e-4 * wa[k].float().norm() + 1e-7, k


@pytest.fixture(scope="module")
def off(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("trainer_off")
    first = _run(cwd, "run", ap="off")
    resumed = _run(cwd, "resumed", ap="off", resume="run/checkpoint-2")
    return cwd, first, resumed


@pytest.fixture(scope="module")
def on(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("trainer_on")
    return cwd, _run(cwd, "run", ap="line")


def test_trainer_script_without_ap_saves_and_resumes(off):
    cwd, (proc, (res,)), (rproc, (rres,)) = off
    _ok(proc, [res], 1)
    _ok(rproc, [rres], 1)
    assert sorted(res["losses"]) == ["1", "2", "3", "4"] and res["global_step"] == 4
    for step in ("2", "4"):
        assert {p.name for p in (cwd / "run" / f"checkpoint-{step}").iterdir()} == CHECKPOINT_FILES
    assert rres["losses"] == pytest.approx(res["losses"], rel=1e-6)  # steps 3-4 again, from checkpoint-2
    assert rres["eval_loss"] == pytest.approx(res["eval_loss"], rel=1e-6)


def test_trainer_script_with_ap_on_two_ranks_matches_one_device(off, on):
    off_dir, (_, (ref,)), _ = off
    on_dir, (proc, results) = on
    _ok(proc, results, 2)
    for res in results:
        assert res["losses"].keys() == ref["losses"].keys()
        assert list(res["losses"].values()) == pytest.approx(list(ref["losses"].values()), rel=1e-5)
        assert res["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
    for step in ("2", "4"):  # written once (rank 0), complete, the one-device content
        ckpt = on_dir / "run" / f"checkpoint-{step}"
        assert {p.name for p in ckpt.iterdir()} == CHECKPOINT_FILES
        _weights_close(off_dir / "run" / f"checkpoint-{step}" / "model.safetensors", ckpt / "model.safetensors")
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["global_step"] == int(step)
    _weights_close(off_dir / "run" / "model.safetensors", on_dir / "run" / "model.safetensors")


def test_trainer_resume_with_ap_continues_with_the_same_losses(off, on):
    _, (_, (ref,)), _ = off
    on_dir, _ = on
    off_opt = torch.load(off[0] / "run" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    on_opt = torch.load(on_dir / "run" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert on_opt["param_groups"] == off_opt["param_groups"]  # one device's format: groups and indices
    assert on_opt["state"].keys() == off_opt["state"].keys()
    for i, s in off_opt["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(on_opt["state"][i][name], s[name], rtol=1e-4, atol=1e-7), (i, name)
    proc, results = _run(on_dir, "resumed", ap="env", resume="run/checkpoint-2")  # the env var, no line
    _ok(proc, results, 2)
    for res in results:
        assert list(res["losses"].values()) == pytest.approx(list(ref["losses"].values()), rel=1e-5)
        assert res["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
