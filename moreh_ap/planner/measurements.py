# Closed loop: measured steps of a configuration, stored per (device, model, config), and the planner's correction rule.
"""What the engine measured on this machine, and how the planner corrects its predictions with it.

The engine (:mod:`moreh_ap.runtime.closed_loop`) measures steps 2-3 of a run and writes one
:class:`Measurement` into ``measurements.json`` in ``MOREH_AP_CACHE_DIR`` (atomic, under a lock
file), keyed by the device fingerprint (:func:`device_fingerprint`: device name, torch version,
threads, ranks), the model (:func:`model_signature` of the traced graph) and the configuration's
``to_dict()``. A later plan for the same device and model reads them (:func:`load_measurements`).

The correction rule (:class:`Corrections`), by the parts of the predicted breakdowns:

- time: ``compute`` (compute + bubble: the bubble is idle compute slots), ``communication``
  (p2p + dp_comm) and ``optimizer``. The optimizer step is timed on its own, so its factor is
  measured / predicted. Communication is not timed apart from the forward/backward: the measured
  ``train_step`` time minus the predicted communication is the compute time (factor
  ``(train_step - comm) / compute``), communication keeps factor 1; when the predicted
  communication is larger than the whole measured ``train_step``, compute and communication share
  the factor ``train_step / (compute + comm)``.
- memory: ``static`` (params + grads + optimizer state, measured as the bytes of those tensors)
  and ``dynamic`` (activations + transient: the measured peak minus the static bytes).

Each factor is the geometric mean over this device and model's measured configurations. A measured
configuration is predicted with its own factors (a part it gave no information about keeps factor 1,
as its other factors assumed), so it is predicted as it was measured; every
other candidate's parts are multiplied by the mean factors, so candidates whose breakdowns differ
move by different amounts. Memory corrections change feasibility against the cap.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moreh_ap.env import read_env
from moreh_ap.log import logger

__all__ = ["Measurement", "Corrections", "device_fingerprint", "model_signature", "load_measurements",
           "save_measurement", "measurement_path", "learn_and_correct", "FILENAME"]

FILENAME = "measurements.json"
FORMAT = "moreh_ap.measurements/1"


def device_fingerprint(device_type: str, world: int) -> dict[str, Any]:
    """What a measurement was taken on: device name, torch version, intra-op threads, ranks.

    Args:
        device_type: "cuda" or "cpu" (a CUDA fingerprint without CUDA names no device, so it matches nothing).
        world: ranks of the run.
    """
    import torch

    if device_type == "cuda":
        device = torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available() else "cuda:none"
    else:
        device = f"cpu:{platform.machine()}:{os.cpu_count()}"
    return {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(), "world": int(world)}


def model_signature(graph) -> dict[str, Any]:
    """A stable signature of a traced model (:class:`~moreh_ap.graph.model_graph.ModelGraph`): class,
    family, parameters, blocks, traced batch and forward FLOPs (which carry the sequence length)."""
    return {"model": graph.model_name, "family": graph.adapter_name, "params": int(graph.total_params),
            "blocks": int(graph.num_blocks), "batch": int(graph.batch_size),
            "fwd_flops": int(sum(n.fwd_flops for n in graph.nodes))}


@dataclass(kw_only=True, slots=True)
class Measurement:
    """Steps 2-3 of one run of one configuration, as the engine measured them."""

    device: dict[str, Any]
    """:func:`device_fingerprint` of the run."""
    model: dict[str, Any]
    """:func:`model_signature` of the planned graph."""
    config: dict[str, Any]
    """``ParallelConfig.to_dict()`` of the run."""
    train_step_time: float
    """Seconds of ``train_step`` (forward + backward + gradient collectives), device synchronized."""
    optimizer_time: float | None
    """Seconds of the optimizer's ``step()``; None when the engine was not given the optimizer."""
    peak_bytes: int
    """Peak bytes per rank (max over ranks) over the measured steps."""
    static_bytes: int
    """Bytes of parameters, gradients and optimizer state per rank (max over ranks) after the step."""
    memory_source: str
    """How the peak was measured ("torch.cuda.max_memory_allocated" or "live tracker")."""
    predicted: dict[str, Any] = field(default_factory=dict)
    """The plan's prediction for this configuration (``Candidate.to_dict()``), when the engine had one."""

    def step_time(self, predicted_optimizer: float = 0.0) -> float:
        """Seconds per step: ``train_step`` + the optimizer step (the predicted one when it was not measured)."""
        return self.train_step_time + (self.optimizer_time if self.optimizer_time is not None else predicted_optimizer)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Measurement":
        """Parse the JSON form; raises ``ValueError`` on anything malformed."""
        try:
            m = cls(**{k: data[k] for k in cls.__slots__ if k in data})
        except TypeError as exc:
            raise ValueError(f"bad measurement: {exc}") from None
        if not (m.train_step_time > 0 and m.peak_bytes >= 0 and m.static_bytes >= 0):
            raise ValueError(f"bad measurement numbers: {data}")
        return m

    def key(self) -> str:
        return _key(self.device, self.model) + "|" + json.dumps(self.config, sort_keys=True)


