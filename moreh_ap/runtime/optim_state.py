# The user's optimizer state in one-device format (indices of the user's groups) vs this rank's shards.
"""Three formats of an optimizer's state:

- **one-device**: what ``optimizer.state_dict()`` gives on one device: ``{"state": {index: {key: value}},
  "param_groups": [{..., "params": [index, ...]}]}``, indices counting the user's parameters over the
  groups in order, full tensors;
- **named**: the same keyed by each parameter's canonical original name (its first name in
  ``model.named_parameters(remove_duplicate=False)``): ``{"state": {name: {...}}, "param_groups":
  [{..., "params": [name, ...]}]}``, full tensors (the sharded checkpoint uses it with shards);
- **local**: the rebound optimizer's own (``torch.optim.Optimizer.state_dict`` of this rank's params).

:class:`OptimizerMap` (kept per optimizer by :func:`register_map` when ``parallelize`` rebinds it) knows
the canonical names of the user's groups and this rank's parameter for each name.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from moreh_ap.models.tp_plan import Relay, from_tp_order, to_tp_order
from moreh_ap.optim.norms import is_dtensor
from moreh_ap.precision_hooks import model_param

__all__ = ["OptimizerMap", "register_map", "map_of", "plain_class", "named_from_one_device", "one_device_from_named",
           "lay_named_state", "local_named_state", "full_value", "shard_value", "skeleton"]


@dataclass(kw_only=True, slots=True)
class OptimizerMap:
    """How a rebound optimizer's parameters relate to the user's one-device optimizer."""

    group_names: list[list[str]]
    """Canonical original name of every parameter of every group, in the user's original order."""
    local: dict[str, torch.Tensor] = field(default_factory=dict)
    """Canonical name -> this rank's parameter (possibly a DTensor shard) in the rebound optimizer."""
    relays: dict[str, Relay] = field(default_factory=dict)
    """Original name -> re-lay of a parameter held in tensor-parallel order (its state is laid the same way)."""

    def index_names(self) -> list[str]:
        """The canonical name of each one-device index (``index_names()[i]`` is parameter ``i``)."""
        return [n for names in self.group_names for n in names]


_MAPS: "weakref.WeakKeyDictionary[torch.optim.Optimizer, OptimizerMap]" = weakref.WeakKeyDictionary()


def register_map(optimizer: torch.optim.Optimizer, omap: OptimizerMap) -> None:
    """Remember ``omap`` for ``optimizer`` (the runtime rebound it)."""
    _MAPS[optimizer] = omap


def map_of(optimizer: torch.optim.Optimizer) -> OptimizerMap:
    """The :class:`OptimizerMap` of an optimizer rebound by ``parallelize``.

    Raises:
        ValueError: ``optimizer`` was not given to ``parallelize``.
    """
    omap = _MAPS.get(optimizer)
    if omap is None:
        raise ValueError(f"{type(optimizer).__name__} was not rebound by moreh_ap.parallelize: pass it as "
                         "parallelize(model, config, optimizer=...)")
    return omap


def plain_class(optimizer: torch.optim.Optimizer) -> type:
    """The user's optimizer class under any same-named view class the one-line mode put on top."""
    for cls in type(optimizer).__mro__:
        if not cls.__dict__.get("_moreh_ap_view", False):
            return cls
    return type(optimizer)


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in group.items() if k not in ("params", "param_names")}


def named_from_one_device(sd: dict[str, Any], omap: OptimizerMap) -> dict[str, Any]:
    """One-device format -> named format (the same tensors).

    Raises:
        ValueError: the groups or their sizes differ from the user's optimizer (as torch says it).
    """
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError("optimizer.load_state_dict: expected an optimizer state_dict with 'state' and "
                         "'param_groups' (torch's format)")
    groups = sd["param_groups"]
    if len(groups) != len(omap.group_names):
        raise ValueError(f"optimizer.load_state_dict: the state dict has {len(groups)} parameter groups, the "
                         f"optimizer {len(omap.group_names)}")
    names_of: dict[Any, str] = {}
    out_groups = []
    for g, names in zip(groups, omap.group_names):
        if len(g["params"]) != len(names):
            raise ValueError("optimizer.load_state_dict: loaded state dict contains a parameter group that "
                             f"doesn't match the size of optimizer's group ({len(g['params'])} vs {len(names)})")
        names_of.update(zip(g["params"], names))
        out_groups.append({**_hyper(g), "params": list(names)})
    state = {names_of[i]: v for i, v in sd["state"].items() if i in names_of}
    return {"state": state, "param_groups": out_groups}


