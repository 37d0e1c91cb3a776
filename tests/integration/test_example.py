# The seed's walkthrough script runs end to end (one process, small settings): trains, saves, reloads.
import re
import subprocess
import sys

from tests.helpers.env import clean_subprocess_env
from tests.helpers.paths import REPO_ROOT

ROOT = REPO_ROOT
EXAMPLE = ROOT / "examples" / "text_summarization_for_ap.py"


def test_text_summarization_example_trains_and_reloads(tmp_path):
    out_dir = tmp_path / "outputs"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--num-samples", "48", "--block-size", "64", "--log-interval", "1",
         "--save-model-dir", str(out_dir)],
        cwd=tmp_path, env=clean_subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"\] Loss: ([0-9.]+)", proc.stderr)]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.2, losses
    assert "Training Done" in proc.stdout and f"Model saved in '{out_dir}'" in proc.stdout
    assert "weights match" in proc.stdout
    assert (out_dir / "config.json").exists()