def _key(device: dict, model: dict) -> str:
    return json.dumps(device, sort_keys=True) + "|" + json.dumps(model, sort_keys=True)


def measurement_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """``measurements.json`` in ``cache_dir`` (default ``MOREH_AP_CACHE_DIR``)."""
    return Path(cache_dir if cache_dir is not None else read_env().cache_dir) / FILENAME


def _read(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            raise ValueError(f"not a {FORMAT} file")
        return data["entries"]
    except (OSError, ValueError) as exc:
        logger.warning(f"Measurements file {path} is unreadable ({exc}); ignoring it.")
        return {}


def save_measurement(m: Measurement, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Add (or replace) ``m``'s entry in the file, keeping the others; atomic, serialised with a lock file."""
    path = measurement_path(cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            entries = _read(path)
            entries[m.key()] = m.to_dict()
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"format": FORMAT, "entries": dict(sorted(entries.items()))}, indent=1))
            os.replace(tmp, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def load_measurements(device: dict[str, Any], model: dict[str, Any], *,
                      cache_dir: str | os.PathLike | None = None) -> list[Measurement]:
    """The measurements of ``model`` on ``device`` (any configuration); malformed entries are skipped."""
    prefix = _key(device, model) + "|"
    out = []
    for key, entry in _read(measurement_path(cache_dir)).items():
        if key.startswith(prefix):
            try:
                out.append(Measurement.from_dict(entry))
            except ValueError as exc:
                logger.warning(f"Skipping a malformed measurement ({exc}).")
    return out


def _gmean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else 1.0


@dataclass(kw_only=True, slots=True)
class Factors:
    """Measured / predicted, by part of the breakdowns (1.0 = nothing learnt for that part)."""

    compute: float = 1.0
    """compute + bubble."""
    comm: float = 1.0
    """p2p + dp_comm + tp_comm."""
    optimizer: float = 1.0
    """The optimizer step."""
    static: float = 1.0
    """params + grads + optimizer state."""
    dynamic: float = 1.0
    """activations + transient."""

    def describe(self) -> str:
        return (f"compute x{self.compute:.3g}, communication x{self.comm:.3g}, optimizer x{self.optimizer:.3g}, "
                f"static memory x{self.static:.3g}, activations x{self.dynamic:.3g}")


def _time_parts(tb: dict[str, float]) -> tuple[float, float, float]:
    return (tb.get("compute", 0.0) + tb.get("bubble", 0.0), tb.get("p2p", 0.0) + tb.get("dp_comm", 0.0)
            + tb.get("tp_comm", 0.0), tb.get("optimizer", 0.0))


def _mem_parts(mem) -> tuple[int, int]:
    return mem.params + mem.grads + mem.optimizer, mem.activations + mem.transient


def measured_factors(m: Measurement, cand) -> dict[str, float | None]:
    """The factors one measurement gives against ``cand``'s (uncorrected) prediction; None = no information."""
    out: dict[str, float | None] = {"compute": None, "comm": None, "optimizer": None, "static": None, "dynamic": None}
    if cand.time_breakdown:
        pc, pm, po = _time_parts(cand.time_breakdown)
        ts = m.train_step_time
        if ts > pm and pc > 0:
            out["compute"] = (ts - pm) / pc
        elif pc + pm > 0:
            out["compute"] = out["comm"] = ts / (pc + pm)
        if m.optimizer_time is not None and po > 0:
            out["optimizer"] = m.optimizer_time / po
    if cand.memory is not None:
        ps, pd = _mem_parts(cand.memory)
        if ps > 0:
            out["static"] = m.static_bytes / ps
        if pd > 0:
            out["dynamic"] = max(m.peak_bytes - m.static_bytes, 0) / pd
    return out


class Corrections:
    """The corrections learnt from measurements, applied to a plan's candidates (see the module docstring)."""

    def __init__(self, measurements: list[Measurement]) -> None:
        self.measurements = list(measurements)
        self.own: dict[str, dict[str, float | None]] = {}
        """Per measured configuration (JSON of its to_dict): its own factors."""
        self.mean = Factors()

    def learn(self, cands: list) -> "Corrections":
        """Factors from the measured configurations found among ``cands`` (before any correction)."""
        by_cfg = {json.dumps(c.config.to_dict(), sort_keys=True): c for c in cands}
        for m in self.measurements:
            cand = by_cfg.get(json.dumps(m.config, sort_keys=True))
            if cand is not None:
                self.own[json.dumps(m.config, sort_keys=True)] = measured_factors(m, cand)
        for part in ("compute", "comm", "optimizer", "static", "dynamic"):
            setattr(self.mean, part, _gmean([f[part] for f in self.own.values()]))
        return self

    def _factors(self, cand) -> Factors:
        own = self.own.get(json.dumps(cand.config.to_dict(), sort_keys=True))
        if own is None:
            return self.mean
        return Factors(**{k: (v if v is not None else 1.0) for k, v in own.items()})  # as measured

    def correct_memory(self, cand, cap: int) -> None:
        """Scale ``cand``'s memory parts (static vs dynamic) and re-check it against ``cap``."""
        if cand.memory is None or not self.own:
            return
        f = self._factors(cand)
        mem = cand.memory
        for name, k in (("params", f.static), ("grads", f.static), ("optimizer", f.static),
                        ("activations", f.dynamic), ("transient", f.dynamic)):
            setattr(mem, name, int(round(getattr(mem, name) * k)))
        cand.feasible = mem.total <= cap
        cand.reason = None if cand.feasible else (
            f"out of memory (corrected by measurements): needs {mem.total:,} bytes per device > {cap:,} available")

    def correct_time(self, cand) -> None:
        """Scale ``cand``'s time parts (compute + bubble, p2p + dp_comm + tp_comm, optimizer)."""
        if not cand.time_breakdown or not self.own:
            return
        f = self._factors(cand)
        tb = dict(cand.time_breakdown)
        for name, k in (("compute", f.compute), ("bubble", f.compute), ("p2p", f.comm), ("dp_comm", f.comm),
                        ("tp_comm", f.comm), ("optimizer", f.optimizer)):
            if name in tb:
                tb[name] *= k
        tb["total"] = sum(v for k, v in tb.items() if k != "total")
        cand.time_breakdown = tb
        cand.step_time = tb["total"]


def learn_and_correct(cands: list, *, device: dict[str, Any], model: dict[str, Any], cost, cap: int,
                      cache_dir: str | os.PathLike | None = None) -> Corrections | None:
    """Read the measurements of ``model`` on ``device``, learn the factors from the measured candidates'
    predictions (``cost(cand)`` fills the time of those not costed yet, even over the cap) and correct
    every candidate's memory (feasibility included); times are corrected after costing
    (:meth:`Corrections.correct_time`). None when nothing here was measured."""
    found = load_measurements(device, model, cache_dir=cache_dir)
    if not found:
        return None
    measured = {json.dumps(m.config, sort_keys=True) for m in found}
    for c in cands:
        if c.step_time is None and json.dumps(c.config.to_dict(), sort_keys=True) in measured:
            cost(c)
    corrections = Corrections(found).learn(cands)
    if not corrections.own:
        logger.info(f"{len(found)} measurement(s) of this model on this machine, none of a candidate here: "
                    "predictions are not corrected.")
        return None
    for c in cands:
        corrections.correct_memory(c, cap)
    logger.info(f"Predictions corrected by {len(corrections.own)} measured configuration(s) of this model on this "
                f"machine: {corrections.mean.describe()}.")
    return corrections
