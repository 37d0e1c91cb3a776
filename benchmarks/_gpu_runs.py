# The gpu_session items that train: the H200 runs re-measured with today's code next to today's prediction.
"""Used by ``benchmarks/gpu_session.py`` (items ``runs`` and ``closed_loop``), in a child process of its own.

Each run of ``benchmarks/data/h200/runs.json`` is re-measured as it was then: the model built from
``hf_config`` (fp32 weights, ``torch.manual_seed(0)``, initialized on the device), ``moreh_ap.parallelize(model,
config, optimizer=AdamW(fused=True), prediction=plan)``, ``train_step(input_ids=ids, labels=ids)`` +
``optimizer.step()`` + ``zero_grad(set_to_none=True)``, six steps; the median of steps 3-6 (device
synchronized around each) and ``max_memory_allocated`` over steps 3-6 (peak stats reset before step 3).
The prediction is today's planner: ``Cluster.detect(calibrate=True)`` (the base calibration, timed) and,
once per model, the calibration at the model's own shapes (``calibrate_model``, every dtype / recomputation
the runs use; timed), then the planner with the options pinned to the run's configuration (the models alone,
and ``moreh_ap.plan`` corrected by the measurements of the runs before, see :func:`predict`).
The engine's closed-loop line ("Measured steps 2-3: ...") is captured for every run.
"""
from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "data" / "h200" / "runs.json"
LOOP_MARK = "Measured steps 2-3"
BUILD_S = 10.0  # estimated seconds to build one model on the GPU (ordering only)
CALIBRATION_S = 50.0  # estimated seconds of one model's shape calibration (ordering only)

# Dry run (CPU): a tiny Llama in two configurations, so the measuring code runs end to end in seconds.
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 256,
              "max_position_embeddings": 64, "use_cache": False, "tie_word_embeddings": False}
_TINY_LINE = ("num_stages : 1, num_micro_batches : {nmb}, batch_per_device : {bpd}, No TP, recomputation : {rec}, "
              "distribute_param : false, distribute_low_prec_param : false")
DRY_RUNS = [
    {"model": "tiny-llama", "global_batch": 4, "seq_len": 32, "hf_config": TINY_LLAMA, "mixed_precision": False,
     "line": _TINY_LINE.format(nmb=1, bpd=4, rec=0), "measured": {"step_s_median": 0.01, "peak_allocated": 1}},
    {"model": "tiny-llama", "global_batch": 4, "seq_len": 32, "hf_config": TINY_LLAMA, "mixed_precision": False,
     "line": _TINY_LINE.format(nmb=2, bpd=2, rec=1), "measured": {"step_s_median": 0.02, "peak_allocated": 1}},
]


def order_runs(runs: list[dict]) -> list[int]:
    """Run indices, cheapest first (greedy: six steps + a build, + a calibration for a model not seen yet)."""
    left, seen, order = list(range(len(runs))), set(), []
    while left:
        def cost(i: int) -> float:
            r = runs[i]
            return 6 * r["measured"]["step_s_median"] + BUILD_S + (0 if r["model"] in seen else CALIBRATION_S)
        best = min(left, key=cost)
        order.append(best)
        seen.add(runs[best]["model"])
        left.remove(best)
    return order


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(hf_config: dict, *, device: torch.device):
    """The HF causal LM of ``hf_config``: fp32, seed 0, initialized on ``device``, sdpa attention."""
    import transformers

    data = {k: v for k, v in hf_config.items() if k != "architectures"}
    cfg = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    cfg.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return model.float()


