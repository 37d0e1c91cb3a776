# Benchmark: the planner's per-rank peak of pipelined configs vs the live-storage tracker, on real gloo ranks.
"""Run from the repository root: ``python benchmarks/bench_memory_model_pipeline.py [--quick]``.

Pipelines need one process per pipeline rank, and torch 2.13's ``MemTracker`` / ``FSDPMemTracker``
reject a module called more than once in a tracked step (every micro-batch calls it), so each
(config) runs on 2 or 4 real gloo CPU ranks (``tests/helpers/dist_harness.py``, many configs per
launch) and every rank tracks its second training step with
``moreh_ap.runtime.memtrack.tracked_step_peak(..., tracker="live")`` (``MemTracker``'s storage
accounting without per-module statistics; equal to ``MemTracker`` / ``FSDPMemTracker`` to the byte on
the non-pipelined cases of ``tests/unit/test_memory_ties.py``). Each rank's peak is compared with
``moreh_ap.planner.memory.estimate_rank(graph, config, pp_rank, world_size=..., device_type="cpu")``.
Target: within +-5 %.

Writes benchmarks/results/bench_memory_model_pipeline.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.dist_harness import launch  # noqa: E402


from tests.helpers.pipeline_memory_cases import make_case as case, rows as case_rows  # noqa: E402

MIB = 2**20


Z2, Z3 = dict(distribute_param=True), dict(distribute_param=True, distribute_low_prec_param=True)
IL = dict(schedule="Interleaved1F1B", stages_per_rank=2)


def cases(quick: bool) -> list[dict]:
    out = [
        case("GPipe mb2 fp32", 2, schedule="GPipe", num_micro_batches=2),
        case("GPipe mb4 fp32", 2, schedule="GPipe", num_micro_batches=4),
        case("1F1B mb2 fp32", 2, schedule="1F1B", num_micro_batches=2),
        case("1F1B mb4 fp32", 2, schedule="1F1B", num_micro_batches=4),
        case("Interleaved mb2 fp32", 2, num_micro_batches=2, **IL),
        case("Interleaved mb4 fp32", 2, num_micro_batches=4, **IL),
        case("1F1B mb4 bf16", 2, schedule="1F1B", num_micro_batches=4, mixed_precision=True),
        case("GPipe mb4 recompute", 2, schedule="GPipe", num_micro_batches=4, recomputation=True),
        case("1F1B mb4 bf16 recompute", 2, schedule="1F1B", num_micro_batches=4, mixed_precision=True,
             recomputation=True),
        case("Interleaved mb4 bf16", 2, num_micro_batches=4, mixed_precision=True, **IL),
        case("1F1B mb4 v256 fp32", 2, kind="llama-v256", schedule="1F1B", num_micro_batches=4),
        case("pp2xdp2 ZeRO-2 1F1B mb2 fp32", 4, schedule="1F1B", num_micro_batches=2, **Z2),
        case("pp2xdp2 ZeRO-3 1F1B mb2 fp32", 4, schedule="1F1B", num_micro_batches=2, **Z3),
        case("pp2xdp2 replicate 1F1B mb2 fp32", 4, schedule="1F1B", num_micro_batches=2),
        case("pp2xdp2 ZeRO-3 1F1B mb4 bf16", 4, schedule="1F1B", num_micro_batches=4, mixed_precision=True, **Z3),
        case("pp2xdp2 ZeRO-2 GPipe mb2 bf16 recompute", 4, schedule="GPipe", num_micro_batches=2,
             mixed_precision=True, recomputation=True, **Z2),
        case("pp2xdp2 replicate Interleaved mb2 bf16", 4, num_micro_batches=2, mixed_precision=True, **IL),
        # short sequences: small activations, the first stage's peak moves towards the gradient reduction
        case("GPipe mb4 recompute fp32, seq 128", 2, seq=128, schedule="GPipe", num_micro_batches=4,
             recomputation=True),
        case("1F1B mb4 bf16, seq 128", 2, seq=128, schedule="1F1B", num_micro_batches=4, mixed_precision=True),
        case("pp2xdp2 ZeRO-3 1F1B mb4 bf16, seq 128", 4, seq=128, schedule="1F1B", num_micro_batches=4,
             mixed_precision=True, **Z3),
        # GPT-2: wte / lm_head tied, held by the first and the last stage
        case("GPT-2 tied 1F1B mb4 fp32", 2, kind="gpt2", schedule="1F1B", num_micro_batches=4),
        case("GPT-2 tied pp2xdp2 ZeRO-3 1F1B mb2 bf16", 4, kind="gpt2", schedule="1F1B", num_micro_batches=2,
             mixed_precision=True, **Z3),
    ]
    return out[:4] + out[11:13] if quick else out


def run(selected: list[dict]) -> list[dict]:
    rows = []
    for world in sorted({c["world"] for c in selected}):
        batch = [c for c in selected if c["world"] == world]
        res = launch(world, batch, timeout=120 + 60 * len(batch))
        if res.results is None:
            print(res.output[-6000:])
            raise SystemExit(f"launch of {world} ranks failed (rc {res.returncodes})")
        for c in batch:
            rows.extend(case_rows(c, res.results[c["id"]]))
        print(f"{world} ranks: {len(batch)} configs in {res.seconds:.1f} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-k", default=None, help="only cases whose label contains this")
    ap.add_argument("-v", action="store_true", help="print the predicted breakdown and tracked categories")
    args = ap.parse_args()
    selected = [c for c in cases(args.quick) if args.k is None or args.k in c["id"]]
    t0 = time.perf_counter()
    rows = run(selected)
    print(f"{'case':42s} {'pp':>2s} {'predicted MiB':>13s} {'measured MiB':>12s} {'error':>7s}  phase")
    for r in rows:
        print(f"{r['case']:42s} {r['pp_rank']:2d} {r['predicted'] / MIB:13.2f} {r['measured'] / MIB:12.2f} "
              f"{r['error'] * 100:+6.1f}%  {r['predicted_breakdown']['phase']}")
        if args.v:
            print("    predicted", {k: round(v / MIB, 2) for k, v in r["predicted_breakdown"].items()
                                  if isinstance(v, int) and k != "stage"})
            print("    tracked  ", {k: round(v / MIB, 2) for k, v in r["measured_categories"].items()})
    worst = max(abs(r["error"]) for r in rows)
    print(f"worst |error| {worst * 100:.1f}% over {len(rows)} (config, pp rank) pairs; "
          f"{time.perf_counter() - t0:.1f} s")
    if args.k is None and not args.quick:
        out = ROOT / "benchmarks" / "results" / "bench_memory_model_pipeline.json"
        out.write_text(json.dumps(dict(rows=rows, worst_abs_error=worst), indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
