# One prepared command for a session lent a GPU: every device check of issue 13, each bounded, results in one JSON.
"""Run from the repository root. The device command for the next session that is lent a GPU (one ``run`` call;
device time is 15 minutes in all including the machine's start, at most 10 minutes a command)::

    PY=$(command -v python || command -v python3); $PY benchmarks/gpu_session.py --out $OUT --budget-s 500

(the ``run`` tool's ``command``, with ``timeout_s=570``; the machine's start counts against the 15 minutes too).
Everything lands in ``$OUT`` (session.json first); the printed table is in the reply's output tail.

On CPU, to test the same code paths with tiny models and budgets::

    python benchmarks/gpu_session.py --dry-run --budget-s 60 --out /tmp/gpu_session

Items, in this order, each in a child process of its own bounded by its share of ``--budget-s`` (plus what the
items before it left unused); a failing, hanging or crashing item never stops the others:

1. ``env``: Python / torch / transformers versions, the dependencies importable, the GPU's name and memory,
   ``torch.cuda.max_memory_allocated`` works.
2. ``runs``: the runs of ``benchmarks/data/h200/runs.json`` re-measured with today's code next to today's
   prediction on this device (:mod:`benchmarks._gpu_runs`; ``Cluster.detect(calibrate=True)`` and the
   shape calibration timed); cheapest first, no new run started once the share is spent.
3. ``closed_loop``: the engine's one line "Measured steps 2-3: ... predicted ..." for one run (taken from the
   ``runs`` item, else one run of its own).
4. ``lamb``: ``benchmarks/bench_lamb.py --device cuda`` with short settings.
5. ``apex``: the apex amp tests (``tests/unit/test_apex_amp*.py``) under pytest with the GPU visible, once with
   ``MOREH_AP_DEVICE`` unset in each test's body (:mod:`benchmarks._pytest_device_unset`), once as the suite runs
   them (its conftest sets ``cpu``); failures kept verbatim (a previous GPU run failed O1 with a CPU model on a CUDA machine:
   "Found dtype Float but expected Half").
6. ``subset``: the test files that exercise device choice, ``pytest -x -q``.

``--dry-run``: the runs item trains a tiny Llama on CPU (``MOREH_AP_DEVICE=cpu``, calibration budgets cut to
seconds); the items that need CUDA report "skipped: ...". Writes ``session.json`` (every item: status, seconds,
limit, output tail, its result) and one ``<item>.json`` / ``<item>.log`` per item under ``--out`` (default
benchmarks/results/gpu_session), and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_session"
# (item, share of the budget); what an item leaves unused goes to the next
ITEMS = [("env", 0.04), ("runs", 0.55), ("closed_loop", 0.05), ("lamb", 0.08), ("apex", 0.11), ("subset", 0.17)]
APEX_TESTS = ["tests/unit/test_apex_amp.py", "tests/unit/test_apex_amp_training.py"]
SUBSET_TESTS = ["tests/unit/test_cuda_calls.py", "tests/unit/test_cuda_deferral.py", "tests/unit/test_devices.py",
                "tests/unit/test_cluster.py", "tests/unit/test_oneline.py", "tests/unit/test_rng_isolation.py"]
TAIL = 4000
MIN_ITEM_S = 20.0  # no item gets less (within what is left): starting Python and torch takes seconds


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def _cuda(out: str) -> bool:
    """Whether CUDA is available: the env item's answer when it gave one (no torch import), else torch's."""
    path = Path(out) / "env.json"
    known = json.loads(path.read_text()).get("cuda_available") if path.exists() else None
    if isinstance(known, bool):
        return known
    import torch

    return torch.cuda.is_available()


def _no_cuda_reason(args) -> str | None:
    if args.dry_run:
        return "skipped: dry run" if _cuda(args.out) else "skipped: no CUDA"
    return None if _cuda(args.out) else "skipped: no CUDA"


# ----------------------------------------------------------------------------------------------- items
def item_env(args) -> dict:
    """Versions, dependencies, the GPU and whether max_memory_allocated works."""
    import importlib
    import platform

    import torch

    out: dict = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
                 "cuda_available": torch.cuda.is_available(), "modules": {}}
    for name in ("transformers", "accelerate", "loguru", "pytest", "moreh_ap"):
        try:
            mod = importlib.import_module(name)
            out["modules"][name] = getattr(mod, "__version__", "?")
        except Exception as exc:
            out["modules"][name] = f"missing: {type(exc).__name__}: {exc}"
    if out["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_total_memory=props.total_memory, device_count=torch.cuda.device_count())
        torch.cuda.reset_peak_memory_stats()
        x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
        peak = torch.cuda.max_memory_allocated()
        out["max_memory_allocated_works"] = peak >= x.numel()
        out["max_memory_allocated_after_64MiB"] = peak
    out["status"] = "ok" if out["cuda_available"] or args.dry_run else "error: no CUDA"
    return out


def item_runs(args, deadline: float, save) -> dict:
    """The runs.json runs re-measured next to today's prediction (tiny CPU ones in a dry run)."""
    from benchmarks import _gpu_runs

    reason = None if args.dry_run else _no_cuda_reason(args)
    if reason:
        return {"status": reason}
    import torch

    if args.dry_run:
        from moreh_ap.planner import calibration, shape_calibration

        calibration.BASE_BUDGET_S["cpu"] = 1.0  # tiny budgets: the code paths, not the numbers
        shape_calibration.BUDGET_S["cpu"] = 2.0
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    runs = _gpu_runs.load_runs(dry=args.dry_run)
    result = _gpu_runs.run_all(runs, device=device, deadline=deadline, save=save, dry=args.dry_run)
    print(_gpu_runs.table(result))
    ok = sum(r.get("status") == "ok" for r in result["rows"])
    result["status"] = "ok" if ok == len(runs) else f"partial: {ok} of {len(runs)} runs measured"
    return result


