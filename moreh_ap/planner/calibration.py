# Calibration DB: measured matmul throughput and collective times, cached as JSON in MOREH_AP_CACHE_DIR.
"""Measured speeds for the cost model, measured once per machine and cached.

* matmul: FLOP/s of an ``n x n @ n x n`` product for a few ``n`` per dtype
  (bf16, fp32) on the local device;
* collectives: seconds of ``all_reduce``, ``all_gather_into_tensor``,
  ``reduce_scatter_tensor`` and a ``send``/``recv`` pair at a few sizes on
  the live process group (on gloo, all-gather is several times slower than an
  all-reduce of the same bytes: one "bandwidth" per link mis-ranks FSDP).

Collectives need a process group. When none is up (the planner never spawns
processes), the DB has no collective table and :func:`collective_time` uses
the analytic ring model from the Cluster's bandwidths::

    all_reduce      min(ring: 2 (n-1)/n * S / bw + 2 (n-1) * latency,
                        recursive doubling: ceil(log2 n) * (S / bw + latency))
    all_gather      (n-1)/n * S / bw + min(n-1, ceil(log2 n)) * latency   (S = gathered bytes)
    reduce_scatter  (n-1)/n * S / bw + min(n-1, ceil(log2 n)) * latency   (S = input bytes)
    send_recv       S / bw + latency

(the classic alpha-beta costs of Thakur, Rabenseifner & Gropp 2005: ring for large
messages, recursive doubling / halving -- what NCCL's tree / LL and gloo use for
small ones -- for small; a pure ring model charges 2 (n-1) latencies to a
small all-reduce and makes pipelines look cheaper than data parallelism on
small models)

with ``bw`` the intra-node bandwidth when the group lies within one node,
else the inter-node one, times ``Cluster.comm_efficiency``.

The JSON file is ``calibration.json`` in ``MOREH_AP_CACHE_DIR``. It holds one
entry per fingerprint (device, torch version, threads, world size of the
process group -- 0 without one -- and, with a group, its backend and ranks per
node), so a planner run in one process and the same planner run under 2 or 8
ranks each find their own DB; measuring a new one keeps the others. A missing
entry is measured quietly; a corrupt or foreign file gives a warning and is
measured again (and replaced), never a crash.
"""
from __future__ import annotations

import bisect
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moreh_ap.env import read_env
from moreh_ap.log import logger

FORMAT = "moreh_ap.calibration/2"
"""Format of one DB (an entry of the file). /2 added ``block_efficiency`` and ``block_floor``; /1 entries are
measured again."""
FILE_FORMAT = "moreh_ap.calibration-file/1"
"""Format of the file: one entry per fingerprint (device, torch, threads, world size, ...)."""
FILENAME = "calibration.json"
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")
MATMUL_SIZES = (256, 512, 1024)
COLLECTIVE_SIZES = (64 * 1024, 1024 * 1024, 4 * 1024 * 1024)


