# Sharded checkpoints of a ParallelModel and its optimizer with torch.distributed.checkpoint, by original names.
"""``moreh_ap.checkpoint.save(path, model, optimizer)`` / ``load(path, model, optimizer)``.

A directory written by ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards, a
tensor replicated over ranks (data parallel, or a tie across pipeline ranks) is written once. Keys are
the model's ORIGINAL names, not the pipeline stages' module names, so a checkpoint loads under another
``ParallelConfig`` or world size (DCP reshards), also in one process:

- ``model/<name>``: every parameter and persistent buffer, a tied one once under its canonical name
  (its first name in ``named_parameters(remove_duplicate=False)``), filled into every copy at load; a
  parameter re-laid for tensor parallelism (GPT-2's fused q/k/v ``c_attn``) is stored whole in one-device
  order (it and its optimizer state), not as shards;
- ``optim/<name>/<key>``: the optimizer's per-parameter state (``exp_avg``, ``step``, ...), sharded like
  the parameter under FSDP2; ``optim_groups``: the param groups' hyper-parameters (``lr``, FusedLAMB's
  ``step``, ...) with the parameters' names.

DCP reads its metadata with pickle: load only directories you trust.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from moreh_ap.faults import check_usable
from moreh_ap.optim.norms import is_dtensor
from moreh_ap.runtime.apply import local_module
from moreh_ap.runtime.dist import world_size
from moreh_ap.runtime.engine import ParallelModel
from moreh_ap.runtime.optim_state import lay_named_state, local_named_state, map_of
from moreh_ap.runtime.state_dict import copy_full_into, reshard_fsdp
from moreh_ap.models.tp_plan import from_tp_order, to_tp_order
from moreh_ap.models import clean_name

__all__ = ["save", "load"]

_GROUPS = "optim_groups"


def _check(model: Any, path: Any, optimizer: Any, *, what: str) -> str:
    if not isinstance(model, ParallelModel):
        raise TypeError(f"moreh_ap.checkpoint.{what}: model must be the ParallelModel returned by "
                        f"moreh_ap.parallelize, got {type(model).__name__}")
    if optimizer is not None:
        if optimizer is not model.optimizer:
            raise ValueError(f"moreh_ap.checkpoint.{what}: the optimizer is not the one given to "
                             "parallelize(model, config, optimizer=...)")
        map_of(optimizer)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"moreh_ap.checkpoint.{what}: path must be a directory path, got {type(path).__name__}")
    check_usable(f"moreh_ap.checkpoint.{what}()")  # a collective: not after this rank's own failure
    return os.fspath(path)


def _held_tensors(model: ParallelModel) -> dict[str, torch.Tensor]:
    """Canonical original name -> this rank's tensor (a DTensor under FSDP2 or TP), each tensor once."""
    keys = set(model._orig_keys)
    out: dict[str, torch.Tensor] = {}
    for st in model._stages:
        module = local_module(st, model.wrapper)
        for n, t in list(module.named_parameters()) + list(module.named_buffers()):
            names = [o for o in st.names.get(clean_name(n), []) if o in keys]
            if names:
                out.setdefault(names[0], t.detach())
    return out


def _model_entries(model: ParallelModel) -> dict[str, torch.Tensor]:
    """``model/<canonical name>`` -> what is saved: this rank's tensor (DCP writes a DTensor's shards), except a
    tensor re-laid for tensor parallelism (GPT-2's fused q/k/v), saved whole in one-device order (a collective
    over its mesh) so that the checkpoint loads under any other configuration."""
    out = {}
    for name, t in _held_tensors(model).items():
        relay = model._relays.get(name)
        if relay is not None:
            t = from_tp_order(t.full_tensor() if is_dtensor(t) else t, relay)
        out[f"model/{name}"] = t
    return out


def _model_targets(model: ParallelModel) -> dict[str, torch.Tensor]:
    """What DCP fills at load: this rank's tensors in place, a whole one-device-order tensor for a re-laid one
    (copied in by :func:`_lay_relaid` after the load)."""
    out = {}
    for name, t in _held_tensors(model).items():
        local = t.to_local() if is_dtensor(t) else t
        relaid = name in model._relays
        out[f"model/{name}"] = torch.empty(t.shape, dtype=t.dtype, device=local.device) if relaid else t
    return out


def _lay_relaid(model: ParallelModel, state: dict[str, Any]) -> None:
    held = _held_tensors(model)
    with torch.no_grad():
        for name, relay in model._relays.items():
            if name in held:
                copy_full_into(held[name], to_tp_order(state[f"model/{name}"], relay), name=name)


