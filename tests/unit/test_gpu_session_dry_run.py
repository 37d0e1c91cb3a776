# benchmarks/gpu_session.py --dry-run: every item reports a status; the runs item trains and predicts on CPU.
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ITEMS = ["env", "runs", "closed_loop", "lamb", "apex", "subset"]

pytestmark = pytest.mark.timeout(150)


def test_dry_run_reports_every_item(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("MOREH_AP_DEVICE", None)
    proc = subprocess.run([sys.executable, "benchmarks/gpu_session.py", "--dry-run", "--budget-s", "90",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "session.json").read_text())
    assert list(report["items"]) == ITEMS
    for name, item in report["items"].items():
        assert isinstance(item["status"], str) and item["status"], name
        assert item["seconds"] >= 0 and item["limit_s"] > 0, name
    items = report["items"]
    assert items["env"]["status"] == "ok", items["env"]
    assert items["env"]["result"]["modules"]["moreh_ap"] != "?"
    cuda = items["env"]["result"]["cuda_available"]
    for name in ("lamb", "apex", "subset"):
        assert items[name]["status"] == ("skipped: dry run" if cuda else "skipped: no CUDA"), items[name]
    # the measuring code ran: both tiny runs measured on CPU next to a prediction of the same configuration
    runs = items["runs"]["result"]
    assert items["runs"]["status"] == "ok", items["runs"]
    assert runs["device"] == "cpu" and runs["base_calibration"]["source"] == "measured"
    assert len(runs["rows"]) == 2 and runs["summary"]["ran"] == 2
    for row in runs["rows"]:
        assert row["status"] == "ok", row
        assert len(row["measured"]["step_s_all"]) == 6 and row["measured"]["step_s_median"] > 0
        assert row["predicted"]["step_s"] > 0 and row["predicted"]["peak"] > 0
        assert row["predicted"]["plan_config"] == row["line"]
        assert row["predicted"]["step_s_corrected"] > 0 and isinstance(row["predicted"]["corrections_applied"], bool)
        assert abs(row["step_error_pct"]) < 1000
        assert row["closed_loop_line"].startswith("Measured steps 2-3") and "predicted step" in row["closed_loop_line"]
    assert "tiny-llama" in runs["shape_calibration"]
    assert runs["rows"][0]["predicted"]["planner_pick"]["step_s"] > 0
    loop = items["closed_loop"]
    assert loop["status"] == "ok" and loop["result"]["line"].startswith("Measured steps 2-3")
    assert "closed loop: Measured steps 2-3" in proc.stdout


def test_runs_ordered_cheapest_first():
    from benchmarks._gpu_runs import load_runs, order_runs

    runs = load_runs(dry=False)
    order = order_runs(runs)
    assert sorted(order) == list(range(len(runs)))
    first = runs[order[0]]
    assert first["measured"]["step_s_median"] == min(r["measured"]["step_s_median"] for r in runs)
    # a model's first run carries its calibration: the GPT-2 runs come after the cheap Llama ones
    models = [runs[i]["model"] for i in order]
    assert models.index("gpt2-1.5b") > models.index("llama-1b")


def test_bounded_kills_a_command_at_its_deadline(tmp_path):
    import time

    from benchmarks.gpu_session import _bounded

    t0 = time.time()
    res = _bounded([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                   deadline=time.time() + 3, log=tmp_path / "x.log")
    assert res["rc"] == "timeout" and time.time() - t0 < 20
    assert "started" in res["output_tail"]


def test_pytest_item_unsets_the_device_in_the_test_body(tmp_path):
    """The apex item's first pass: pytest with the plugin that undoes the suite's MOREH_AP_DEVICE=cpu."""
    import time
    from types import SimpleNamespace

    from benchmarks.gpu_session import _pytest

    # the suite's mechanism (an autouse fixture setting cpu through monkeypatch), outside the repository's tests
    (tmp_path / "conftest.py").write_text(
        "import pytest\n\n@pytest.fixture(autouse=True)\ndef _cpu(monkeypatch):\n"
        "    monkeypatch.setenv('MOREH_AP_DEVICE', 'cpu')\n")
    probe = tmp_path / "test_probe.py"
    probe.write_text("import os\n\ndef test_device_unset():\n    assert 'MOREH_AP_DEVICE' not in os.environ\n")
    args = SimpleNamespace(out=str(tmp_path))
    plain = _pytest(args, [str(probe)], deadline=time.time() + 60, name="plain", extra=[])
    unset = _pytest(args, [str(probe), "tests/unit/no_such_file.py"], deadline=time.time() + 60, name="unset",
                    extra=["-p", "benchmarks._pytest_device_unset"])
    assert plain["rc"] == 1 and plain["status"].startswith("failed") and "1 failed" in plain["summary"]
    assert unset["rc"] == 0 and unset["status"] == "ok" and "1 passed" in unset["summary"]
    assert unset["missing_files"] == ["tests/unit/no_such_file.py"]