def _inputs(run: dict, *, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    vocab = run["hf_config"]["vocab_size"]
    return torch.randint(0, vocab, (run["global_batch"], run["seq_len"]), generator=g).to(device)


def _options(config) -> Any:
    from moreh_ap.ap_options import APOptions

    return APOptions(pipeline_parallel=config.num_stages > 1, num_stages=config.num_stages,
                     num_micro_batches=config.num_micro_batches, activation_recomputation=config.recomputation,
                     distribute_parameter=False, mixed_precision=config.mixed_precision, tensor_parallel=1)


def _candidate(plan, config) -> Any:
    return next((c for c in plan.candidates if c.config == config), None)


def predict(run: dict, model, ids, *, cluster, optimizer, calibrated: dict) -> dict:
    """Today's prediction for ``run``'s configuration (and the shape calibration when the model is new).

    ``step_s`` / ``peak``: the models alone (``plan_graph(use_measurements=False)``: the runs before this one
    stored the engine's measurements of the same model, which a re-plan uses); ``*_corrected``: what
    ``moreh_ap.plan`` predicts with those measurements, as a user's re-plan would."""
    import moreh_ap
    from moreh_ap.config import ParallelConfig
    from moreh_ap.planner.planning import plan_graph
    from moreh_ap.planner.shape_calibration import calibrate_model
    from moreh_ap.planner.tp import tp_facts

    config = ParallelConfig.from_moreh_line(run["line"]).replace(mixed_precision=run["mixed_precision"])
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    graph = moreh_ap.trace(model, (ids,), {"labels": ids})
    out["trace_s"] = time.perf_counter() - t0
    if run["model"] not in calibrated:
        t0 = time.perf_counter()
        summary = calibrate_model(cluster, graph, model=model, args=(ids,), kwargs={"labels": ids},
                                  optimizer=optimizer, dtypes=("bf16", "fp32"), recomputes=(False, True))
        calibrated[run["model"]] = dict(summary, wall_s=time.perf_counter() - t0)
        out["shape_calibration"] = calibrated[run["model"]]
        free = plan_graph(graph, cluster=cluster, options=None, optimizer=optimizer,
                          tp=tp_facts(model, (ids,), {"labels": ids}), use_measurements=False)
        out["planner_pick"] = {"line": free.config.to_moreh_line(), "step_s": free.selected.step_time,
                               "peak": free.selected.memory.total}  # what it picks with every option 'auto'
    t0 = time.perf_counter()
    pure = plan_graph(graph, cluster=cluster, options=_options(config), optimizer=optimizer,
                      tp=tp_facts(model, (ids,), {"labels": ids}), use_measurements=False)
    out["plan_s"] = time.perf_counter() - t0
    corrected = moreh_ap.plan(model, (ids,), {"labels": ids}, cluster=cluster, options=_options(config),
                              optimizer=optimizer)
    out["plan_config"] = pure.config.to_moreh_line()
    cand, corr = _candidate(pure, config), _candidate(corrected, config)
    if cand is None:
        out["error"] = "the plan has no candidate with the run's configuration"
        return {"config": config, "plan": pure, **out}
    out.update(step_s=cand.step_time, peak=cand.memory.total, feasible=cand.feasible,
               time_breakdown=cand.time_breakdown, memory=cand.to_dict().get("memory"))
    out["corrections_applied"] = corrected.corrections is not None
    if corr is not None:
        out.update(step_s_corrected=corr.step_time, peak_corrected=corr.memory.total)
    return {"config": config, "plan": pure, **out}


def measure(run: dict, *, device: torch.device, cluster, calibrated: dict, steps: int = 6) -> dict:
    """One run: prediction, then six training steps; returns the row (measured, predicted, errors)."""
    import moreh_ap

    model = build_model(run["hf_config"], device=device)
    ids = _inputs(run, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    pred = predict(run, model, ids, cluster=cluster, optimizer=opt, calibrated=calibrated)
    pm = moreh_ap.parallelize(model, pred["config"], optimizer=opt, prediction=pred["plan"])
    times = []
    for step in range(steps):
        if step == 2 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        pm.train_step(input_ids=ids, labels=ids)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    meas = {"step_s_median": statistics.median(times[2:]), "step_s_all": times}
    if device.type == "cuda":
        meas.update(peak_allocated=torch.cuda.max_memory_allocated(device),
                    peak_reserved=torch.cuda.max_memory_reserved(device))
    del pm, opt, model
    predicted = {k: v for k, v in pred.items() if k not in ("config", "plan")}
    return {"measured": meas, "predicted": predicted}


def _errors(row: dict) -> None:
    m, p = row.get("measured", {}), row.get("predicted", {})
    if "step_s" in p and m.get("step_s_median"):
        row["step_error_pct"] = (p["step_s"] - m["step_s_median"]) / m["step_s_median"] * 100
    if "peak" in p and m.get("peak_allocated"):
        row["peak_error_pct"] = (p["peak"] - m["peak_allocated"]) / m["peak_allocated"] * 100


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_all(runs: list[dict], *, device: torch.device, deadline: float, save: Callable[[dict], None],
            dry: bool = False) -> dict:
    """Every run that can start before ``deadline`` (cheapest first); ``save`` is called after each."""
    from moreh_ap.log import logger
    from moreh_ap.planner.cluster import Cluster

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m).rstrip()), level="INFO", format="{message}",
                      filter=lambda r: LOOP_MARK in r["message"])
    t0 = time.perf_counter()
    cluster = Cluster.detect(calibrate=True)
    db = cluster.calibration
    result: dict[str, Any] = {
        "device": str(device), "dry_run": dry, "cluster": cluster.name, "device_memory": cluster.device_memory,
        "base_calibration": {"wall_s": time.perf_counter() - t0, "source": db.source if db else None,
                             "measure_s": getattr(db, "measure_s", None)},
        "order": order_runs(runs), "rows": [], "not_started": [], "shape_calibration": {}}
    save(result)
    for i in result["order"]:
        run = runs[i]
        row: dict[str, Any] = {"run": i, "model": run["model"], "line": run["line"],
                               "mixed_precision": run["mixed_precision"], "h200_at_78c291a": run["measured"]}
        need = 6 * run["measured"]["step_s_median"] + (not dry) * (
            BUILD_S + CALIBRATION_S * (run["model"] not in result["shape_calibration"]))
        if time.perf_counter() + need > deadline:
            result["not_started"].append(i)
            continue
        if device.type == "cuda" and run["measured"]["peak_allocated"] > 0.97 * cluster.device_memory:
            row["status"] = (f"skipped: measured {run['measured']['peak_allocated'] / 2**30:.1f} GiB on the H200, "
                             f"this device has {cluster.device_memory / 2**30:.1f} GiB")
            result["rows"].append(row)
            continue
        n0, t1 = len(lines), time.perf_counter()
        try:
            row.update(measure(run, device=device, cluster=cluster, calibrated=result["shape_calibration"]))
            row["status"] = "ok"
        except Exception as exc:  # one run's failure (e.g. out of memory) never stops the others
            row["status"] = f"error: {type(exc).__name__}: {str(exc)[:1500]}"
        row["seconds"] = time.perf_counter() - t1
        row["closed_loop_line"] = lines[n0] if len(lines) > n0 else None
        _errors(row)
        result["rows"].append(row)
        _free(device)
        save(result)
    logger.remove(sink)
    result["summary"] = summarize(result["rows"])
    save(result)
    return result


