# Benchmark: the planner's predicted step time vs the measured one, for every config it can emit on 2 CPU ranks.
"""One ``torchrun --standalone --nproc-per-node 2`` launch (gloo, OMP_NUM_THREADS=1) that

1. detects the cluster and measures the calibration DB on that 2-rank group
   (``Cluster.detect(calibrate=True)``, a fresh cache dir unless ``--cache-dir``);
2. traces a small plain-torch GPT on one global batch, calibrates at its shapes as ``plan()`` does
   (``shape_calibration.calibrate_for_plan``: its own block, head + loss, AdamW step, GEMMs; both ranks)
   and runs the planner (``plan_graph``): every candidate with its predicted step time and breakdown;
3. for each feasible candidate (capped by ``--max-configs``; the planner's pick is always
   kept) builds the same model, ``moreh_ap.parallelize(model, config, optimizer=AdamW)``,
   runs ``--warmup`` steps, then ``--steps`` steps each timed between barriers
   (``train_step`` + ``optimizer.step`` + ``zero_grad``; the slower rank's time), and takes the
   median over all rounds.

Printed: one row per config (seed line, schedule, predicted ms, measured ms, error %), the
Spearman rank correlation of predicted vs measured, and the planner's regret = measured time of
its pick / best measured time. JSON in ``benchmarks/results/bench_cost_model.json``.

    python benchmarks/bench_cost_model.py [--rounds 3] [--steps 3] [--warmup 1] [--max-configs 40] [--batch 8]

The machine may be shared: each config is measured in ``--rounds`` passes over the whole list (the
order reversed every other pass) so that load changes spread over all configs; the load average
before and after is written to the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpt import lm_loss, make_gpt  # noqa: E402

VOCAB, SEQ, DIM, LAYERS, HEADS = 2048, 128, 256, 4, 4


def _model():
    return make_gpt(vocab=VOCAB, seq=SEQ, dim=DIM, layers=LAYERS, heads=HEADS)


_loss = lm_loss


def _sched(cfg) -> str:
    if cfg.num_stages == 1:
        return "-"
    return cfg.schedule + (f"x{cfg.stages_per_rank}" if cfg.stages_per_rank > 1 else "")


def _label(cfg) -> str:
    dp = "ddp" if not cfg.distribute_param else ("zero3" if cfg.distribute_low_prec_param else "zero2")
    return (f"pp{cfg.num_stages} nmb{cfg.num_micro_batches} bpd{cfg.batch_per_device} {_sched(cfg)} "
            f"rec{int(cfg.recomputation)} {dp if cfg.num_stages == 1 else ('repl' if not cfg.distribute_param else dp)}")


def _pick(cands: list, selected, cap: int, only: str = "") -> list:
    """At most ``cap`` feasible candidates, spread over the list, the planner's pick always included.

    ``only``: comma-separated substrings of the config label; keep matching candidates (and the pick).
    """
    feas = [c for c in cands if c.feasible]
    if only:
        keys = [k.strip() for k in only.split(",") if k.strip()]
        feas = [c for c in feas if c.config == selected or any(k in _label(c.config) for k in keys)]
    if len(feas) <= cap:
        return feas
    step = len(feas) / cap
    chosen = [feas[int(i * step)] for i in range(cap)]
    if not any(c.config == selected for c in chosen):
        chosen[-1] = next(c for c in feas if c.config == selected)
    return chosen


def _time_config(cfg, x, y, *, warmup: int, steps: int) -> list[float]:
    """Seconds per step (each between barriers) of ``cfg`` through moreh_ap.parallelize."""
    import torch
    import torch.distributed as dist

    import moreh_ap

    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pm = moreh_ap.parallelize(model, cfg, optimizer=opt, loss_fn=_loss)

    def step():
        pm.train_step(x, target=y)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    out = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        dist.barrier()
        out.append(time.perf_counter() - t0)
    t = torch.tensor(out, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    del pm, opt, model
    return t.tolist()


def _worker(out: str, batch: int, warmup: int, steps: int, max_configs: int, rounds: int, only: str) -> None:
    import gc

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import moreh_ap
    from moreh_ap.ap_options import APOptions
    from moreh_ap.planner.cluster import Cluster
    from moreh_ap.planner.planning import plan_graph
    from moreh_ap.planner.shape_calibration import calibrate_for_plan

    moreh_ap.runtime.init_distributed()
    rank = dist.get_rank()
    t0 = time.perf_counter()
    cluster = Cluster.detect(calibrate=True)  # measured on this 2-rank group (all ranks take part)
    calib_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    y = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    model = _model()
    graph = moreh_ap.trace(model, args=(x,))
    t1 = time.perf_counter()
    # as plan() does for a model that exists: its own block / head + loss / optimizer step and GEMMs at its shapes
    shape_cal = calibrate_for_plan(cluster, graph, model=model, args=(x,), kwargs=None,
                                   optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4), options=APOptions())
    shape_cal["seconds"] = time.perf_counter() - t1
    del model
    p = plan_graph(graph, cluster=cluster, optimizer="adamw")
    todo = _pick(p.candidates, p.config, max_configs, only)
    samples: list[list[float]] = [[] for _ in todo]
    for rnd in range(rounds):  # rounds in alternating order: drift of a shared machine hits every config alike
        order = list(range(len(todo)))[:: 1 if rnd % 2 == 0 else -1]
        for i in order:
            samples[i] += _time_config(todo[i].config, x, y, warmup=warmup, steps=steps)
            gc.collect()
            if rank == 0:
                print(f"[round {rnd + 1}/{rounds}, {i + 1}/{len(todo)}] {_label(todo[i].config):42s} predicted "
                      f"{1e3 * todo[i].step_time:8.1f} ms  measured {1e3 * statistics.median(samples[i]):8.1f} ms",
                      flush=True)
    rows = []
    for cand, times in zip(todo, samples):
        rows.append({"label": _label(cand.config), "line": cand.config.to_moreh_line(), "schedule": _sched(cand.config),
                     "config": cand.config.to_dict(), "predicted_s": cand.step_time,
                     "breakdown": dict(cand.time_breakdown), "measured_s": times,
                     "measured_median_s": statistics.median(times), "selected": cand.config == p.config})
    if rank == 0:
        db = cluster.calibration
        with open(out, "w") as f:
            json.dump({"rows": rows, "selected": p.config.to_dict(), "num_candidates": len(p.candidates),
                       "num_feasible": sum(c.feasible for c in p.candidates), "calibration_s": calib_s,
                       "shape_calibration": shape_cal,
                       "calibration": db.to_dict() if db is not None else None,
                       "calibration_source": db.source if db is not None else None,
                       "cluster": cluster.to_dict(), "params": graph.total_params}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):  # average ranks of ties
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((p - ma) * (q - mb) for p, q in zip(ra, rb))
    den = (sum((p - ma) ** 2 for p in ra) * sum((q - mb) ** 2 for q in rb)) ** 0.5
    return cov / den if den else float("nan")


def _launch(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOREH_")}
        env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", MOREH_AP_DIST_TIMEOUT=str(args.dist_timeout),
                   MOREH_AP_CACHE_DIR=args.cache_dir or os.path.join(tmp, "cache"),
                   PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(Path(__file__).resolve()), "--worker", out, str(args.batch), str(args.warmup), str(args.steps),
               str(args.max_configs), str(args.rounds), args.only]
        try:
            rc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            raise SystemExit(f"bench_cost_model: the 2-rank launch ran past {args.timeout} s")
        if rc or not os.path.exists(out):
            raise SystemExit(f"bench_cost_model: the 2-rank launch failed (exit {rc})")
        with open(out) as f:
            return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="global batch (samples of SEQ tokens)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after each build")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per config per round")
    ap.add_argument("--rounds", type=int, default=3, help="passes over the configs (each config rebuilt per pass); "
                    "the median of all rounds' steps is reported")
    ap.add_argument("--max-configs", type=int, default=40)
    ap.add_argument("--only", default="", help="comma-separated label substrings: measure only those configs")
    ap.add_argument("--cache-dir", default=None, help="calibration cache (default: a fresh one, measured now)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole 2-rank launch")
    ap.add_argument("--dist-timeout", type=int, default=120, help="seconds any collective may wait (a busy machine "
                    "needs more)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_cost_model.json"))
    args = ap.parse_args()
    t0 = time.time()
    load_before = os.getloadavg()
    r = _launch(args)
    rows = r["rows"]
    for row in rows:
        row["error_pct"] = 100.0 * (row["predicted_s"] - row["measured_median_s"]) / row["measured_median_s"]
    pred = [row["predicted_s"] for row in rows]
    meas = [row["measured_median_s"] for row in rows]
    best = min(rows, key=lambda row: row["measured_median_s"])
    sel = next(row for row in rows if row["selected"])
    regret = sel["measured_median_s"] / best["measured_median_s"]
    rho = _spearman(pred, meas)
    abs_err = [abs(row["error_pct"]) for row in rows]
    sc = r.get("shape_calibration") or {}
    print(f"\ncalibration: base {r['calibration_s']:.1f} s, at the model's shapes {sc.get('seconds', 0.0):.1f} s "
          f"({sc.get('timed', 0)} of {sc.get('total', 0)} items)")
    print(f"GPT {r['params']:,} params, global batch {args.batch} x {SEQ} tokens, 2 ranks (gloo, 1 thread each); "
          f"{r['num_candidates']} candidates, {r['num_feasible']} feasible, {len(rows)} measured")
    print(f"{'config':42s} {'pred ms':>8s} {'meas ms':>8s} {'err %':>7s}")
    for row in sorted(rows, key=lambda row: row["measured_median_s"]):
        mark = "  <- planner's pick" if row["selected"] else ("  <- best measured" if row is best else "")
        print(f"{row['label']:42s} {1e3 * row['predicted_s']:8.1f} "
              f"{1e3 * row['measured_median_s']:8.1f} {row['error_pct']:+7.1f}{mark}")
    print(f"Spearman rank correlation (predicted vs measured): {rho:.3f}")
    print(f"median |error| {statistics.median(abs_err):.1f} %, max |error| {max(abs_err):.1f} %")
    print(f"regret (measured time of the planner's pick / best measured): {regret:.3f} "
          f"({1e3 * sel['measured_median_s']:.1f} ms vs {1e3 * best['measured_median_s']:.1f} ms for {best['label']})")
    per_round = []  # the same statistics from each round alone: how much of the above is the machine's noise
    for k in range(args.rounds):
        med = [statistics.median(row["measured_s"][k * args.steps:(k + 1) * args.steps]) for row in rows]
        sel_k = next(m for m, row in zip(med, rows) if row["selected"])
        per_round.append({"spearman": _spearman(pred, med), "regret": sel_k / min(med)})
    print("per round alone: Spearman " + " / ".join(f"{r['spearman']:.2f}" for r in per_round)
          + ", regret " + " / ".join(f"{r['regret']:.2f}" for r in per_round))
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "model": dict(vocab=VOCAB, seq=SEQ, dim=DIM,
            layers=LAYERS, heads=HEADS, params=r["params"]), "global_batch": args.batch, "warmup": args.warmup,
            "steps": args.steps, "rounds": args.rounds, "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "wall_s": time.time() - t0}
    summary = {"spearman": rho, "regret": regret, "median_abs_error_pct": statistics.median(abs_err),
               "max_abs_error_pct": max(abs_err), "selected": sel["label"], "best_measured": best["label"],
               "per_round": per_round}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "summary": summary, **r}, f, indent=1)
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], *map(int, sys.argv[3:8]), sys.argv[8] if len(sys.argv) > 8 else "")
    else:
        main()
