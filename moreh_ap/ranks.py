# This process's launch identity (rank, world, local rank/world, rendezvous address): one source of truth.
"""Who this process is in a launch, read from moreh_ap's own variables or torchrun's.

The self-launcher (:mod:`moreh_ap.launcher`) gives its ranks variables of its own
(``MOREH_AP_RANK``, ``MOREH_AP_WORLD_SIZE``, ``MOREH_AP_LOCAL_RANK``, ``MOREH_AP_LOCAL_WORLD_SIZE``,
``MOREH_AP_MASTER_ADDR``, ``MOREH_AP_MASTER_PORT``) and never torchrun's (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): a single-device script that
tests ``RANK`` (nanoGPT) or whose libraries read ``LOCAL_RANK`` (the Hugging Face Trainer, accelerate)
keeps behaving as one process. Under torchrun its variables are read. Everything in moreh_ap that
needs this process's rank asks this module.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DEVICE_ENV", "DEVICE_CHOICES", "device_for_rank", "OWN_VARIABLES", "TORCHRUN_VARIABLES", "LAUNCHED_MARK", "LaunchIdentity", "identity", "launch_rank",
           "local_rank", "world_sizes", "rank_variables_present"]

OWN_VARIABLES = {
    "rank": "MOREH_AP_RANK", "world_size": "MOREH_AP_WORLD_SIZE", "local_rank": "MOREH_AP_LOCAL_RANK",
    "local_world_size": "MOREH_AP_LOCAL_WORLD_SIZE", "master_addr": "MOREH_AP_MASTER_ADDR",
    "master_port": "MOREH_AP_MASTER_PORT",
}
"""The self-launcher's variables, by identity field."""
TORCHRUN_VARIABLES = {
    "rank": "RANK", "world_size": "WORLD_SIZE", "local_rank": "LOCAL_RANK", "local_world_size": "LOCAL_WORLD_SIZE",
    "master_addr": "MASTER_ADDR", "master_port": "MASTER_PORT",
}
"""torchrun's (and every env:// launcher's) variables, by identity field."""
LAUNCHED_MARK = "MOREH_AP_LAUNCHED"
"""Set to 1 in every rank the self-launcher made (rank 0 included)."""
_TORCHRUN_MARKS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "GROUP_RANK")
_OWN_MARKS = ("MOREH_AP_RANK", "MOREH_AP_WORLD_SIZE", "MOREH_AP_LOCAL_RANK", LAUNCHED_MARK)


@dataclass(kw_only=True, slots=True, frozen=True)
class LaunchIdentity:
    """This process's place in a launch, as its launcher's variables give it."""

    rank: int
    """Global rank."""
    world_size: int
    """Ranks in all."""
    local_rank: int
    """Rank on this machine (the global rank when the launcher does not say)."""
    local_world_size: int
    """Ranks on this machine (the world size when the launcher does not say)."""
    master_addr: str | None
    """Rendezvous host (None: not given)."""
    master_port: int | None
    """Rendezvous port (None: not given)."""
    source: str
    """'moreh_ap' (the self-launcher's variables) or 'torchrun' (``RANK``/``WORLD_SIZE``...)."""


def _read(environ: Mapping[str, str], names: dict[str, str], source: str) -> LaunchIdentity | None:
    raw_rank, raw_world = environ.get(names["rank"], "").strip(), environ.get(names["world_size"], "").strip()
    if not raw_rank or not raw_world:
        return None
    try:
        rank, world = int(raw_rank), int(raw_world)
        local = int(environ.get(names["local_rank"], "").strip() or rank)
        local_world = int(environ.get(names["local_world_size"], "").strip() or world)
        port = environ.get(names["master_port"], "").strip()
        port = int(port) if port else None
    except ValueError as exc:
        raise ValueError(f"{source} launch variables do not parse ({', '.join(names.values())}): {exc}") from None
    if not 0 <= rank < world:
        raise ValueError(f"{names['rank']}={rank} is not valid with {names['world_size']}={world}: "
                         "expected 0 <= rank < world size")
    addr = environ.get(names["master_addr"], "").strip() or None
    return LaunchIdentity(rank=rank, world_size=world, local_rank=local, local_world_size=local_world,
                          master_addr=addr, master_port=port, source=source)


