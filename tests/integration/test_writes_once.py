# Writes happen once: after AP engaged on 2 ranks, rank 0 writes the checkpoint files, rank 1 writes none.
"""The script (tests/scripts/writes_script.py) saves in every way scripts do, from every rank, with the rank
in each path; a file that exists for rank 1 is a write that should not have happened."""
import json
import subprocess
import sys

import pytest
import torch

from tests.helpers.results import result_records
from tests.helpers.env import clean_subprocess_env
from tests.helpers.paths import REPO_ROOT

pytestmark = pytest.mark.timeout(400)

SCRIPT = REPO_ROOT / "tests" / "scripts" / "writes_script.py"
CONFIG = json.dumps({"num_stages": 1, "num_micro_batches": 1, "batch_per_device": 2, "mixed_precision": False})


def test_checkpoint_writes_happen_once_on_rank_zero(tmp_path):
    env = clean_subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), TRANSFORMERS_VERBOSITY="error",
                               MOREH_AP_CACHE_DIR=str(tmp_path / "cache"), MOREH_AP_RANK_OUTPUT="all",
                               MOREH_AP_NPROC="2", MOREH_AP_CONFIG=CONFIG)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = sorted(result_records(proc.stdout),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["world_zero"] for r in results] == [True, False]  # Trainer.is_world_process_zero()
    assert all(r["bytesio"] > 0 for r in results)  # torch.save into memory is kept on every rank
    assert (tmp_path / "before_rank0.pt").exists() and (tmp_path / "before_rank1.pt").exists()  # not engaged yet
    for name in ("state_rank{r}.pt", "st_rank{r}.safetensors", "stmodel_rank{r}.safetensors", "config_rank{r}",
                 "tok_rank{r}", "trainer_state_rank{r}.json"):
        assert (tmp_path / name.format(r=0)).exists(), name
        assert not (tmp_path / name.format(r=1)).exists(), name
    assert (tmp_path / "fileobj_rank0.pt").stat().st_size > 0
    assert (tmp_path / "fileobj_rank1.pt").stat().st_size == 0  # the script's open() ran; torch.save wrote nothing
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-2"]
    state = torch.load(tmp_path / "state_rank0.pt")
    assert "model.embed_tokens.weight" in state and all(t.device.type == "cpu" for t in state.values())
    assert (tmp_path / "saved" / "model.safetensors").exists()