def summarize(rows: list[dict]) -> dict:
    """Median / max |step error| and the peak error range over the runs that measured."""
    t = [abs(r["step_error_pct"]) for r in rows if "step_error_pct" in r]
    m = [r["peak_error_pct"] for r in rows if "peak_error_pct" in r]
    return {"ran": sum(r.get("status") == "ok" for r in rows), "step_median_abs_pct": statistics.median(t) if t else None,
            "step_max_abs_pct": max(t) if t else None, "peak_min_pct": min(m) if m else None,
            "peak_max_pct": max(m) if m else None}


def load_runs(*, dry: bool) -> list[dict]:
    """The H200 runs (or the tiny CPU ones of the dry run)."""
    return DRY_RUNS if dry else json.loads(RUNS.read_text())["runs"]


def table(result: dict) -> str:
    """The runs as a text table."""
    gib = 1024**3
    lines = [f"{'#':>2} {'model':<10} {'prec':<4} {'status':<8} {'pred s':>7} {'meas s':>7} {'err %':>6} "
             f"{'pred GiB':>8} {'meas GiB':>8} {'err %':>6}"]
    for r in result.get("rows", []):
        p, m = r.get("predicted", {}), r.get("measured", {})
        f = (lambda v, s=1, w=7, d=3: f"{v / s:>{w}.{d}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}")
        lines.append(f"{r['run']:>2} {r['model']:<10} {'bf16' if r['mixed_precision'] else 'fp32':<4} "
                     f"{r['status'][:8]:<8} {f(p.get('step_s'))} {f(m.get('step_s_median'))} "
                     f"{f(r.get('step_error_pct'), w=6, d=1)} {f(p.get('peak'), gib, 8, 1)} "
                     f"{f(m.get('peak_allocated'), gib, 8, 1)} {f(r.get('peak_error_pct'), w=6, d=1)}")
    return "\n".join(lines)
