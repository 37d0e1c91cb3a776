# Benchmark: `moreh-ap plan --calibration` on the H200 profile vs the 10 training runs measured on that GPU.
"""Run from the repository root: ``python benchmarks/bench_gpu_truth.py``.

For every run of ``benchmarks/data/h200/runs.json`` (one H200, world 1: Llama 1B in 8 configurations,
GPT-2 1.5B in 2) this calls the command line exactly as a user would::

    moreh-ap plan --hf-config '<the run's hf_config>' --batch-size <global_batch> --seq-len <seq_len>
                  --preset h200 --calibration benchmarks/data/h200/profile.json --config '<the run's line>'
                  [--no-mixed-precision] --optimizer adamw

(in process, through ``moreh_ap.cli.main``) and compares its predicted step time and peak memory with
the measured ``step_s_median`` and ``peak_allocated``. The planner never reads runs.json; this
benchmark does. Targets (step time): median |error| <= 10 %, max <= 25 %.

Prints a table and writes benchmarks/results/bench_gpu_truth.json.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moreh_ap.cli import main  # noqa: E402

DATA = ROOT / "benchmarks" / "data" / "h200"
RUNS = DATA / "runs.json"
PROFILE = DATA / "profile.json"
RESULT = ROOT / "benchmarks" / "results" / "bench_gpu_truth.json"
TIME_TARGET = {"median_abs_pct": 10.0, "max_abs_pct": 25.0}


def cli_argv(run: dict, *, profile: Path = PROFILE) -> list[str]:
    """The ``moreh-ap`` arguments that evaluate ``run``'s configuration with the profile's timings."""
    argv = ["plan", "--hf-config", json.dumps(run["hf_config"]), "--batch-size", str(run["global_batch"]),
            "--seq-len", str(run["seq_len"]), "--preset", "h200", "--calibration", str(profile),
            "--config", run["line"], "--optimizer", "adamw"]
    return argv + ([] if run["mixed_precision"] else ["--no-mixed-precision"])


def predict(run: dict, *, profile: Path = PROFILE) -> dict:
    """The CLI's JSON for ``run`` (raises RuntimeError with its stderr when it fails)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(cli_argv(run, profile=profile))
    if rc != 0:
        raise RuntimeError(f"moreh-ap plan exited {rc}: {err.getvalue()[-2000:]}")
    return json.loads(out.getvalue())


def evaluate(runs_path: Path = RUNS, *, profile: Path = PROFILE) -> dict:
    """Predicted vs measured step time and peak memory for every run, with summary errors (percent)."""
    runs = json.loads(runs_path.read_text())["runs"]
    rows = []
    for i, run in enumerate(runs):
        pred = predict(run, profile=profile)
        meas = run["measured"]
        t_err = (pred["step_time"] - meas["step_s_median"]) / meas["step_s_median"] * 100
        m_err = (pred["peak_bytes"] - meas["peak_allocated"]) / meas["peak_allocated"] * 100
        c = pred["config"]
        rows.append({
            "run": i, "model": run["model"], "mixed_precision": run["mixed_precision"],
            "config": f"bpd {c['batch_per_device']} nmb {c['num_micro_batches']} rec {int(c['recomputation'])}",
            "line": run["line"], "predicted_step_s": pred["step_time"], "measured_step_s": meas["step_s_median"],
            "step_error_pct": t_err, "predicted_peak_bytes": pred["peak_bytes"],
            "measured_peak_bytes": meas["peak_allocated"], "peak_error_pct": m_err,
            "feasible": pred["feasible"], "time_breakdown": pred["time_breakdown"],
        })
    t_abs = [abs(r["step_error_pct"]) for r in rows]
    m_err = [r["peak_error_pct"] for r in rows]
    summary = {
        "step_median_abs_pct": statistics.median(t_abs), "step_max_abs_pct": max(t_abs),
        "peak_min_pct": min(m_err), "peak_max_pct": max(m_err),
    }
    summary["time_target_met"] = (summary["step_median_abs_pct"] <= TIME_TARGET["median_abs_pct"]
                                  and summary["step_max_abs_pct"] <= TIME_TARGET["max_abs_pct"])
    return {"rows": rows, "summary": summary, "time_target": TIME_TARGET}


def table(result: dict) -> str:
    """The rows as a text table."""
    gib = 1024**3
    lines = [f"{'#':>2} {'model':<10} {'prec':<4} {'config':<20} {'pred s':>7} {'meas s':>7} {'err %':>6} "
             f"{'pred GiB':>8} {'meas GiB':>8} {'err %':>6}"]
    for r in result["rows"]:
        lines.append(
            f"{r['run']:>2} {r['model']:<10} {'bf16' if r['mixed_precision'] else 'fp32':<4} {r['config']:<20} "
            f"{r['predicted_step_s']:>7.3f} {r['measured_step_s']:>7.3f} {r['step_error_pct']:>+6.1f} "
            f"{r['predicted_peak_bytes'] / gib:>8.1f} {r['measured_peak_bytes'] / gib:>8.1f} {r['peak_error_pct']:>+6.1f}")
    s = result["summary"]
    lines.append(f"step time |error|: median {s['step_median_abs_pct']:.1f} %, max {s['step_max_abs_pct']:.1f} % "
                 f"(target <= {TIME_TARGET['median_abs_pct']:.0f} / {TIME_TARGET['max_abs_pct']:.0f} %: "
                 f"{'met' if s['time_target_met'] else 'NOT met'}); peak error {s['peak_min_pct']:+.1f} .. "
                 f"{s['peak_max_pct']:+.1f} %")
    return "\n".join(lines)


def run() -> dict:
    """Evaluate, print the table, write the JSON."""
    t0 = time.perf_counter()
    result = evaluate()
    result["seconds"] = time.perf_counter() - t0
    result["profile"] = str(PROFILE.relative_to(ROOT))
    print(table(result))
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULT.relative_to(ROOT)} ({result['seconds']:.1f} s)")
    return result


if __name__ == "__main__":
    os.environ.setdefault("MOREH_AP_EXIT_ON_ERROR", "0")
    run()
