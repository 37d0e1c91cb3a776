# Calibration DB schema (CalibrationDB) and its storage: one locked JSON file of entries keyed by fingerprint.
"""What a calibration DB holds and how it is kept on disk.

The JSON file is ``calibration.json`` in ``MOREH_AP_CACHE_DIR``. It holds one
entry per fingerprint (device, torch version, threads, world size of the
process group -- 0 without one -- and, with a group, its backend and ranks per
node), so a planner run in one process and the same planner run under 2 or 8
ranks each find their own DB; writing a new one keeps the others (the file is
rewritten atomically under a lock file). A corrupt or foreign file reads as
None (the caller measures again and replaces it), never a crash.
"""
from __future__ import annotations

import bisect
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moreh_ap.log import logger

FORMAT = "moreh_ap.calibration/3"
"""Format of one DB (an entry of the file). /3 added ``model_gemm``, ``node_times`` and ``measure_s`` (read from /2
entries as empty); /2 added ``block_efficiency`` and ``block_floor``; /1 entries are measured again."""
READ_FORMATS = ("moreh_ap.calibration/2", FORMAT)
"""Entry formats read (a /2 entry reads with the /3 tables empty)."""
FILE_FORMAT = "moreh_ap.calibration-file/1"
"""Format of the file: one entry per fingerprint (device, torch, threads, world size, ...)."""
FILENAME = "calibration.json"
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")


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
    activations, casts included) over the matmul FLOP/s at the same GEMM size (<= 1 within the measured
    matmul sides, possibly above beyond the largest, where the matmul rate is extrapolated flat): the share of
    the matmul rate a real block sustains (measured above the block floor). Empty = 1.0."""
    block_floor: dict[str, float] = field(default_factory=dict)
    """dtype -> seconds of a tiny block's forward + backward: the fixed cost every block pays per
    micro-batch (op dispatch, kernel launches). Empty = 0."""
    gemm: dict[str, list[list[float]]] = field(default_factory=dict)
    """dtype -> [[m, k, n, seconds], ...]: one ``(m x k) @ (k x n)`` product timed at that shape (a hardware
    profile's GEMM table; the time model looks each traced GEMM up here). Empty = square ``matmul`` rates."""
    head_and_loss: list[list[float]] = field(default_factory=list)
    """[[batch, seq, hidden, vocab, seconds], ...]: lm_head (bf16 autocast) + float32 cross-entropy,
    forward + backward, measured at that shape. Empty = costed like any node."""
    optimizer_step: dict[str, float] = field(default_factory=dict)
    """optimizer ("adamw") -> seconds of one step per parameter element. Empty = memory-bound formula."""
    mem_bandwidth: float | None = None
    """Measured device memory bytes/s (memory-bound ops, gradient accumulation); None = the Cluster's."""
    model_gemm: dict[str, list[list[float]]] = field(default_factory=dict)
    """dtype -> [[m, k, n, seconds], ...]: GEMMs timed here at a traced model's own shapes
    (:mod:`moreh_ap.planner.shape_calibration`); the time model's rate for a node's GEMMs. Unlike ``gemm`` (a
    hardware profile's table) it does not switch the cost model to the op-census path. Empty = square rates."""
    node_times: dict[str, list[list[float]]] = field(default_factory=dict)
    """:func:`node_time_key` -> [[scale, seconds], ...]: a node of a live model (its own block, or its head +
    loss) timed here, forward + backward (+ the recomputed forward) as the model runs it, at micro-batch =
    ``scale`` x the traced batch. The cost model prefers these to FLOPs / rate. Empty = formulas."""
    measure_s: float = 0.0
    """Seconds the base measurement (matmuls, reference block, collectives) took (what the budget has left)."""
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
            **({"gemm": self.gemm} if self.gemm else {}),
            **({"head_and_loss": self.head_and_loss} if self.head_and_loss else {}),
            **({"optimizer_step": self.optimizer_step} if self.optimizer_step else {}),
            **({"mem_bandwidth": self.mem_bandwidth} if self.mem_bandwidth else {}),
            **({"model_gemm": self.model_gemm} if self.model_gemm else {}),
            **({"node_times": self.node_times} if self.node_times else {}),
            "measure_s": self.measure_s,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "cache") -> CalibrationDB:
        """Parse the JSON form; raises ``ValueError`` on anything malformed."""
        if not isinstance(data, dict) or data.get("format") not in READ_FORMATS:
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
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in eff.values()
        ):
            raise ValueError("block_efficiency must be an object of numbers > 0")
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
            **_timing_tables(data),
            **_model_tables(data),
        )


