# Process group, sub-groups and weight transfers between ranks for the runtime.
"""Bring up torch.distributed from this process's launch identity (moreh_ap's own variables or torchrun's);
world size, rank and device of this process; cached sub-groups; rank 0's weights to other ranks. The device mesh is ``ParallelLayout.build_mesh``."""
from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from moreh_ap.ranks import DEVICE_ENV, OWN_VARIABLES, device_for_rank, identity

__all__ = ["DEVICE_ENV", "init_distributed", "created_by_ap", "world_size", "rank", "device_for_rank", "subgroup",
           "broadcast_from_rank0",
           "module_tensors", "send_tensors", "recv_tensors", "BUCKET_BYTES", "destroy_at_exit"]

BUCKET_BYTES = 64 * 1024 * 1024
"""Size of one message when weights are copied between ranks (DDP's broadcast bucket)."""


def world_size() -> int:
    """Ranks in the default group (1 when torch.distributed is not initialized)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 when torch.distributed is not initialized)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


_ap_group = None
"""The default process group :func:`init_distributed` created (None until it does)."""


def created_by_ap() -> bool:
    """Whether the current default process group is the one :func:`init_distributed` created (False when
    there is none, or the script created its own)."""
    return dist.is_available() and dist.is_initialized() and _ap_group is not None and _ap_group is dist.group.WORLD


def init_distributed(*, backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Initialize the default process group from this process's launch identity (:mod:`moreh_ap.ranks`).

    Self-launched ranks (``MOREH_AP_RANK``, ``MOREH_AP_WORLD_SIZE``, ``MOREH_AP_MASTER_ADDR``,
    ``MOREH_AP_MASTER_PORT``) connect to the launcher's rendezvous store and pass it to
    ``init_process_group``; under torchrun (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``)
    ``env://`` initialization is used. nccl on CUDA, gloo on CPU, with a bounded timeout
    (``MOREH_AP_DIST_TIMEOUT`` seconds, default 60) so that a dead peer surfaces as an error instead of a
    30-minute hang. Idempotent.

    Args:
        backend: override the backend ("gloo", "nccl").
        timeout_s: collective timeout in seconds.

    Returns:
        True when a process group is up (also if it already was), False for a single process without
        launch variables.
    """
    global _ap_group
    if dist.is_initialized():
        return True
    found = identity()
    if found is None:
        return False
    if timeout_s is None:
        from moreh_ap.env import read_env

        timeout_s = read_env().dist_timeout_s
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s!r} is not valid: expected a number of seconds > 0")
    dev = device_for_rank()
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    addr = found.master_addr or "127.0.0.1"
    if backend == "gloo" and not os.environ.get("GLOO_SOCKET_IFNAME") and addr in ("127.0.0.1", "localhost"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    timeout = timedelta(seconds=timeout_s)
    if found.source == "moreh_ap":
        if found.master_port is None:
            raise ValueError(f"{OWN_VARIABLES['master_port']} is not set: a self-launched rank needs the "
                             "launcher's rendezvous port")
        store = dist.TCPStore(addr, found.master_port, found.world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend=backend, store=store, timeout=timeout, rank=found.rank,
                                world_size=found.world_size)
    else:
        os.environ.setdefault("MASTER_ADDR", addr)
        dist.init_process_group(backend=backend, timeout=timeout, rank=found.rank, world_size=found.world_size)
    _ap_group = dist.group.WORLD
    atexit.register(destroy_at_exit)
    return True


def destroy_at_exit() -> None:
    """Destroy the process group :func:`init_distributed` created, while the interpreter is still whole
    (registered with :mod:`atexit` when it is created; the script, written for one device, never does).

    A gloo process group left to interpreter finalization can abort the process (its worker threads
    release tensors after Python is gone: ``terminate called without an active exception``, exit code -6,
    seen on a rank that had finished its work), and NCCL warns that the group was never destroyed. Nothing is
    done when the script destroyed the group itself or replaced it, or when a step of this run failed (a
    peer may still wait in a collective this rank left; gloo cannot abort it: the launcher ends the ranks).
    """
    from moreh_ap.faults import known_failure

    if created_by_ap() and known_failure() is None:
        device = device_for_rank()
        if device.type == "cuda":  # collectives still queued on this rank finish first (destroy aborts NCCL's)
            torch.cuda.synchronize(device)
        dist.destroy_process_group()


_GROUPS: dict = {}
"""Process groups made by :func:`subgroup`, by (default group, ranks)."""


def subgroup(ranks: list[int]):
    """``dist.new_group(ranks)`` (a collective over all ranks), cached per default group and rank list."""
    key = (id(dist.group.WORLD), tuple(ranks))
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(list(ranks))
    return _GROUPS[key]


@torch.no_grad()
def broadcast_from_rank0(module: nn.Module) -> None:
    """Copy global rank 0's parameters and buffers to every rank (as DDP does at construction)."""
    if world_size() == 1:
        return
    tensors = [p.data for p in module.parameters()] + [b for b in module.buffers()]
    # torch's coalesced broadcast (the one DDP uses), in 64 MiB buckets
    dist._broadcast_coalesced(dist.group.WORLD, tensors, BUCKET_BYTES, 0)


def module_tensors(modules: list[nn.Module]) -> list[torch.Tensor]:
    """Parameters, then buffers, of ``modules`` in registration order, each tensor once.

    Two ranks that build the same modules get the same list (the order a weight transfer relies on).
    """
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    for kind in ("parameters", "buffers"):
        for m in modules:
            for t in getattr(m, kind)():
                if id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
    return out


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of tensors of one dtype, each run at most ``bucket_bytes`` (or one larger tensor)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if not out or out[-1][0].dtype != t.dtype or size + nbytes > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append(t)
        size += nbytes
    return out


@torch.no_grad()
def send_tensors(tensors: list[torch.Tensor], *, dst: int, device: torch.device,
                 bucket_bytes: int = BUCKET_BYTES) -> None:
    """Send ``tensors`` (anywhere: CPU or ``device``) to global rank ``dst``, one flat bucket at a time.

    Each bucket is copied to ``device`` only while it is sent (NCCL sends device memory), so the
    sender's peak extra memory is one bucket; the tensors themselves stay where they are.
    """
    for bucket in _buckets(tensors, bucket_bytes):
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in bucket])
        dist.send(flat, dst=dst)


@torch.no_grad()
def recv_tensors(tensors: list[torch.Tensor], *, src: int, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Receive into ``tensors`` (in place, on their own device) what :func:`send_tensors` sent from ``src``."""
    for bucket in _buckets(tensors, bucket_bytes):
        flat = torch.empty(sum(t.numel() for t in bucket), dtype=bucket[0].dtype, device=bucket[0].device)
        dist.recv(flat, src=src)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