def _optim_entries(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[dict]]:
    omap = map_of(optimizer)
    named = local_named_state(optimizer, omap, full=False)
    flat = {}
    for n, st in named["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and n in omap.relays and v.dim() > 0:
                v = from_tp_order(v.full_tensor() if is_dtensor(v) else v, omap.relays[n])  # as its parameter
            flat[f"optim/{n}/{k}"] = v.detach() if isinstance(v, torch.Tensor) else v
    return flat, named["param_groups"]


def save(path: str | os.PathLike, model: ParallelModel, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write ``model``'s weights (and ``optimizer``'s state) to the directory ``path``, each rank its own part.

    A collective: every rank calls it with the same path (a shared file system across nodes).

    Args:
        path: the checkpoint directory (created; files in it are replaced).
        model: the ``ParallelModel`` from :func:`moreh_ap.parallelize`.
        optimizer: the optimizer given to ``parallelize`` (None: weights only).

    Raises:
        TypeError / ValueError: ``model`` is not a ParallelModel, or ``optimizer`` not the one it rebound.
    """
    import torch.distributed.checkpoint as dcp

    path = _check(model, path, optimizer, what="save")
    state: dict[str, Any] = _model_entries(model)
    if optimizer is not None:
        flat, groups = _optim_entries(optimizer)
        state.update(flat)
        state[_GROUPS] = groups
    dcp.save(state, checkpoint_id=path, no_dist=world_size() == 1)


def load(path: str | os.PathLike, model: ParallelModel, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Read a checkpoint written by :func:`save` (under any config or world size) into ``model`` / ``optimizer``.

    A collective: every rank calls it. Each rank reads only its stages' shards; tied copies are all filled;
    the optimizer gets its state and the saved groups' hyper-parameters. Load trusted directories only (DCP
    unpickles its metadata).

    Raises:
        TypeError / ValueError: bad arguments, or the checkpoint lacks a tensor this model holds
            (another model) or has no optimizer state when an optimizer is given.
        FileNotFoundError: ``path`` is not a checkpoint directory.
    """
    import torch.distributed.checkpoint as dcp

    path = _check(model, path, optimizer, what="load")
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"moreh_ap.checkpoint.load: {path!r} is not a checkpoint directory written by "
                                "moreh_ap.checkpoint.save (no .metadata file)")
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    for st in model._stages:
        reshard_fsdp(local_module(st, model.wrapper))
    state: dict[str, Any] = _model_targets(model)
    missing = [k for k in state if k not in meta]
    if missing:
        raise ValueError(f"moreh_ap.checkpoint.load: {path!r} has no {[k[6:] for k in missing[:5]]}: it was saved "
                         "from another model")
    if optimizer is not None:
        groups = _groups_target(meta)
        if not groups:
            raise ValueError(f"moreh_ap.checkpoint.load: {path!r} holds no optimizer state (saved without one)")
        state.update(_optim_targets(optimizer, meta))
        state[_GROUPS] = groups
    dcp.load(state, checkpoint_id=path, no_dist=world_size() == 1)
    _lay_relaid(model, state)
    if optimizer is not None:
        _lay_optimizer(optimizer, state)


def _groups_target(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The saved param groups' shape (DCP stores ``optim_groups.<i>.<key>`` one object each) with None leaves."""
    found: dict[int, dict[str, Any]] = {}
    for key in meta:
        parts = key.split(".", 2)
        if len(parts) == 3 and parts[0] == _GROUPS and parts[1].isdigit():
            found.setdefault(int(parts[1]), {})[parts[2]] = None
    return [found[i] for i in sorted(found)]


def _optim_targets(optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> dict[str, Any]:
    """Empty tensors, shaped like the saved ones and laid like this rank's parameters, for DCP to fill."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    omap = map_of(optimizer)
    out: dict[str, Any] = {}
    for key, md in meta.items():
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "optim" or parts[1] not in omap.local:
            continue
        p = omap.local[parts[1]]
        if not isinstance(md, TensorStorageMetadata):
            out[key] = None
            continue
        whole = parts[1] in omap.relays  # saved in one-device order: lay_named_state re-lays and shards it
        out[key] = _empty_like_saved(p, tuple(md.size), md.properties.dtype, whole=whole)
    return out


def _empty_like_saved(p: torch.Tensor, size: tuple[int, ...], dtype: torch.dtype, *, whole: bool) -> torch.Tensor:
    if is_dtensor(p) and size == tuple(p.shape) and len(size) > 0 and not whole:
        from torch.distributed.tensor import DTensor

        local = torch.empty(p.to_local().shape, dtype=dtype, device=p.to_local().device)
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())
    device = p.to_local().device if is_dtensor(p) else p.device
    return torch.empty(size, dtype=dtype, device=device if len(size) > 0 else torch.device("cpu"))


def _lay_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    named: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "optim":
            named.setdefault(parts[1], {})[parts[2]] = value
    lay_named_state(optimizer, {"state": named, "param_groups": state[_GROUPS]}, map_of(optimizer))
