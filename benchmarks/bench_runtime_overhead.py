# Benchmark: moreh_ap.parallelize step time vs a hand-written torch.distributed script of the same config.
"""For each config, one launch of CPU ranks (gloo) builds the same GPT twice: (A) through
``moreh_ap.parallelize`` and (B) by hand with the same torch parts (fully_shard / replicate,
PipelineStage + schedule, same mesh and micro-batches). Steps run interleaved A, B, A, B ... so
machine drift cancels; each sample is ``--steps`` steps timed between barriers on rank 0. Reported: the median of the
per-pair ratios A/B (target <= 1.03), plus the median step times.

    python benchmarks/bench_runtime_overhead.py [--pairs 20] [--steps 3] [--warmup 3] [--out benchmarks/results/runtime_overhead.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpt import lm_loss, make_gpt  # noqa: E402

CONFIGS = [
    # name, world, ParallelConfig kwargs
    ("pp1-dp2-fsdp", 2, dict(num_stages=1, num_micro_batches=2, batch_per_device=4, distribute_param=True,
                             distribute_low_prec_param=True)),
    ("pp2-dp2-1F1B-replicate", 4, dict(num_stages=2, num_micro_batches=2, batch_per_device=4)),
    ("pp2-dp2-1F1B-fsdp", 4, dict(num_stages=2, num_micro_batches=2, batch_per_device=4, distribute_param=True)),
]
VOCAB, SEQ, DIM, LAYERS, HEADS = 512, 64, 128, 8, 4


def _model():
    return make_gpt(vocab=VOCAB, seq=SEQ, dim=DIM, layers=LAYERS, heads=HEADS)


_loss = lm_loss


def _hand_written(cfg, world: int):
    """Script B: the same config written directly against torch.distributed (what a user would write)."""
    import torch
    from torch import nn
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    pp, dp = cfg.num_stages, world // cfg.num_stages
    mesh = init_device_mesh("cpu", (pp, dp), mesh_dim_names=("pp", "dp"))
    model = _model()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if pp > 1:
        r = mesh.get_local_rank("pp")
        per = LAYERS // pp
        keep = set(range(r * per, (r + 1) * per))
        model.layers = nn.ModuleList(m for i, m in enumerate(model.layers) if i in keep)
        if r != 0:
            model.tok_emb = model.pos_emb = None
        if r != pp - 1:
            model.norm = model.head = None
    wrap = (lambda m: fully_shard(m, mesh=mesh["dp"], mp_policy=mp,
                                  reshard_after_forward=cfg.distribute_low_prec_param)) if cfg.distribute_param \
        else (lambda m: replicate(m, mesh=mesh["dp"], mp_policy=mp))
    for layer in model.layers:
        wrap(layer)
    if cfg.distribute_param:  # torchtitan-style: the embedding and the head are their own FSDP units
        for m in (model.tok_emb, model.head):
            if m is not None:
                wrap(m)
    wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if pp > 1:
        stage = PipelineStage(model, mesh.get_local_rank("pp"), pp, torch.device("cpu"), group=mesh.get_group("pp"))
        sched = Schedule1F1B(stage, cfg.num_micro_batches, loss_fn=_loss)
        last = mesh.get_local_rank("pp") == pp - 1

        def step(x, y):
            sched.step(x, target=y if last else None, losses=[])
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        def step(x, y):
            n = cfg.num_micro_batches
            for i, (xs, ys) in enumerate(zip(x.chunk(n), y.chunk(n))):
                if not cfg.distribute_param:  # FSDP2 (ZeRO) reduce-scatters every micro-batch: sharded grads only
                    model.set_requires_gradient_sync(i == n - 1)
                (_loss(model(xs), ys) / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step, mesh.get_local_rank("dp")


def _worker(name: str, world: int, cfg_kw: dict, pairs: int, warmup: int, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import moreh_ap
    from moreh_ap.config import ParallelConfig

    moreh_ap.runtime.init_distributed()
    cfg = ParallelConfig(**cfg_kw)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pm = moreh_ap.parallelize(model, cfg, optimizer=opt, loss_fn=_loss)
    hand_step, dp_rank = _hand_written(cfg, world)
    gb = cfg.global_batch(world)
    local = gb // pm.dp
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (gb, SEQ), generator=g)
    y = torch.randint(0, VOCAB, (gb, SEQ), generator=g)
    xl, yl = x[dp_rank * local:(dp_rank + 1) * local], y[dp_rank * local:(dp_rank + 1) * local]

    def ours():
        pm.train_step(x, target=y)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn) -> float:
        """Seconds per step over ``steps`` back-to-back steps, between barriers."""
        dist.barrier()
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        dist.barrier()
        return (time.perf_counter() - t) / steps

    for _ in range(warmup):
        ours(), hand_step(xl, yl)
    a, b = [], []
    for i in range(pairs):  # alternate which goes first so order effects cancel too
        if i % 2 == 0:
            a.append(timed(ours)), b.append(timed(lambda: hand_step(xl, yl)))
        else:
            b.append(timed(lambda: hand_step(xl, yl))), a.append(timed(ours))
    if dist.get_rank() == 0:
        ratios = [p / q for p, q in zip(a, b)]
        with open(out, "w") as f:
            json.dump({"name": name, "world": world, "config": cfg.to_dict(), "moreh_ap_s": a, "torch_s": b,
                       "ratios": ratios}, f)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(name: str, world: int, cfg_kw: dict, pairs: int, warmup: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        port, procs = _free_port(), []
        for r in range(world):
            env = {k: v for k, v in os.environ.items() if not k.startswith("MOREH_")}
            env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
                       PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", name, str(world),
                                           json.dumps(cfg_kw), str(pairs), str(warmup), str(steps), out], env=env, cwd=ROOT))
        rcs = [p.wait(timeout=1200) for p in procs]
        if any(rcs):
            raise SystemExit(f"{name}: ranks exited with {rcs}")
        with open(out) as f:
            return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed sample")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "runtime_overhead.json"))
    ap.add_argument("--only", default=None, help="run only the config with this name")
    args = ap.parse_args()
    rows = []
    for name, world, kw in CONFIGS:
        if args.only and name != args.only:
            continue
        r = _launch(name, world, kw, args.pairs, args.warmup, args.steps)
        r["median_ratio"] = statistics.median(r["ratios"])
        q = statistics.quantiles(r["ratios"], n=4)
        r["ratio_iqr"] = [q[0], q[2]]
        r["median_moreh_ap_ms"] = 1000 * statistics.median(r["moreh_ap_s"])
        r["median_torch_ms"] = 1000 * statistics.median(r["torch_s"])
        rows.append(r)
        print(f"{name:26s} world={world}  moreh_ap {r['median_moreh_ap_ms']:8.1f} ms  torch {r['median_torch_ms']:8.1f} ms"
              f"  median ratio {r['median_ratio']:.3f}  ({len(r['ratios'])} pairs)", flush=True)
    print(f"{'config':26s} {'ratio':>7s}  {'IQR of pair ratios':>18s}  target <= 1.03")
    for r in rows:
        lo, hi = r["ratio_iqr"]
        print(f"{r['name']:26s} {r['median_ratio']:7.3f}  {lo:8.3f} - {hi:6.3f}  "
              f"{'ok' if r['median_ratio'] <= 1.03 else 'ABOVE TARGET'}")
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "model": dict(vocab=VOCAB, seq=SEQ, dim=DIM,
            layers=LAYERS, heads=HEADS), "pairs": args.pairs, "warmup": args.warmup, "steps_per_sample": args.steps,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), *map(int, sys.argv[5:8]), sys.argv[8])
    else:
        main()
