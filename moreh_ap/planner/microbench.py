# Microbenchmarks: matmul FLOP/s, a reference block's efficiency and fixed cost, collective seconds.
"""The measurements behind a calibration DB, on the local device (and the live process group).

* matmul: FLOP/s of an ``n x n @ n x n`` product for a few ``n`` per dtype
  (bf16, fp32);
* block: a reference transformer block's efficiency (share of the matmul rate)
  and a tiny block's fixed cost, per dtype;
* collectives: seconds of ``all_reduce``, ``all_gather_into_tensor``,
  ``reduce_scatter_tensor`` and a ``send``/``recv`` pair at a few sizes on
  the live process group (on gloo, all-gather is several times slower than an
  all-reduce of the same bytes: one "bandwidth" per link mis-ranks FSDP).

The random inputs and the reference block's initial weights are drawn inside
:func:`~moreh_ap.planner.private_rng.private_rng`: the script's generators are
where they were after a measurement.
"""
from __future__ import annotations

import statistics
import time

from moreh_ap.planner.calibration_db import COLLECTIVES, CalibrationDB
from moreh_ap.planner.private_rng import private_rng
from moreh_ap.planner.time_model import gemm_size

MATMUL_SIZES = (256, 512, 1024)
COLLECTIVE_SIZES = (64 * 1024, 1024 * 1024, 4 * 1024 * 1024)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved_medians(fns: dict, device, repeats: int) -> dict:
    """Median seconds of each callable, timed round-robin (one warm-up each first).

    Interleaving spreads a busy spell of a shared machine over every item instead of spoiling one,
    so the ratios the cost model takes between them (block vs matmul, size vs size) stay sound.
    """
    for fn in fns.values():
        fn()
    _sync(device)
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


_DTYPES = (("bf16", "bfloat16"), ("fp32", "float32"))


def _matmul_fns(device, sizes) -> dict:
    import torch

    fns = {}
    for key, name in _DTYPES:
        for n in sizes:
            a = torch.randn(n, n, device=device, dtype=getattr(torch, name))
            b = torch.randn(n, n, device=device, dtype=getattr(torch, name))
            fns[("mm", key, n)] = lambda a=a, b=b: a @ b
    return fns


def _table(medians: dict, sizes) -> dict[str, list[list[float]]]:
    """dtype -> [[n, FLOP/s], ...] of the sizes timed (a dtype none of whose sizes was timed is left out)."""
    table = {key: [[float(n), 2.0 * n**3 / max(medians[("mm", key, n)], 1e-9)]
                   for n in sizes if ("mm", key, n) in medians] for key, _ in _DTYPES}
    return {k: v for k, v in table.items() if v}


@private_rng()
def measure_matmul(device, *, sizes=MATMUL_SIZES, repeats: int = 5) -> dict[str, list[list[float]]]:
    """FLOP/s of square matmuls per dtype (median of ``repeats``, sizes interleaved, after a warm-up)."""
    return _table(_interleaved_medians(_matmul_fns(device, sizes), device, repeats), sizes)



# reference block (width, heads, seq, batch) per device type: a mid-size GPT block for the device
BLOCK_SHAPES = {"cpu": (256, 4, 128, 1), "cuda": (2048, 16, 1024, 4)}
TINY_BLOCK_SHAPE = (32, 2, 8, 1)
"""A block so small that its time is all fixed cost (op dispatch, kernel launches, autocast casts)."""


def _block_flops(shape) -> float:
    """Forward + backward FLOPs of the reference block as the planner counts them."""
    d, _, seq, batch = shape
    return 3.0 * (2.0 * batch * seq * 12 * d * d + 4.0 * batch * seq * seq * d / 2)


