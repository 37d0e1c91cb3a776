# Cluster: the machines a plan is made for (sizes, speeds, links), presets and detection.
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from moreh_ap.env import NPROC
from moreh_ap.planner.calibration import load_or_measure
from moreh_ap.ranks import device_for_rank, world_sizes

GiB = 1024**3

# name -> (device_memory bytes, {dtype: peak FLOP/s}, mem bandwidth, intra-node, inter-node bytes/s per device)
_PRESETS: dict[str, tuple[int, dict[str, float], float, float, float]] = {
    "a100-40gb": (40 * GiB, {"bf16": 312e12, "fp32": 19.5e12}, 1.555e12, 300e9, 25e9),
    "a100-80gb": (80 * GiB, {"bf16": 312e12, "fp32": 19.5e12}, 2.039e12, 300e9, 25e9),
    "h100-80gb": (80 * GiB, {"bf16": 989e12, "fp32": 67e12}, 3.35e12, 450e9, 50e9),
    "h200": (141 * 10**9, {"bf16": 989e12, "fp32": 67e12}, 4.8e12, 450e9, 50e9),
    # the seed's device (MoAI "64GB" virtual device): 68,702,699,520 bytes available
    "moreh-64gb": (68_702_699_520, {"bf16": 181e12, "fp32": 45e12}, 1.6e12, 100e9, 25e9),
    # this kind of CI machine (2 cores): measured speeds, see spec/torch-platform-facts.md
    "cpu": (0, {"bf16": 0.4e12, "fp32": 0.1e12}, 10e9, 2e9, 1e9),
}
PRESETS = tuple(_PRESETS)

# name -> {dtype: (forward, backward) FLOP/s of the flash attention kernel torch's SDPA runs}, counted as the kernel
# computes them (causal: half the square; backward: 2.5 x the forward's FLOPs, its five products to the forward's
# two). Hopper (H100 SXM and H200: the same SMs and clocks, attention is compute-bound): FlashAttention-2 at
# head dim 128, sequence 2k, bf16 on an H100 SXM5 (Shah et al. 2024, "FlashAttention-3", arXiv:2407.08608,
# Figs. 5-6: forward causal 298 TFLOP/s, backward 291) x 0.81, torch's SDPA flash kernel over FlashAttention-2
# forward at that shape (293 / 362 TFLOP/s: pytorch/benchmark PR 2296 on an H100, and the same figure).
_HOPPER_ATTENTION = {"bf16": (298e12 * 0.81, 291e12 * 0.81)}
_ATTENTION: dict[str, dict[str, tuple[float, float]]] = {"h100-80gb": _HOPPER_ATTENTION, "h200": _HOPPER_ATTENTION}


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * GiB