def _timing_tables(data: dict[str, Any]) -> dict[str, Any]:
    """The optional timing tables of a DB (``gemm``, ``head_and_loss``, ``optimizer_step``, ``mem_bandwidth``)."""
    out: dict[str, Any] = {}
    gemm = data.get("gemm") or {}
    if not isinstance(gemm, dict):
        raise ValueError("gemm must be an object dtype -> [[m, k, n, seconds], ...]")
    for k, rows in gemm.items():
        if not isinstance(rows, list) or not all(
                isinstance(r, list) and len(r) == 4 and all(isinstance(x, (int, float)) and x > 0 for x in r)
                for r in rows):
            raise ValueError(f"gemm[{k}] must be a list of [m, k, n, seconds] with positive numbers")
    out["gemm"] = {str(k): [list(map(float, r)) for r in v] for k, v in gemm.items()}
    hl = data.get("head_and_loss") or []
    if not isinstance(hl, list) or not all(
            isinstance(r, list) and len(r) == 5 and all(isinstance(x, (int, float)) and x > 0 for x in r) for r in hl):
        raise ValueError("head_and_loss must be a list of [batch, seq, hidden, vocab, seconds] with positive numbers")
    out["head_and_loss"] = [list(map(float, r)) for r in hl]
    opt = data.get("optimizer_step") or {}
    if not isinstance(opt, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in opt.values()):
        raise ValueError("optimizer_step must be an object optimizer -> seconds per parameter (> 0)")
    out["optimizer_step"] = {str(k): float(v) for k, v in opt.items()}
    bw = data.get("mem_bandwidth")
    if bw is not None and (not isinstance(bw, (int, float)) or bw <= 0):
        raise ValueError("mem_bandwidth must be bytes/s > 0 or absent")
    out["mem_bandwidth"] = None if bw is None else float(bw)
    return out


def _model_tables(data: dict[str, Any]) -> dict[str, Any]:
    """The tables measured at a model's own shapes (``model_gemm``, ``node_times``, ``measure_s``; absent in /2)."""
    mg = data.get("model_gemm") or {}
    if not isinstance(mg, dict):
        raise ValueError("model_gemm must be an object dtype -> [[m, k, n, seconds], ...]")
    for k, rows in mg.items():
        if not isinstance(rows, list) or not all(
                isinstance(r, list) and len(r) == 4 and all(isinstance(x, (int, float)) and x > 0 for x in r)
                for r in rows):
            raise ValueError(f"model_gemm[{k}] must be a list of [m, k, n, seconds] with positive numbers")
    nt = data.get("node_times") or {}
    if not isinstance(nt, dict):
        raise ValueError("node_times must be an object key -> [[scale, seconds], ...]")
    for k, pts in nt.items():
        _check_points(f"node_times[{k}]", pts)
    ms = data.get("measure_s", 0.0)
    if not isinstance(ms, (int, float)) or ms < 0:
        raise ValueError("measure_s must be seconds >= 0")
    return {"model_gemm": {str(k): [list(map(float, r)) for r in v] for k, v in mg.items()},
            "node_times": {str(k): [list(map(float, p)) for p in v] for k, v in nt.items()},
            "measure_s": float(ms)}


def _check_points(what: str, pts: Any) -> None:
    if not isinstance(pts, list) or not pts:
        raise ValueError(f"{what} must be a non-empty list")
    for p in pts:
        if not (isinstance(p, list) and len(p) == 2 and all(isinstance(x, (int, float)) and x > 0 for x in p)):
            raise ValueError(f"{what}: bad point {p!r}")


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
        if isinstance(data, dict) and data.get("format") in READ_FORMATS:
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


def read_cache(path: Path, fp: dict[str, Any]) -> CalibrationDB | None:
    entries = _read_entries(path)
    if not entries:
        return None
    key = entry_key(fp)
    if key not in entries:
        logger.info(f"Calibration DB {path} has no entry for {key} (it has {len(entries)} other(s)); measuring one.")
        return None
    return entries[key]


LOCK_TIMEOUT_S = 10.0
"""How long :func:`write_entry` waits for another process's lock on the DB file before giving up (with a warning)."""


def write_entry(path: Path, db: CalibrationDB, *, lock_timeout_s: float = LOCK_TIMEOUT_S) -> bool:
    """Add (or replace) ``db``'s entry in the file, keeping the others; atomic, serialised with a lock file.

    The lock is waited for at most ``lock_timeout_s``; then a warning is logged and the entry is not
    saved (the caller goes on with ``db`` in memory).

    Returns:
        True when the entry was written.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a") as lock:
        deadline = time.monotonic() + lock_timeout_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    logger.warning(f"Calibration DB {path}: the lock {lock_path} is held by another process after "
                                   f"{lock_timeout_s:g} s of waiting; this calibration is used but not saved.")
                    return False
                time.sleep(0.05)
        try:
            entries = _read_entries(path, warn=False) or {}  # a corrupt file (warned about already) is replaced
            entries[entry_key(db.fingerprint)] = db
            data = {"format": FILE_FORMAT, "entries": {k: v.to_dict() for k, v in sorted(entries.items())}}
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return True