def one_device_from_named(named: dict[str, Any], omap: OptimizerMap) -> dict[str, Any]:
    """Named format -> one-device format (indices in the user's group order; params without state omitted)."""
    index = {n: i for i, n in enumerate(omap.index_names())}
    groups = [{**_hyper(g), "params": [index[n] for n in names]}
              for g, names in zip(named["param_groups"], omap.group_names)]
    state = {index[n]: named["state"][n] for n in omap.index_names() if n in named["state"]}
    return {"state": state, "param_groups": groups}


def full_value(param: torch.Tensor, value: Any) -> Any:
    """A state value as one device holds it: a DTensor shard gathered whole (a collective over its mesh)."""
    if is_dtensor(value):
        return value.full_tensor()
    return value


def shard_value(param: torch.Tensor, value: Any) -> Any:
    """A one-device state value laid like ``param``: a tensor of the parameter's full shape becomes this rank's
    shard when the parameter is a DTensor (no communication); scalars such as ``step`` stay as they are."""
    if not (isinstance(value, torch.Tensor) and is_dtensor(param)) or is_dtensor(value):
        return value
    if value.dim() == 0 or tuple(value.shape) != tuple(param.shape):
        return value
    from torch.distributed.tensor import distribute_tensor

    local = param.to_local()
    return distribute_tensor(value.to(device=local.device, dtype=value.dtype), param.device_mesh, param.placements,
                             src_data_rank=None)


def lay_named_state(optimizer: torch.optim.Optimizer, named: dict[str, Any], omap: OptimizerMap) -> None:
    """Load the named-format state (full tensors, or shards already laid like the parameters) into this rank's
    rebound optimizer: its hyper-parameters replace the groups', each held parameter gets its state, tied
    copies on several ranks the same. Uses the user's class's own ``load_state_dict`` (dtype/device policy)."""
    local_groups, state, index = [], {}, 0
    for g, names, saved in zip(optimizer.param_groups, omap.group_names, named["param_groups"]):
        mine = {id(model_param(p)) for p in g["params"]}  # an fp32 master (apex O2) counts as its parameter
        ids = []
        held = [n for n in names if n in omap.local and id(omap.local[n]) in mine]
        if len(held) != len(g["params"]):
            raise RuntimeError(f"optimizer state: the rebound group holds {len(g['params'])} parameters, "
                               f"{len(held)} are known by name")
        for n in _in_group_order(g["params"], held, omap):
            p = omap.local[n]
            if n in named["state"]:
                relay = omap.relays.get(n)
                state[index] = {k: shard_value(p, v if is_dtensor(v) or not isinstance(v, torch.Tensor)
                                               else to_tp_order(v, relay))
                                for k, v in named["state"][n].items()}
            ids.append(index)
            index += 1
        local_groups.append({**_hyper(saved), "params": ids})
    plain_class(optimizer).load_state_dict(optimizer, {"state": state, "param_groups": local_groups})


def _in_group_order(params: list[torch.Tensor], held: list[str], omap: OptimizerMap) -> list[str]:
    by_id = {id(omap.local[n]): n for n in held}
    return [by_id[id(model_param(p))] for p in params]


def local_named_state(optimizer: torch.optim.Optimizer, omap: OptimizerMap, *, full: bool) -> dict[str, Any]:
    """This rank's optimizer state in named format: whole tensors (``full``: DTensor shards gathered, a
    collective over each data-parallel group) or as held (shards stay DTensors)."""
    name_of = {id(p): n for n, p in omap.local.items()}
    state = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            st = optimizer.state.get(p)
            if st:
                n = name_of[id(model_param(p))]
                relay = omap.relays.get(n)
                state[n] = {k: (_one_device(full_value(p, v), relay) if full else v) for k, v in st.items()}
    groups = [{**_hyper(g), "params": list(names)} for g, names in zip(optimizer.param_groups, omap.group_names)]
    return {"state": state, "param_groups": groups}


def _one_device(value: Any, relay: Relay | None) -> Any:
    return from_tp_order(value, relay) if isinstance(value, torch.Tensor) else value


def skeleton(obj: Any) -> Any:
    """``obj`` with every tensor replaced by a meta tensor of its shape and dtype (the structure without data;
    an ``OrderedDict`` stays one)."""
    if isinstance(obj, torch.Tensor):
        return torch.empty(obj.shape, dtype=obj.dtype, device="meta")
    if isinstance(obj, dict):
        out = {k: skeleton(v) for k, v in obj.items()}
        return OrderedDict(out) if isinstance(obj, OrderedDict) else out
    if isinstance(obj, (list, tuple)):
        return type(obj)(skeleton(v) for v in obj)
    return obj
