# `--calibration PATH`: read a calibration DB written by moreh_ap, or a hardware profile, into a CalibrationDB.
"""Timings for the planner from a file instead of this machine's measurements.

Two formats are recognised by their content (docs/calibration.md describes both):

* a DB written by moreh_ap: one entry (``"format": "moreh_ap.calibration/3"``, or ``/2``) or the cache file
  (``"format": "moreh_ap.calibration-file/1"`` with ``"entries"``; it must hold exactly one entry);
* a hardware profile (the format of ``benchmarks/data/h200/profile.json``): ``gemm`` (GEMM seconds by
  shape and dtype), optionally ``head_and_loss``, ``adamw_fused_step_1e9_params_seconds`` and the
  moreh_ap DB measured on that device (``moreh_ap_calibration_db_*``: its block floor, and its
  collectives when it has them).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moreh_ap.planner.calibration_db import FILE_FORMAT, FORMAT, READ_FORMATS, CalibrationDB

ADAMW_BYTES_PER_PARAM = 28
"""Bytes one fused AdamW step touches per fp32 parameter: reads param, grad, exp_avg, exp_avg_sq (16),
writes param, exp_avg, exp_avg_sq (12)."""
_DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float32": "fp32", "fp32": "fp32"}


def load_calibration_file(path: str | Path) -> CalibrationDB:
    """The :class:`CalibrationDB` in ``path`` (a moreh_ap DB or a hardware profile, detected by content).

    Raises:
        ValueError: unreadable file, or neither format (the message names ``--calibration`` and both formats).
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--calibration {str(path)!r}: cannot read a JSON file: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--calibration {str(path)!r}: expected a JSON object")
    try:
        if data.get("format") in READ_FORMATS:
            return CalibrationDB.from_dict(data, source=f"file:{p.name}")
        if data.get("format") == FILE_FORMAT:
            entries = data.get("entries") or {}
            if len(entries) != 1:
                raise ValueError(f"a cache file must hold exactly one entry to be used as is, it has "
                                 f"{len(entries)}: {sorted(entries)}")
            return CalibrationDB.from_dict(next(iter(entries.values())), source=f"file:{p.name}")
        if isinstance(data.get("gemm"), list):
            return from_profile(data, source=f"profile:{p.name}")
    except ValueError as exc:
        raise ValueError(f"--calibration {str(path)!r}: {exc}") from None
    raise ValueError(
        f"--calibration {str(path)!r} is not valid: expected a moreh_ap calibration DB (\"format\": {FORMAT!r} or "
        f"{FILE_FORMAT!r}) or a hardware profile with a \"gemm\" list (see docs/calibration.md)"
    )


def _embedded_db(data: dict[str, Any]) -> dict[str, Any] | None:
    for key, value in data.items():
        if key.startswith("moreh_ap_calibration_db") and isinstance(value, dict):
            return value
    return None


def from_profile(data: dict[str, Any], *, source: str = "profile") -> CalibrationDB:
    """A :class:`CalibrationDB` from a hardware profile (read as it is; see docs/calibration.md).

    GEMM rows become the ``gemm`` table, the square ones also the ``matmul`` table; ``head_and_loss`` rows,
    the fused AdamW step (seconds per parameter, and the memory bandwidth it implies) and the embedded
    moreh_ap DB's block floor and collectives are taken as they are.
    """
    gemm: dict[str, list[list[float]]] = {}
    for i, row in enumerate(data["gemm"]):
        if not isinstance(row, dict) or row.get("dtype") not in _DTYPES:
            raise ValueError(f"gemm[{i}] must have a dtype in {sorted(_DTYPES)}: {row!r}")
        vals = [row.get(k) for k in ("m", "k", "n", "seconds")]
        if not all(isinstance(v, (int, float)) and v > 0 for v in vals):
            raise ValueError(f"gemm[{i}] must have m, k, n, seconds > 0: {row!r}")
        gemm.setdefault(_DTYPES[row["dtype"]], []).append([float(v) for v in vals])
    matmul = {dt: sorted([r[0], 2 * r[0] ** 3 / r[3]] for r in rows if r[0] == r[1] == r[2])
              for dt, rows in gemm.items()}
    head = [[float(v[k]) for k in ("b", "s", "h", "vocab", "seconds")]
            for v in (data.get("head_and_loss") or {}).values()]
    adamw = data.get("adamw_fused_step_1e9_params_seconds")
    db = {"format": FORMAT, "fingerprint": dict((_embedded_db(data) or {}).get("fingerprint") or {}),
          "matmul": {k: v for k, v in matmul.items() if v} or {dt: [[1.0, 1.0]] for dt in gemm},
          "collectives": None, "block_efficiency": {}, "gemm": gemm, "head_and_loss": head}
    if isinstance(adamw, (int, float)) and adamw > 0:
        db["optimizer_step"] = {"adamw": adamw / 1e9}
        db["mem_bandwidth"] = ADAMW_BYTES_PER_PARAM * 1e9 / adamw
    embedded = _embedded_db(data)
    if embedded is not None:
        db["block_floor"] = dict(embedded.get("block_floor") or {})
        if embedded.get("collectives"):
            db["collectives"] = embedded["collectives"]
            db["collective_world"] = embedded.get("collective_world", 1)
    return CalibrationDB.from_dict(db, source=source)