def _block_fn(device, shape, key: str):
    """A pre-LN GPT block's forward + backward as a callable (bf16 via autocast for "bf16")."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    d, heads, seq, batch = shape
    layers = nn.ModuleDict({"ln1": nn.LayerNorm(d), "ln2": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d),
                            "proj": nn.Linear(d, d), "fc1": nn.Linear(d, 4 * d), "fc2": nn.Linear(4 * d, d)}).to(device)
    x = torch.randn(batch, seq, d, device=device, requires_grad=True)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=key == "bf16"):
            q, k, v = layers["qkv"](layers["ln1"](x)).view(batch, seq, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = x + layers["proj"](a.transpose(1, 2).reshape(batch, seq, d))
            h = h + layers["fc2"](F.gelu(layers["fc1"](layers["ln2"](h))))
        h.float().sum().backward()

    return step


def _one_thread(fn):
    """``fn`` run with one intra-op thread: a tiny block's ops are too small to split, and on a busy
    machine waking a second OpenMP thread for each of them costs ~1 ms (contention, not the device)."""
    import torch

    def run():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fn()
        finally:
            torch.set_num_threads(n)

    return run


def _block_fns(device, shape, tiny_shape) -> dict:
    fns = {}
    for key, _ in _DTYPES:
        tiny = _block_fn(device, tiny_shape, key)
        fns[("tiny", key)] = _one_thread(tiny) if device.type == "cpu" else tiny
        fns[("ref", key)] = _block_fn(device, shape, key)
    return fns


def _block_numbers(medians: dict, matmul, shape) -> tuple[dict[str, float], dict[str, float]]:
    d = shape[0]
    flops = _block_flops(shape)
    ref_db = CalibrationDB(fingerprint={}, matmul=matmul)
    eff: dict[str, float] = {}
    floor: dict[str, float] = {}
    for key, _ in _DTYPES:
        if key not in matmul or ("tiny", key) not in medians:
            continue
        if ("ref", key) not in medians:  # the reference block did not fit the budget: its fixed cost only
            floor[key] = float(medians[("tiny", key)])
            continue
        t_tiny, t_ref = medians[("tiny", key)], medians[("ref", key)]
        above = max(t_ref - t_tiny, 0.1 * t_ref)  # noise guard: the floor is never most of the reference
        size = gemm_size(flops / 3, 12 * d * d, 4 * d * d)
        rate = ref_db.matmul_flops(key, size)
        # within the measured sides a block is never faster than its matmuls (above 1.0 is noise); beyond the
        # largest side the rate is extrapolated flat and a real block may well beat it: not clipped there
        cap = 1.0 if size <= max(p[0] for p in matmul[key]) else float("inf")
        eff[key] = float(min(cap, max(0.01, flops / above / rate)))
        floor[key] = float(min(t_tiny, 0.9 * t_ref))
    return eff, floor


@private_rng()
def measure_block(device, matmul: dict[str, list[list[float]]], *, shape=None, tiny_shape=TINY_BLOCK_SHAPE,
                  repeats: int = 5) -> tuple[dict[str, float], dict[str, float]]:
    """Per dtype, a block's time as ``floor + FLOPs / (matmul rate x efficiency)``, from two sizes.

    ``floor``: seconds of a tiny block's forward + backward (fixed costs: op dispatch, kernel
    launches, casts). ``efficiency``: the reference block's FLOPs over its time above the floor, as
    a share of the square-matmul FLOP/s at the same GEMM size (attention, norms, activations make a
    block slower than its matmuls). FLOPs are counted as the planner counts them (linear layers,
    attention as the causal flash kernel, backward = 2 x forward).

    Returns:
        (efficiency, floor) dicts keyed by "bf16" / "fp32".
    """
    shape = shape or BLOCK_SHAPES.get(device.type, BLOCK_SHAPES["cuda"])
    return _block_numbers(_interleaved_medians(_block_fns(device, shape, tiny_shape), device, repeats), matmul, shape)


@private_rng()
def measure_compute(device, *, sizes=MATMUL_SIZES, shape=None, tiny_shape=TINY_BLOCK_SHAPE, repeats: int = 5,
                    budget_s: float = float("inf")):
    """:func:`measure_matmul` and :func:`measure_block` timed together, interleaved (one busy spell hits both).

    ``budget_s``: seconds the whole measurement may take (:func:`_within_budget`): a matmul size or reference
    block whose one call is estimated over a quarter of it is not timed (the matmul table then ends at the
    largest side timed; a dtype without its reference block keeps efficiency 1.0), and the repeats are cut
    to what the rest allows (at least one).

    Returns:
        (matmul table, block efficiency, block floor).
    """
    shape = shape or BLOCK_SHAPES.get(device.type, BLOCK_SHAPES["cuda"])
    fns = {**_matmul_fns(device, sizes), **_block_fns(device, shape, tiny_shape)}
    if budget_s != float("inf"):
        fns, repeats = _within_budget(fns, device, repeats=repeats, budget_s=budget_s, shape=shape)
    med = _interleaved_medians(fns, device, repeats)
    table = _table(med, sizes)
    eff, floor = _block_numbers(med, table, shape)
    return table, eff, floor


def _estimate(key: tuple, first: dict, shape) -> float | None:
    """One call's seconds of ``key`` from the calls timed before it: a matmul from the largest smaller side of its
    dtype (time ~ side^3), the reference block from its dtype's fastest matmul rate; None = no basis (time it)."""
    mms = [(k[2], t) for k, t in first.items() if k[0] == "mm" and k[1] == key[1]]
    if not mms:
        return None
    if key[0] == "mm":
        n, t = max(mms)
        return t * (key[2] / n) ** 3
    if key[0] == "ref":
        return _block_flops(shape) / max(2.0 * n**3 / t for n, t in mms)
    return None