def item_closed_loop(args, deadline: float, save) -> dict:
    """The closed loop's one-line report for one run (from the runs item, else one run of its own)."""
    path = Path(args.out) / "runs.json"
    rows = json.loads(path.read_text()).get("rows", []) if path.exists() else []
    for r in rows:
        if r.get("closed_loop_line"):
            return {"status": "ok", "source": f"runs item, run {r['run']}", "line": r["closed_loop_line"]}
    reason = None if args.dry_run else _no_cuda_reason(args)
    if reason:
        return {"status": reason}
    from benchmarks import _gpu_runs

    import torch

    runs = _gpu_runs.load_runs(dry=args.dry_run)
    cheapest = _gpu_runs.order_runs(runs)[:1]
    result = _gpu_runs.run_all([runs[i] for i in cheapest], device=torch.device("cpu" if args.dry_run else "cuda"),
                               deadline=deadline, save=save, dry=args.dry_run)
    line = next((r["closed_loop_line"] for r in result["rows"] if r.get("closed_loop_line")), None)
    return {"status": "ok" if line else "error: no closed-loop line logged", "source": "own run", "line": line,
            "run": result}


def _bounded(cmd: list[str], *, deadline: float, log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` until ``deadline`` (its process group killed then); stdout+stderr to ``log``."""
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = "timeout"
    text = log.read_text(errors="replace")
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": time.time() - t0, "output_tail": text[-TAIL:]}


def item_lamb(args, deadline: float, save) -> dict:
    """benchmarks/bench_lamb.py --device cuda, short settings."""
    reason = _no_cuda_reason(args)
    if reason:
        return {"status": reason}
    out = Path(args.out) / "bench_lamb.json"
    res = _bounded([sys.executable, "benchmarks/bench_lamb.py", "--device", "cuda", "--numel", "20000000",
                    "--tensors", "100", "--iters", "5", "--out", str(out)],
                   deadline=deadline, log=Path(args.out) / "lamb.cmd.log")
    if out.exists():
        res["bench"] = json.loads(out.read_text())
    res["status"] = "ok" if res["rc"] == 0 else f"error: rc {res['rc']}"
    return res


def _pytest(args, files: list[str], *, deadline: float, name: str, extra: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MOREH_AP_DEVICE"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    present = [f for f in files if (ROOT / f).exists()]
    res = _bounded([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *extra, *present],
                   deadline=deadline, log=Path(args.out) / f"{name}.pytest.log", env=env)
    res["files"], res["missing_files"] = present, sorted(set(files) - set(present))
    summary = [ln for ln in res["output_tail"].splitlines() if " passed" in ln or " failed" in ln or " error" in ln]
    res["summary"] = summary[-1] if summary else None
    res["status"] = "ok" if res["rc"] == 0 else f"failed: rc {res['rc']}: {res['summary']}"
    return res


def item_apex(args, deadline: float, save) -> dict:
    """The apex amp tests on the GPU machine, failures verbatim: first with MOREH_AP_DEVICE unset in each test's
    body (a plugin undoes the suite's ``cpu``), then as the suite runs them (MOREH_AP_DEVICE=cpu)."""
    reason = _no_cuda_reason(args)
    if reason:
        return {"status": reason}
    out, passes = {}, [("device_unset", ["-p", "benchmarks._pytest_device_unset"]), ("suite", [])]
    for i, (name, extra) in enumerate(passes):
        share = deadline if i else time.time() + 0.6 * (deadline - time.time())
        res = _pytest(args, APEX_TESTS, deadline=share, name=f"apex_{name}", extra=["--tb=long", *extra])
        log = (Path(args.out) / f"apex_{name}.pytest.log").read_text(errors="replace")
        res["float_half_error_seen"] = "Found dtype Float but expected Half" in log
        res["failures"] = log[log.find("= FAILURES ="):][:12000] if "= FAILURES =" in log else None
        out[name] = res
        save(out)
    bad = [f"{k}: {v['status']}" for k, v in out.items() if v["status"] != "ok"]
    return dict(out, status="ok" if not bad else "failed: " + "; ".join(bad))


def item_subset(args, deadline: float, save) -> dict:
    """The device-choice test files, pytest -x -q."""
    reason = _no_cuda_reason(args)
    if reason:
        return {"status": reason}
    return _pytest(args, SUBSET_TESTS, deadline=deadline, name="subset", extra=["-x", "--tb=short"])


HANDLERS = {"env": lambda a, d, s: item_env(a), "runs": item_runs, "closed_loop": item_closed_loop,
            "lamb": item_lamb, "apex": item_apex, "subset": item_subset}


def child(args) -> int:
    """``--item NAME``: run one item, writing ``<out>/<item>.json`` as it goes."""
    path = Path(args.out) / f"{args.item}.json"
    t0 = time.time()
    if args.deadline is None:
        args.deadline = t0 + args.budget_s

    def save(partial: dict) -> None:
        _write(path, dict(partial, status="running", seconds=time.time() - t0))

    try:
        result = HANDLERS[args.item](args, args.deadline, save)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        result = {"status": f"error: {type(exc).__name__}: {str(exc)[:2000]}"}
    result["seconds"] = time.time() - t0
    _write(path, result)
    return 0


# ------------------------------------------------------------------------------------------ orchestration
def run_item(name: str, *, limit: float, args) -> dict:
    """One item in a child process bounded by ``limit`` seconds; its JSON (or what it saved) and output tail."""
    out = Path(args.out)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, MOREH_AP_CACHE_DIR=str(out / "cache"), PYTHONPATH=path)
    if args.dry_run:
        env["MOREH_AP_DEVICE"] = "cpu"
    deadline = time.time() + limit
    cmd = [sys.executable, str(Path(__file__).resolve()), "--item", name, "--out", str(out),
           "--deadline", repr(deadline - min(10.0, 0.1 * limit))] + (["--dry-run"] if args.dry_run else [])
    res = _bounded(cmd, deadline=deadline, log=out / f"{name}.log", env=env)
    path = out / f"{name}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    status = result.pop("status", None)
    if res["rc"] == "timeout":
        status = f"timeout after {limit:.0f} s" + (" (partial result kept)" if result else "")
    elif res["rc"] != 0 or status is None:
        status = f"error: child exited {res['rc']}" + (f" ({status})" if status else "")
    return {"status": status, "seconds": res["seconds"], "limit_s": limit, "rc": res["rc"],
            "output_tail": res["output_tail"], "result": result}


def session(args) -> dict:
    """Every item in order; session.json rewritten after each."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "cache", ignore_errors=True)  # a fresh calibration: its time is measured
    start = time.time()
    report = {"budget_s": args.budget_s, "dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
              time.gmtime(start)), "items": {}}
    carry = 0.0
    for name, share in ITEMS:
        left = args.budget_s - (time.time() - start)
        limit = min(max(share * args.budget_s + carry, MIN_ITEM_S), left)
        if limit < 1.0:
            report["items"][name] = {"status": "skipped: the budget is spent", "seconds": 0.0, "limit_s": 0.0}
        else:
            report["items"][name] = run_item(name, limit=limit, args=args)
            carry = max(0.0, limit - report["items"][name]["seconds"])
        print(f"[gpu_session] {name}: {report['items'][name]['status']} "
              f"({report['items'][name]['seconds']:.1f} s of {limit:.0f} s)", flush=True)
        report["seconds"] = time.time() - start
        _write(out / "session.json", report)
    print(table(report))
    return report


def table(report: dict) -> str:
    """Items as a text table (and the runs table when there is one)."""
    lines = [f"{'item':<12} {'seconds':>8} {'limit':>6}  status"]
    for name, it in report["items"].items():
        lines.append(f"{name:<12} {it['seconds']:>8.1f} {it['limit_s']:>6.0f}  {str(it['status'])[:100]}")
    runs = report["items"].get("runs", {}).get("result", {})
    if runs.get("rows"):
        from benchmarks._gpu_runs import table as runs_table

        lines += ["", runs_table(runs), f"summary: {runs.get('summary')}"]
    loop = report["items"].get("closed_loop", {}).get("result", {})
    if loop.get("line"):
        lines += ["", f"closed loop: {loop['line']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="where session.json and the items' files go")
    p.add_argument("--budget-s", type=float, default=540.0, help="seconds for all items together")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models and budgets; CUDA items skipped")
    p.add_argument("--item", choices=sorted(HANDLERS), help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.item:
        return child(args)
    session(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