@dataclass(kw_only=True, slots=True)
class CalibrationDB:
    """Measured speeds: matmul FLOP/s per dtype and collective seconds per size."""

    fingerprint: dict[str, Any]
    """What the numbers were measured on (device name, torch version, world size, threads)."""
    matmul: dict[str, list[list[float]]] = field(default_factory=dict)
    """dtype -> [[n, FLOP/s], ...] for square matmuls of side n."""
    collectives: dict[str, list[list[float]]] | None = None
    """kind -> [[bytes, seconds], ...] on ``collective_world`` ranks; None = analytic model."""
    collective_world: int = 1
    """Ranks of the group the collectives were timed on."""
    block_efficiency: dict[str, float] = field(default_factory=dict)
    """dtype -> FLOP/s of a reference transformer block's forward+backward (attention, norms,
    activations, casts included) over the matmul FLOP/s at the same GEMM size (<= 1): the share of
    the matmul rate a real block sustains (measured above the block floor). Empty = 1.0."""
    block_floor: dict[str, float] = field(default_factory=dict)
    """dtype -> seconds of a tiny block's forward + backward: the fixed cost every block pays per
    micro-batch (op dispatch, kernel launches). Empty = 0."""
    source: str = "measured"
    """"measured", "cache" or "injected"."""

    def matmul_flops(self, dtype: str, size: float | None = None) -> float | None:
        """Sustained FLOP/s for ``dtype`` at square-matmul side ``size``, or None without a table.

        Linear in ``size`` between measured sides, the end value outside them; ``size`` None = the
        largest measured side.
        """
        pts = sorted(self.matmul.get(dtype) or [])
        if not pts:
            return None
        if size is None or size >= pts[-1][0]:
            return float(pts[-1][1])
        if size <= pts[0][0]:
            return float(pts[0][1])
        i = bisect.bisect_left([p[0] for p in pts], size)
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        return float(y0 + (y1 - y0) * (size - x0) / (x1 - x0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "matmul": self.matmul,
            "collectives": self.collectives,
            "collective_world": self.collective_world,
            "block_efficiency": self.block_efficiency,
            "block_floor": self.block_floor,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "cache") -> CalibrationDB:
        """Parse the JSON form; raises ``ValueError`` on anything malformed."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        matmul = data.get("matmul")
        if not isinstance(matmul, dict) or not matmul:
            raise ValueError("missing matmul table")
        for k, pts in matmul.items():
            _check_points(f"matmul[{k}]", pts)
        coll = data.get("collectives")
        if coll is not None:
            if not isinstance(coll, dict):
                raise ValueError("collectives must be an object or null")
            for k, pts in coll.items():
                if k not in COLLECTIVES:
                    raise ValueError(f"unknown collective {k!r}")
                _check_points(f"collectives[{k}]", pts)
        eff = data.get("block_efficiency")
        if not isinstance(eff, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 for v in eff.values()
        ):
            raise ValueError("block_efficiency must be an object of numbers in (0, 1]")
        floor = data.get("block_floor", {})
        if not isinstance(floor, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in floor.values()
        ):
            raise ValueError("block_floor must be an object of seconds >= 0")
        return cls(
            fingerprint=dict(data.get("fingerprint") or {}),
            block_efficiency={str(k): float(v) for k, v in eff.items()},
            block_floor={str(k): float(v) for k, v in floor.items()},
            matmul={k: [list(map(float, p)) for p in v] for k, v in matmul.items()},
            collectives=None if coll is None else {k: [list(map(float, p)) for p in v] for k, v in coll.items()},
            collective_world=int(data.get("collective_world", 1)),
            source=source,
        )


def _check_points(what: str, pts: Any) -> None:
    if not isinstance(pts, list) or not pts:
        raise ValueError(f"{what} must be a non-empty list")
    for p in pts:
        if not (isinstance(p, list) and len(p) == 2 and all(isinstance(x, (int, float)) and x > 0 for x in p)):
            raise ValueError(f"{what}: bad point {p!r}")


# ------------------------------------------------------------------ time models
def _interp(points: list[list[float]], x: float) -> float:
    """Piecewise-linear time(bytes) through the points, extrapolated with the last slope.

    The points are first made non-decreasing from the right (a time larger than one measured for
    more bytes is noise from a busy machine: moving more bytes is never faster).
    """
    pts = [list(p) for p in sorted(points)]
    for i in range(len(pts) - 2, -1, -1):
        pts[i][1] = min(pts[i][1], pts[i + 1][1])
    xs = [p[0] for p in pts]
    if len(pts) == 1:
        return pts[0][1] * x / pts[0][0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(pts) - 1)
    (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 0.0
    if x < x0:
        return max(y0 * x / x0, 0.0) if i == 1 else y0
    return max(y0 + slope * (x - x0), 0.0)


def _ring_factor(kind: str, n: int) -> float:
    if kind == "send_recv":
        return 1.0
    f = (n - 1) / n
    return 2 * f if kind == "all_reduce" else f


def collective_time(cluster, kind: str, nbytes: float, *, group: int, inter_node: bool) -> float:
    """Seconds for one collective of ``nbytes`` over ``group`` ranks.

    Args:
        cluster: the :class:`Cluster` (its calibration DB is used when it has a collective table).
        kind: "all_reduce", "all_gather", "reduce_scatter" or "send_recv".
        nbytes: the full buffer (all-reduce input, gathered output, reduce-scatter input, bytes sent).
        group: ranks in the group (1 = no communication, 0 s).
        inter_node: the group spans nodes (the slower link).
    """
    if kind not in COLLECTIVES:
        raise ValueError(f"collective_time(kind={kind!r}) is not valid: expected one of {COLLECTIVES}")
    if nbytes <= 0 or (group <= 1 and kind != "send_recv"):
        return 0.0
    db = cluster.calibration
    if db is not None and db.collectives and kind in db.collectives:
        measured = _interp(db.collectives[kind], nbytes)
        w = max(2, db.collective_world)
        if kind == "send_recv":
            return measured
        return measured * _ring_factor(kind, max(group, 2)) / _ring_factor(kind, w)
    bw = (cluster.inter_node_bandwidth if inter_node else cluster.intra_node_bandwidth) * cluster.comm_efficiency
    lat = cluster.link_latency
    if kind == "send_recv":
        return nbytes / bw + lat
    n = max(group, 2)
    steps = math.ceil(math.log2(n))
    ring = _ring_factor(kind, n) * nbytes / bw + (2 if kind == "all_reduce" else 1) * (n - 1) * lat
    if kind == "all_reduce":  # recursive doubling: log2(n) exchanges of the whole buffer
        return min(ring, steps * (nbytes / bw + lat))
    return min(ring, _ring_factor(kind, n) * nbytes / bw + steps * lat)  # recursive doubling / halving (Bruck)


def matmul_flops(cluster, dtype: str, size: float | None = None) -> float:
    """Sustained matmul FLOP/s: calibrated (at square side ``size`` when given) when the DB has the
    dtype, else peak x compute_efficiency."""
    db = cluster.calibration
    if db is not None:
        measured = db.matmul_flops(dtype, size)
        if measured:
            return measured
    return cluster.flops(dtype) * cluster.compute_efficiency


def block_efficiency(cluster, dtype: str) -> float:
    """The calibrated share of the matmul rate a transformer block sustains (1.0 without a DB)."""
    db = cluster.calibration
    if db is None:
        return 1.0
    return float(db.block_efficiency.get(dtype, 1.0))


def block_floor(cluster, dtype: str) -> float:
    """The calibrated fixed seconds of one block's forward + backward per micro-batch (0 without a DB)."""
    db = cluster.calibration
    if db is None:
        return 0.0
    return float(db.block_floor.get(dtype, 0.0))


# ------------------------------------------------------------------ measuring
def _pg_world() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    except Exception:
        pass
    return 0


def fingerprint(cluster) -> dict[str, Any]:
    """What a cached DB must match to be reused."""
    import platform

    import torch

    if cluster.device_type == "cuda" and torch.cuda.is_available():
        device = torch.cuda.get_device_name(torch.cuda.current_device())
    else:
        device = f"cpu:{platform.machine()}:{os.cpu_count()}"
    fp: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "world": _pg_world(),
    }
    if fp["world"] > 1:  # collective times depend on the backend and on how many ranks share a node
        import torch.distributed as dist

        fp["backend"] = str(dist.get_backend())
        fp["ranks_per_node"] = int(cluster.devices_per_node)
    return fp


