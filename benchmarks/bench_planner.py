# Benchmark: trace + plan wall time for the seed case, Llama-2-70B on 8x8 H100, and a 145B GPT on 1536 A100-80GB.
"""Run from the repository root: ``python benchmarks/bench_planner.py``.

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


def build(family: str, kw: dict):
    cfg = transformers.LlamaConfig(**kw, use_cache=False) if family == "llama" else transformers.GPT2Config(
        **kw, use_cache=False)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


def main() -> None:
    logger.remove()  # keep the table readable
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
            p = plan_graph(graph, cluster=cluster)
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
    out = ROOT / "benchmarks" / "results" / "bench_planner.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