def identity(environ: Mapping[str, str] | None = None) -> LaunchIdentity | None:
    """This process's launch identity: the self-launcher's variables, else torchrun's, else None.

    Args:
        environ: the environment to read (default ``os.environ``).

    Raises:
        ValueError: a rank or world size variable is set but is not an integer, or the rank is out of range.
    """
    environ = os.environ if environ is None else environ
    return _read(environ, OWN_VARIABLES, "moreh_ap") or _read(environ, TORCHRUN_VARIABLES, "torchrun")


def launch_rank() -> int:
    """This process's rank in the launch.

    The self-launcher's ``MOREH_AP_RANK``, else torchrun's ``RANK``, else the rank in the initialized
    default process group, else 0. For code that must know it, e.g. to write a file on one rank only::

        if moreh_ap.launch_rank() == 0:
            torch.save(model.state_dict(), "model.pt")
    """
    try:
        found = identity()
    except ValueError:
        found = None
    if found is not None:
        return found.rank
    try:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:
        pass
    return 0


def local_rank() -> int:
    """This process's rank on its machine (as :func:`launch_rank`, with the local variables; 0 when none)."""
    try:
        found = identity()
    except ValueError:
        found = None
    return 0 if found is None else found.local_rank


def world_sizes(environ: Mapping[str, str] | None = None) -> tuple[int | None, int | None]:
    """``(world size, local world size)`` the launch's variables give (the self-launcher's, else torchrun's;
    each None when unset or not an integer), read even without a rank variable (e.g. for planning)."""
    environ = os.environ if environ is None else environ
    for names in (OWN_VARIABLES, TORCHRUN_VARIABLES):
        raw = [environ.get(names[key], "").strip() for key in ("world_size", "local_world_size")]
        if any(raw):
            world, local = (int(value) if value.isdigit() else None for value in raw)
            return world, local
    return None, None


def rank_variables_present(environ: Mapping[str, str] | None = None) -> list[str]:
    """The variables that say this process is already a rank of some launch (ours or torchrun's), set in
    ``environ`` (default ``os.environ``)."""
    environ = os.environ if environ is None else environ
    return [name for name in (*_TORCHRUN_MARKS, *_OWN_MARKS) if environ.get(name)]


DEVICE_ENV = "MOREH_AP_DEVICE"
"""This rank's device kind: "cpu" or "cuda" (set by the self-launcher in the ranks it starts); unset = auto."""
DEVICE_CHOICES = ("cpu", "cuda")


def device_for_rank() -> torch.device:
    """This rank's device: ``MOREH_AP_DEVICE`` when set, else ``cuda:<local rank>`` when CUDA is available, else ``cpu``.

    ``MOREH_AP_DEVICE=cpu`` keeps the rank on CPU on a CUDA machine (e.g. several gloo ranks on a one-GPU
    machine); ``cuda`` requires CUDA. On CUDA the device index is the local rank (:func:`local_rank`:
    the self-launcher's ``MOREH_AP_LOCAL_RANK`` or torchrun's ``LOCAL_RANK``) modulo the visible devices; a
    self-launched rank sees one device (its ``CUDA_VISIBLE_DEVICES``), rank 0 uses the first it sees.

    Raises:
        ValueError: ``MOREH_AP_DEVICE`` is not one of "cpu", "cuda", or is "cuda" without a CUDA device.
    """
    kind = os.environ.get(DEVICE_ENV, "").strip().lower()
    if kind and kind not in DEVICE_CHOICES:
        raise ValueError(f"{DEVICE_ENV}={os.environ[DEVICE_ENV]!r} is not valid: expected one of {DEVICE_CHOICES} "
                         "or unset (auto)")
    if kind == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    if kind == "cuda":
        raise ValueError(f"{DEVICE_ENV}=cuda but no CUDA device is available: set it to 'cpu' or unset it")
    return torch.device("cpu")