def _device(cluster):
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if cluster.device_type == "cuda" and torch.cuda.is_available() else torch.device("cpu")


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
    return {key: [[float(n), 2.0 * n**3 / max(medians[("mm", key, n)], 1e-9)] for n in sizes] for key, _ in _DTYPES}


def measure_matmul(device, *, sizes=MATMUL_SIZES, repeats: int = 5) -> dict[str, list[list[float]]]:
    """FLOP/s of square matmuls per dtype (median of ``repeats``, sizes interleaved, after a warm-up)."""
    return _table(_interleaved_medians(_matmul_fns(device, sizes), device, repeats), sizes)


def gemm_size(flops: float, params: int, largest_param: int) -> float | None:
    """Square-matmul side with the FLOPs of a node's typical GEMM: ``(rows * largest_param) ** (1/3)``.

    ``rows = flops / (2 * params)`` is how many rows each weight multiplies in a forward (exact for
    linear layers: ``2 * rows * K * N`` FLOPs per ``K x N`` weight). None for nodes without parameters
    or FLOPs (the rate at the largest measured side is used then).
    """
    if params <= 0 or largest_param <= 0 or flops <= 0:
        return None
    return (flops / (2.0 * params) * largest_param) ** (1.0 / 3.0)


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
        if key not in matmul:
            continue
        t_tiny, t_ref = medians[("tiny", key)], medians[("ref", key)]
        above = max(t_ref - t_tiny, 0.1 * t_ref)  # noise guard: the floor is never most of the reference
        rate = ref_db.matmul_flops(key, gemm_size(flops / 3, 12 * d * d, 4 * d * d))
        eff[key] = float(min(1.0, max(0.01, flops / above / rate)))
        floor[key] = float(min(t_tiny, 0.9 * t_ref))
    return eff, floor


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