def _within_budget(fns: dict, device, *, repeats: int, budget_s: float, shape) -> tuple[dict, int]:
    """The callables that fit ``budget_s`` and the repeats the rest allows: each is called once (the warm-up,
    smallest first) unless its estimate (:func:`_estimate`) is over a quarter of the budget."""
    first: dict = {}
    start = time.perf_counter()
    for key in sorted(fns, key=lambda k: (k[0] != "mm", k[1], k[2] if k[0] == "mm" else 0)):
        est = _estimate(key, first, shape)
        if est is not None and est > 0.25 * budget_s:
            continue
        t0 = time.perf_counter()
        fns[key]()
        _sync(device)
        first[key] = time.perf_counter() - t0
    left = budget_s - (time.perf_counter() - start)
    per_round = sum(first.values())
    reps = max(1, min(repeats, int(left / per_round) - 1)) if per_round > 0 else repeats  # -1: the warm-up
    return {k: fns[k] for k in fns if k in first}, reps


def measure_collectives(device, *, sizes=COLLECTIVE_SIZES, repeats: int = 5) -> dict[str, list[list[float]]]:
    """Seconds per collective at each size on the live process group (all ranks must call this)."""
    import torch
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    table: dict[str, list[list[float]]] = {k: [] for k in COLLECTIVES}
    for nbytes in sizes:
        numel = max(world, nbytes // 4 // world * world)
        full = torch.zeros(numel, device=device)
        part = torch.zeros(numel // world, device=device)
        ops = {
            "all_reduce": lambda: dist.all_reduce(full),
            "all_gather": lambda: getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(full, part),
            "reduce_scatter": lambda: getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)(part, full),
            "send_recv": lambda: _send_recv(full, rank, world),
        }
        if world < 2:
            del ops["send_recv"]
        for kind, op in ops.items():
            times = []
            for _ in range(repeats + 1):
                dist.barrier()
                t0 = time.perf_counter()
                op()
                _sync(device)
                times.append(time.perf_counter() - t0)
            t = torch.tensor([statistics.median(times[1:])], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the group is as fast as its slowest rank
            table[kind].append([float(numel * 4), float(max(t.item(), 1e-7))])
    return {k: v for k, v in table.items() if v}


def _send_recv(buf, rank: int, world: int) -> None:
    import torch.distributed as dist

    if rank == 0:
        dist.send(buf, dst=1)
    elif rank == 1:
        dist.recv(buf, src=0)


