# Benchmark: one optimizer step of FusedLAMB vs a per-parameter-loop LAMB vs torch.optim.AdamW(foreach=True).
"""Times ``optimizer.step()`` alone (gradients already in place) on ~100M
parameters in ~200 tensors, prints medians and ratios, writes JSON.

    python -m benchmarks.bench_lamb                     # 100M params, 200 tensors
    python -m benchmarks.bench_lamb --numel 20_000_000  # quicker

Targets (issue 4): on CPU FusedLAMB <= 1.5x AdamW(foreach); on CUDA
>= 3x faster than the loop and <= 1.3x AdamW(fused).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from moreh_ap.optim import FusedLAMB

RESULTS = Path(__file__).resolve().parent / "results" / "bench_lamb.json"


class LoopLAMB(torch.optim.Optimizer):
    """The same LAMB (apex semantics) written as a Python loop over parameters, in-place torch ops."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_grad_norm=1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        clip = torch.where(gnorm > self.max_grad_norm, gnorm / self.max_grad_norm, torch.ones_like(gnorm))
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            (b1, b2), t, wd, lr, eps = group["betas"], group["step"], group["weight_decay"], group["lr"], group["eps"]
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                g = p.grad.div_(clip)
                state["m"].lerp_(g, 1 - b1)
                state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                u = (state["v"].sqrt().div_(math.sqrt(bc2)).add_(eps)).reciprocal_().mul_(state["m"]).div_(bc1)
                if wd != 0:
                    u.add_(p, alpha=wd)
                w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(u)
                ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.sub_(u.mul_(ratio * lr))


def make_params(numel: int, tensors: int, *, device: str, seed: int = 0) -> list[torch.nn.Parameter]:
    """``tensors`` tensors with ``numel`` elements in all: half big matrices, half small vectors."""
    gen = torch.Generator().manual_seed(seed)
    n_mat = tensors // 2
    n_vec = tensors - n_mat
    vec_len = 1024
    rows = 1024
    cols = max(1, (numel - n_vec * vec_len) // (n_mat * rows))
    shapes = [(rows, cols)] * n_mat + [(vec_len,)] * n_vec
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device))
        p.grad = torch.randn(shape, generator=gen).to(device) * 1e-3
        params.append(p)
    return params


def time_interleaved(optimizers: dict, *, warmup: int, iters: int, device: str) -> dict[str, list[float]]:
    """Milliseconds per step of each optimizer, steps interleaved round-robin so that noise from other
    processes on the machine hits all candidates alike; ``warmup`` steps (state creation) excluded."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for opt in optimizers.values():
        for _ in range(warmup):
            opt.step()
    sync()
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(iters):
        for name, opt in optimizers.items():
            t0 = time.perf_counter()
            opt.step()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=100_000_000, help="total parameters (default 100M)")
    parser.add_argument("--tensors", type=int, default=200, help="number of parameter tensors (default 200)")
    parser.add_argument("--iters", type=int, default=7, help="timed steps per optimizer (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    kw = dict(lr=1e-3, weight_decay=0.01)
    adamw_kw = dict(fused=True) if args.device == "cuda" else dict(foreach=True)
    candidates = {
        "FusedLAMB": lambda ps: FusedLAMB(ps, **kw),
        "LoopLAMB": lambda ps: LoopLAMB(ps, **kw),
        "AdamW(" + ",".join(f"{k}=True" for k in adamw_kw) + ")": lambda ps: torch.optim.AdamW(ps, **kw, **adamw_kw),
    }
    optimizers, numel = {}, 0
    for name, make_opt in candidates.items():  # each optimizer gets its own copy of the same params
        params = make_params(args.numel, args.tensors, device=args.device)
        numel = sum(p.numel() for p in params)
        optimizers[name] = make_opt(params)
    load_before = os.getloadavg()[0]
    runs = time_interleaved(optimizers, warmup=args.warmup, iters=args.iters, device=args.device)
    load_after = os.getloadavg()[0]
    medians = {name: statistics.median(ms) for name, ms in runs.items()}

    adamw_name = list(candidates)[2]
    print(f"\nOne optimizer step, {numel / 1e6:.1f}M params in {args.tensors} tensors, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.iters} steps, "
          f"1-min load average {load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} CPUs")
    print(f"{'optimizer':<24}{'median ms':>12}{'vs FusedLAMB':>14}")
    for name, ms in medians.items():
        print(f"{name:<24}{ms:>12.1f}{ms / medians['FusedLAMB']:>13.2f}x")
    ratio_adamw = medians["FusedLAMB"] / medians[adamw_name]
    speedup_loop = medians["LoopLAMB"] / medians["FusedLAMB"]
    target = 1.5 if args.device == "cpu" else 1.3
    print(f"FusedLAMB / {adamw_name} = {ratio_adamw:.2f} (target <= {target}); "
          f"LoopLAMB / FusedLAMB = {speedup_loop:.2f}")

    result = {
        "benchmark": "bench_lamb",
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_average_1min": [load_before, load_after],
        "numel": numel,
        "tensors": args.tensors,
        "iters": args.iters,
        "median_ms": medians,
        "all_ms": runs,
        "fused_over_adamw": ratio_adamw,
        "loop_over_fused": speedup_loop,
        "target_fused_over_adamw": target,
        "meets_target": ratio_adamw <= target,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