@dataclass(kw_only=True, slots=True)
class Cluster:
    """The devices a plan is made for. Bytes, FLOP/s and bytes/s.

    ``peak_flops`` is a dict per compute dtype ("bf16", "fp32"). Without a
    calibration DB the cost model takes ``peak_flops * compute_efficiency``
    as the sustained matmul rate and the bandwidths times ``comm_efficiency``
    for the links.
    """

    nodes: int
    """Number of nodes (machines)."""
    devices_per_node: int
    """Devices (ranks) per node."""
    device_memory: int
    """Bytes of memory per device."""
    peak_flops: dict[str, float]
    """Peak matmul FLOP/s per dtype, e.g. {"bf16": 989e12, "fp32": 67e12}."""
    mem_bandwidth: float
    """Device memory bandwidth in bytes/s (memory-bound work: the optimizer step)."""
    intra_node_bandwidth: float
    """Per-device bytes/s between devices of one node."""
    inter_node_bandwidth: float
    """Per-device bytes/s between nodes."""
    name: str = "custom"
    """Preset or detected device name."""
    device_type: str = "cuda"
    """"cuda" or "cpu"."""
    compute_efficiency: float = 0.5
    """Fraction of peak FLOP/s a training step sustains (used without a calibration DB)."""
    comm_efficiency: float = 0.7
    """Fraction of link bandwidth collectives reach (used without a calibration DB)."""
    link_latency: float = 10e-6
    """Seconds per hop of a collective (ring algorithm)."""
    attention_flops: dict[str, tuple[float, float]] = field(default_factory=dict)
    """dtype -> (forward, backward) FLOP/s of the fused (flash) attention kernel, counted as the kernel computes
    them (a causal call: half the square); the device preset's published rates. Empty = attention at the GEMM
    rate."""
    calibration: Any = field(default=None, repr=False)
    """A :class:`moreh_ap.planner.calibration_db.CalibrationDB`, or None."""

    def __post_init__(self) -> None:
        for name in ("nodes", "devices_per_node"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Cluster.{name}={v!r} is not valid: expected an integer >= 1")
        for name in ("device_memory", "mem_bandwidth", "intra_node_bandwidth", "inter_node_bandwidth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"Cluster.{name}={v!r} is not valid: expected a number > 0")
        if not isinstance(self.peak_flops, dict) or not self.peak_flops:
            raise TypeError(f"Cluster.peak_flops={self.peak_flops!r} is not valid: expected a dict like {{'bf16': 1e15, 'fp32': 6e13}}")
        for k, v in self.peak_flops.items():
            if k not in ("bf16", "fp32") or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"Cluster.peak_flops[{k!r}]={v!r} is not valid: keys 'bf16'/'fp32', values > 0")
        for k, v in self.attention_flops.items():
            if k not in ("bf16", "fp32") or not (isinstance(v, tuple) and len(v) == 2 and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v)):
                raise ValueError(f"Cluster.attention_flops[{k!r}]={v!r} is not valid: keys 'bf16'/'fp32', values "
                                 "(forward, backward) FLOP/s > 0")

    @property
    def world_size(self) -> int:
        """Total devices: ``nodes * devices_per_node``."""
        return self.nodes * self.devices_per_node

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s for "bf16" or "fp32" (falls back to the other key when one is missing)."""
        return self.peak_flops.get(dtype) or next(iter(self.peak_flops.values()))

    @classmethod
    def preset(cls, name: str, *, nodes: int = 1, devices_per_node: int = 1) -> Cluster:
        """A known device type.

        Args:
            name: one of ``a100-40gb``, ``a100-80gb``, ``h100-80gb``, ``h200``, ``moreh-64gb``, ``cpu``.
            nodes: number of nodes.
            devices_per_node: devices per node.

        Raises:
            ValueError: unknown name (the message lists the presets).
        """
        key = str(name).lower()
        if key not in _PRESETS:
            raise ValueError(f"Cluster.preset(name={name!r}) is not valid: expected one of {', '.join(PRESETS)}")
        mem, flops, bw, intra, inter = _PRESETS[key]
        extra: dict[str, Any] = {}
        if key == "cpu":
            mem = max(1, _host_memory() // max(1, devices_per_node))
            extra = {"device_type": "cpu", "compute_efficiency": 1.0, "comm_efficiency": 1.0, "link_latency": 100e-6}
        return cls(
            nodes=nodes,
            devices_per_node=devices_per_node,
            device_memory=mem,
            peak_flops=dict(flops),
            mem_bandwidth=bw,
            intra_node_bandwidth=intra,
            inter_node_bandwidth=inter,
            name=key,
            attention_flops=dict(_ATTENTION.get(key, {})),
            **extra,
        )

    @classmethod
    def detect(cls, *, calibrate: bool = False) -> Cluster:
        """The cluster this process runs in.

        World size comes from the process group when one is up, else from the
        launch (:func:`moreh_ap.ranks.world_sizes`: the self-launcher's variables or
        torchrun's ``WORLD_SIZE``) or ``MOREH_AP_NPROC``; devices per node from the
        launch's local world size, ``MOREH_AP_NPROC`` or the CUDA device count. On CUDA (this rank's
        device, :func:`moreh_ap.ranks.device_for_rank`: ``MOREH_AP_DEVICE=cpu`` keeps a CUDA machine's ranks on
        CPU) the device is matched to a preset by name and its real memory is used; else the ``cpu``
        preset. With ``calibrate=True`` the calibration DB is loaded from the cache (or measured once) and
        attached.
        """
        device = device_for_rank()  # MOREH_AP_DEVICE=cpu plans CPU ranks on a CUDA machine
        world, local = _detect_world(cuda=device.type == "cuda")
        nodes = max(1, world // local) if world % local == 0 else 1
        local = local if world % local == 0 else world
        if device.type == "cuda":
            import torch

            props = torch.cuda.get_device_properties(device)
            cluster = cls.preset(_match_cuda(props.name, props.total_memory), nodes=nodes, devices_per_node=local)
            cluster.device_memory = int(props.total_memory)
            cluster.name = props.name
        else:
            cluster = cls.preset("cpu", nodes=nodes, devices_per_node=local)
        if calibrate:
            cluster.calibration = load_or_measure(cluster)
        return cluster

    def with_(self, **changes: Any) -> Cluster:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["calibration"] = None if self.calibration is None else self.calibration.source
        return d


def _match_cuda(name: str, total: int) -> str:
    n = name.lower()
    if "h200" in n:
        return "h200"
    if "h100" in n or "h800" in n:
        return "h100-80gb"
    if "a100" in n or "a800" in n:
        return "a100-80gb" if total > 50 * GiB else "a100-40gb"
    return "h100-80gb"


def _detect_world(*, cuda: bool) -> tuple[int, int]:
    world = local = None
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
    except Exception:
        pass
    launch_world, launch_local = world_sizes()
    nproc = os.environ.get(NPROC, "").strip()
    nproc = int(nproc) if nproc.isdigit() else None
    if world is None:
        world = launch_world or nproc
    local = launch_local or nproc
    if local is None and cuda:
        try:
            import torch

            local = torch.cuda.device_count() or None
        except Exception:
            local = None
    world = world or local or 1
    local = min(local or world, world)
    return world, local
