# Benchmark: trace + plan wall time (seed case, Llama-2-70B on 8x8 H100, 145B GPT) and Megatron-LM's Table 1 planned.
"""Run from the repository root: ``python benchmarks/bench_planner.py`` (``--megatron`` for Table 1 only;
``--megatron --check PREVIOUS.json``: also exit 1 unless every row planned the same as in that results file,
the pick and every predicted number, e.g. ``git show main:benchmarks/results/bench_planner_megatron.json``).

Megatron's Table 1 (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters
Using Megatron-LM"): GPT-2-shaped models on the meta device with the paper's hidden size, layers and heads,
vocabulary 51,200, sequence 2048 and global batch, on a100-80gb nodes of 8. Per row: planning time (target
<= 10 s), the selected configuration (the paper ran t = 8 from 18B on), and the predicted model-FLOP rate per
GPU, ``72 B s l h^2 (1 + s / 6h + V / 12lh)`` FLOPs per step (the paper's count without recomputation's
extra forward) over the predicted step time and the GPUs, next to the paper's measured rate x 3/4 (the
paper counts the recomputed forward too: 96 instead of 72). Per row "plan s" is the wall time of trace +
plan (the model is built on the meta device before the clock starts), "trace" the tracing part of it, and
"cpu s" this process's CPU seconds for the same work (what the row costs when other processes share the
cores).

Times are taken after imports and after the model is built on the meta device
(both reported separately). Targets on a 2-core machine: seed case <= 1 s for
trace + plan, the others <= 10 s. Writes benchmarks/results/bench_planner.json.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

from moreh_ap.errors import NoFeasibleConfigError  # noqa: E402
from moreh_ap.graph import trace  # noqa: E402
from moreh_ap.planner import Cluster, plan_graph  # noqa: E402
from moreh_ap.planner.tp import tp_facts  # noqa: E402
from moreh_ap.log import logger  # noqa: E402

CASES = [
    # name, model config, global batch, seq, preset, nodes, devices/node, target seconds
    ("seed: llama2-13b, 4 x moreh-64gb", ("llama", dict(hidden_size=5120, intermediate_size=13824,
      num_hidden_layers=40, num_attention_heads=40, vocab_size=32000)), 8, 1024, "moreh-64gb", 4, 1, 1.0),
    ("llama2-70b, 8 x 8 h100-80gb", ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
      num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)), 256, 4096, "h100-80gb", 8, 8, 10.0),
    ("gpt-145b, 192 x 8 a100-80gb", ("gpt2", dict(n_embd=12288, n_layer=80, n_head=96, n_positions=2048,
      vocab_size=51200)), 2304, 2048, "a100-80gb", 192, 8, 10.0),
]


MEGATRON = [
    # params (B), heads, hidden, layers, paper t, paper p, GPUs, global batch, paper TFLOP/s per GPU
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
]
SEQ, VOCAB = 2048, 51200


def megatron_rows() -> list[dict]:
    """Plan every row of Megatron's Table 1; one dict per row (selected line, timings, predicted rate)."""
    rows = []
    for size, heads, hidden, layers, t_paper, p_paper, gpus, batch, tflops in MEGATRON:
        model = build("gpt2", dict(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=SEQ, vocab_size=VOCAB))
        ids = torch.empty(batch, SEQ, dtype=torch.long, device="meta")
        t0, c0 = time.perf_counter(), time.process_time()
        graph = trace(model, (ids,), {"labels": ids})
        trace_s = time.perf_counter() - t0
        cluster = Cluster.preset("a100-80gb", nodes=gpus // 8, devices_per_node=8)
        row = dict(case=f"{size}B / {gpus} GPUs", params=graph.total_params, paper_tp=t_paper, paper_pp=p_paper,
                   paper_model_tflops=tflops * 3 / 4)
        try:
            p = plan_graph(graph, cluster=cluster, tp=tp_facts(model), use_measurements=False)
            flops = 72 * batch * SEQ * layers * hidden**2 * (1 + SEQ / (6 * hidden) + VOCAB / (12 * layers * hidden))
            row.update(feasible=True, tp=p.config.tp, pp=p.config.num_stages, selected=p.config.to_moreh_line(),
                       schedule=p.config.schedule, step_s=p.selected.step_time, candidates=len(p.candidates),
                       fitting=sum(c.feasible for c in p.candidates),
                       predicted_model_tflops=flops / p.selected.step_time / gpus / 1e12,
                       breakdown=p.selected.time_breakdown, memory=p.selected.memory.to_dict())
        except NoFeasibleConfigError as exc:
            row.update(feasible=False, tp=None, pp=None, selected=f"no fit: {str(exc)[:120]}...", step_s=None,
                       predicted_model_tflops=None)
        row["plan_s"], row["trace_s"] = time.perf_counter() - t0, trace_s  # plan_s: trace + plan
        row["cpu_s"] = time.process_time() - c0  # this process's CPU seconds for trace + plan (others' load aside)
        row["met"] = row["plan_s"] <= 10.0 and row["feasible"] and (t_paper < 8 or (row["tp"] or 1) > 1)
        rows.append(row)
        print_megatron([row], header=len(rows) == 1)
    return rows


SAME = ("feasible", "tp", "pp", "selected", "schedule", "step_s", "candidates", "fitting", "predicted_model_tflops",
        "breakdown", "memory")
"""What ``--check`` compares: the pick and every predicted number (timings aside)."""


def check_same(rows: list[dict], previous: dict, path: Path) -> bool:
    """Whether every row planned the same as in ``previous`` (the results file ``path`` read before this run):
    the keys of :data:`SAME` present in both, equal exactly. Prints each difference."""
    before = {r["case"]: r for r in previous["rows"]}
    same = True
    for r in rows:
        old = before.get(r["case"])
        diff = [k for k in SAME if old is not None and k in old and k in r and old[k] != r[k]]
        if old is None or diff:
            same = False
            print(f"{r['case']}: " + ("not in " + str(path) if old is None else
                                      "; ".join(f"{k} {old[k]!r} -> {r[k]!r}" for k in diff)))
    print(f"same picks and predictions as {path}: {same}")
    return same


def print_megatron(rows: list[dict], *, header: bool = True) -> None:
    if header:
        print(f"{'Megatron Table 1':20} {'plan s':>7} {'trace':>6} {'cpu s':>6} {'paper t,p':>9} {'tp':>3} {'pp':>4} "
              f"{'pred TF/s':>9} {'paper x3/4':>10} {'ok':>5}  selected")
    for r in rows:
        pred = f"{r['predicted_model_tflops']:.1f}" if r["predicted_model_tflops"] is not None else "-"
        print(f"{r['case']:20} {r['plan_s']:>7.2f} {r['trace_s']:>6.2f} {r['cpu_s']:>6.2f} {r['paper_tp']:>4},"
              f"{r['paper_pp']:<4} {str(r['tp']):>3} {str(r['pp']):>4} {pred:>9} {r['paper_model_tflops']:>10.1f} "
              f"{str(r['met']):>5}  {r['selected']}", flush=True)


def build(family: str, kw: dict):
    cfg = transformers.LlamaConfig(**kw, use_cache=False) if family == "llama" else transformers.GPT2Config(
        **kw, use_cache=False)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


def main() -> None:
    logger.remove()  # keep the table readable
    out = ROOT / "benchmarks" / "results" / "bench_planner.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if "--megatron" in sys.argv[1:]:
        mout = ROOT / "benchmarks" / "results" / "bench_planner_megatron.json"
        ref = Path(sys.argv[sys.argv.index("--check") + 1]) if "--check" in sys.argv else None
        previous = json.loads(ref.read_text()) if ref is not None else None  # first: it may be the file written
        mrows = megatron_rows()
        mout.write_text(json.dumps({"torch": torch.__version__, "rows": mrows}, indent=1))
        if ref is not None:
            sys.exit(0 if check_same(mrows, previous, ref) else 1)
        return
    rows = []
    for name, (family, kw), batch, seq, preset, nodes, dpn, target in CASES:
        t0 = time.perf_counter()
        model = build(family, kw)
        build_s = time.perf_counter() - t0
        ids = torch.empty(batch, seq, dtype=torch.long, device="meta")
        t1 = time.perf_counter()
        graph = trace(model, (ids,), {"labels": ids})
        t2 = time.perf_counter()
        cluster = Cluster.preset(preset, nodes=nodes, devices_per_node=dpn)
        try:
            p = plan_graph(graph, cluster=cluster, tp=tp_facts(model))
            picked, ncand, nfeas = p.config.to_moreh_line() + f", {p.config.schedule}", len(p.candidates), sum(
                c.feasible for c in p.candidates)
            step = p.selected.step_time
        except NoFeasibleConfigError as exc:
            from moreh_ap.planner import enumerate_candidates

            ncand = len(enumerate_candidates(world_size=cluster.world_size, global_batch=batch,
                                             num_blocks=graph.num_blocks))
            picked, nfeas, step = f"no fit: {str(exc)[:150]}...", 0, None
        t3 = time.perf_counter()
        rows.append(dict(case=name, params=graph.total_params, build_s=build_s, trace_s=t2 - t1, plan_s=t3 - t2,
                         total_s=t3 - t1, target_s=target, met=(t3 - t1) <= target, candidates=ncand,
                         feasible=nfeas, selected=picked, predicted_step_s=step))
    print(f"{'case':34} {'params':>16} {'build s':>8} {'trace s':>8} {'plan s':>8} {'total':>8} {'target':>7} "
          f"{'cands':>6} {'ok':>5}  selected")
    for r in rows:
        print(f"{r['case']:34} {r['params']:>16,} {r['build_s']:>8.2f} {r['trace_s']:>8.3f} {r['plan_s']:>8.3f} "
              f"{r['total_s']:>8.3f} {r['target_s']:>7.1f} {str(r['candidates']):>6} {r['feasible']:>5}  "
              f"{r['selected']}")
    out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
