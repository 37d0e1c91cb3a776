# Sharded checkpoints of a ParallelModel and its optimizer with torch.distributed.checkpoint, by original names.
"""``moreh_ap.checkpoint.save(path, model, optimizer)`` / ``load(path, model, optimizer)``.

A directory written by ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards, a
tensor replicated over ranks (data parallel, or a tie across pipeline ranks) is written once. Keys are
the model's ORIGINAL names, not the pipeline stages' module names, so a checkpoint loads under another
``ParallelConfig`` or world size (DCP reshards), also in one process:

- ``model/<name>``: every parameter and persistent buffer, a tied one once under its canonical name
  (its first name in ``named_parameters(remove_duplicate=False)``), filled into every copy at load;
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
from moreh_ap.runtime.state_dict import reshard_fsdp
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


def _model_entries(model: ParallelModel) -> dict[str, torch.Tensor]:
    """``model/<canonical name>`` -> this rank's tensor (a DTensor shard under FSDP2), each tensor once."""
    keys = set(model._orig_keys)
    out: dict[str, torch.Tensor] = {}
    for st in model._stages:
        module = local_module(st, model.wrapper)
        for n, t in list(module.named_parameters()) + list(module.named_buffers()):
            names = [o for o in st.names.get(clean_name(n), []) if o in keys]
            if names:
                out.setdefault(f"model/{names[0]}", t.detach())
    return out


def _optim_entries(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[dict]]:
    named = local_named_state(optimizer, map_of(optimizer), full=False)
    flat = {f"optim/{n}/{k}": (v.detach() if isinstance(v, torch.Tensor) else v)
            for n, st in named["state"].items() for k, v in st.items()}
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
    state: dict[str, Any] = _model_entries(model)
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
        out[key] = _empty_like_saved(p, tuple(md.size), md.properties.dtype)
    return out


def _empty_like_saved(p: torch.Tensor, size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if is_dtensor(p) and size == tuple(p.shape) and len(size) > 0:
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
