# The environment of each self-launched rank: moreh_ap's own rank variables and its CUDA device, nothing of torchrun's.
"""What the self-launcher (:mod:`moreh_ap.launcher`) adds to each rank's environment.

Only variables of moreh_ap's own (:data:`moreh_ap.ranks.OWN_VARIABLES`, ``MOREH_AP_LAUNCHED``,
``MOREH_AP_DEVICE``), plus ``GLOO_SOCKET_IFNAME=lo`` and ``OMP_NUM_THREADS`` for CPU ranks when the
user set neither, and, for CUDA ranks 1..G-1, ``CUDA_VISIBLE_DEVICES`` naming the one device of that
rank. None of torchrun's (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``, ``GROUP_RANK``, ``TORCHELASTIC_*``): the user's script stays a
single-device script that does not start distributing itself.
"""
from __future__ import annotations

from collections.abc import Mapping

from moreh_ap.ranks import LAUNCHED_MARK, OWN_VARIABLES

__all__ = ["LOOPBACK", "visible_devices", "rank_env"]

LOOPBACK = "127.0.0.1"
"""The self-launcher's rendezvous host: its ranks are on this machine."""


def visible_devices(nproc: int, *, cuda_visible: str | None, device_count: int) -> list[str] | None:
    """The CUDA device each of ``nproc`` local ranks gets: rank r the r-th visible device.

    Args:
        nproc: local ranks.
        cuda_visible: the user's ``CUDA_VISIBLE_DEVICES`` (None: unset, every device is visible).
        device_count: the CUDA devices this process sees (``torch.cuda.device_count()``).

    Returns:
        ``nproc`` entries for ``CUDA_VISIBLE_DEVICES`` (indices or the user's own entries, e.g. ``"3,5"``
        gives ``["3", "5"]``), or None when fewer devices than ranks are visible (the ranks run on CPU).
    """
    if nproc < 1:
        raise ValueError(f"nproc={nproc!r} is not valid: expected an integer >= 1")
    if cuda_visible is None:
        entries = [str(i) for i in range(device_count)]
    else:
        # CUDA's own rule: the list ends at its first empty entry; torch counted the devices it names
        entries = []
        for item in cuda_visible.split(","):
            if not item.strip():
                break
            entries.append(item.strip())
        entries = entries[:device_count]
    return entries[:nproc] if len(entries) >= nproc else None


def rank_env(rank: int, *, world: int, port: int, device: str, devices: list[str] | None,
             environ: Mapping[str, str], cpu_count: int) -> dict[str, str]:
    """The variables the self-launcher sets for local rank ``rank`` of ``world`` (one machine).

    Args:
        rank: this rank (0 is the launching process itself).
        world: ranks in all.
        port: the rendezvous store's port on 127.0.0.1.
        device: 'cuda' or 'cpu' (the launch decision).
        devices: :func:`visible_devices` for CUDA ranks (rank r > 0 gets ``CUDA_VISIBLE_DEVICES=devices[r]``;
            rank 0 keeps what it sees, its device is the first of them), or None.
        environ: the launching process's environment (the user's own settings are kept).
        cpu_count: CPU cores, shared among CPU ranks for ``OMP_NUM_THREADS``.
    """
    values = {"rank": rank, "world_size": world, "local_rank": rank, "local_world_size": world,
              "master_addr": LOOPBACK, "master_port": port}
    env = {OWN_VARIABLES[key]: str(value) for key, value in values.items()}
    env[LAUNCHED_MARK] = "1"
    env["MOREH_AP_DEVICE"] = device
    if device == "cuda" and devices is not None and rank > 0:
        env["CUDA_VISIBLE_DEVICES"] = devices[rank]
    if device == "cpu" and not environ.get("GLOO_SOCKET_IFNAME"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # ranks talk over loopback only
    if device == "cpu" and not environ.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(max(1, cpu_count // world))
    return env