def measure_compute(device, *, sizes=MATMUL_SIZES, shape=None, tiny_shape=TINY_BLOCK_SHAPE, repeats: int = 5):
    """:func:`measure_matmul` and :func:`measure_block` timed together, interleaved (one busy spell hits both).

    Returns:
        (matmul table, block efficiency, block floor).
    """
    shape = shape or BLOCK_SHAPES.get(device.type, BLOCK_SHAPES["cuda"])
    med = _interleaved_medians({**_matmul_fns(device, sizes), **_block_fns(device, shape, tiny_shape)}, device,
                               repeats)
    table = _table(med, sizes)
    eff, floor = _block_numbers(med, table, shape)
    return table, eff, floor


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


def entry_key(fp: dict[str, Any]) -> str:
    """The key of a DB in the file: every fingerprint field, sorted (device, torch, threads, world, ...)."""
    return "|".join(f"{k}={fp[k]}" for k in sorted(fp))


def _read_entries(path: Path, *, warn: bool = True) -> dict[str, CalibrationDB] | None:
    """Every DB in the file by :func:`entry_key`: {} when there is no file, None when it is corrupt or foreign.

    Reads format 2 (``{"format": .../2, "entries": {key: db}}``) and the one-DB format 1.
    A malformed entry makes the whole file count as corrupt (it was not written by this code).
    """
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("format") == FORMAT:
            db = CalibrationDB.from_dict(data, source="cache")
            return {entry_key(db.fingerprint): db}
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise ValueError(f"not a {FILE_FORMAT} file")
        entries = data.get("entries")
        if not isinstance(entries, dict):
            raise ValueError("'entries' must be an object")
        out = {}
        for key, entry in entries.items():
            db = CalibrationDB.from_dict(entry, source="cache")
            if key != entry_key(db.fingerprint):
                raise ValueError(f"entry {key!r} does not match its fingerprint {db.fingerprint}")
            out[key] = db
        return out
    except Exception as exc:  # corrupt or foreign: measure again, never crash
        if warn:
            logger.warning(f"Calibration DB {path} is unreadable ({exc}); measuring it again.")
        return None


def _read_cache(path: Path, fp: dict[str, Any]) -> CalibrationDB | None:
    entries = _read_entries(path)
    if not entries:
        return None
    key = entry_key(fp)
    if key not in entries:
        logger.info(f"Calibration DB {path} has no entry for {key} (it has {len(entries)} other(s)); measuring one.")
        return None
    return entries[key]


def _write_entry(path: Path, db: CalibrationDB) -> None:
    """Add (or replace) ``db``'s entry in the file, keeping the others; atomic, serialised with a lock file."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            entries = _read_entries(path, warn=False) or {}  # a corrupt file (warned about already) is replaced
            entries[entry_key(db.fingerprint)] = db
            data = {"format": FILE_FORMAT, "entries": {k: v.to_dict() for k, v in sorted(entries.items())}}
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load_or_measure(
    cluster,
    *,
    cache_dir: str | os.PathLike | None = None,
    matmul_sizes=MATMUL_SIZES,
    collective_sizes=COLLECTIVE_SIZES,
    block_shape: tuple[int, int, int, int] | None = None,
) -> CalibrationDB:
    """The cached DB for this machine, or a fresh measurement (then cached).

    With a process group up every rank must call this (they agree on whether
    to measure, and time the collectives together); rank 0 writes the file.
    """
    fp = fingerprint(cluster)
    path = Path(cache_dir if cache_dir is not None else read_env().cache_dir) / FILENAME
    db = _read_cache(path, fp)
    world = fp["world"]
    if world > 1:  # every rank must take the same branch
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0.0 if db is not None else 1.0], device=_device(cluster))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            db = None
    if db is not None:
        logger.info("Got DBs from backend for auto config.")
        return db
    t0 = time.perf_counter()
    device = _device(cluster)
    matmul, eff, floor = measure_compute(device, sizes=matmul_sizes, shape=block_shape)
    db = CalibrationDB(fingerprint=fp, matmul=matmul, block_efficiency=eff, block_floor=floor)
    if world > 1:
        db.collectives = measure_collectives(device, sizes=collective_sizes)
        db.collective_world = world
    else:
        logger.info(
            "Collective calibration needs a process group and none is up: "
            "collective times come from the analytic ring model on the Cluster's bandwidths."
        )
    ms = (time.perf_counter() - t0) * 1e3
    from moreh_ap.log import current_rank

    if current_rank() == 0:
        try:
            _write_entry(path, db)
        except OSError as exc:
            logger.warning(f"Could not write the calibration DB to {path}: {exc}")
    logger.info(f"Calibration DB measured in {ms:.0f} [ms] and saved to {path}.")
    return db
