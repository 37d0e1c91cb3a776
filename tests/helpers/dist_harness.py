# Multi-rank harness: launch N gloo CPU ranks that run many runtime cases in one start-up, collect results.
"""``launch(world, cases)`` starts ``world`` processes of this file (RANK/WORLD_SIZE env, a free port,
GLOO_SOCKET_IFNAME=lo, OMP_NUM_THREADS=1, bounded timeouts, MOREH_AP_DEVICE=cpu: CPU ranks even on a
CUDA machine), each running every case through ``moreh_ap.parallelize``; rank 0 writes the results. A
rank that fails takes the launch down at once (the runtime exits on error) and the launch returns every
rank's output for the report.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LaunchResult:
    returncodes: list[int]
    output: str
    results: dict | None
    seconds: float
    done: dict = field(default_factory=dict)
    """Rank 0's results of the cases that finished before a rank failed (when ``results`` is None)."""


class _Unfinished(dict):
    """The finished cases of a failed shared launch: a test of another case fails with the ranks' output."""

    def __init__(self, done: dict, message: str) -> None:
        super().__init__(done)
        self.message = message

    def __missing__(self, key):
        import pytest

        pytest.fail(f"case {key!r} did not finish: {self.message}")


_SHARED: dict = {}  # (group, world) -> LaunchResult: one launch per group and world size
_GROUPS: dict = {}  # group -> the cases test modules registered for it (several files can share a group)


def register(group: str, cases: list[dict]) -> None:
    """Add ``cases`` to ``group``'s shared launches; call at a test module's import. pytest imports every
    collected module before it runs a test, so the first launch of a world holds the cases of every collected
    module that registered for the group (one start-up of the ranks instead of one per file). Cases with
    ``"last": True`` run after the others of their launch (a case whose error ends the runner's state)."""
    have = {c["id"] for c in _GROUPS.setdefault(group, [])}
    again = [c["id"] for c in cases if c["id"] in have]
    if again:
        raise ValueError(f"case ids registered twice in group {group!r}: {again}")
    _GROUPS[group].extend(cases)


def registered(group: str) -> list[dict]:
    """The cases registered for ``group`` so far (the registry's own dicts, in registration order)."""
    return _GROUPS.get(group, [])


def shared_launch(group: str, world: int, cases: list[dict] | None = None, *, timeout: float = 600.0) -> LaunchResult:
    """The one launch of ``group`` on ``world`` ranks: its cases whose ``"world"`` is ``world`` (``cases``, else
    those registered with :func:`register`), started at the first call and shared by every later one;
    when a rank failed, ``results`` holds the cases that finished before (their tests still check them) and
    reading any other case fails its test with the ranks' output."""

    key = (group, world)
    if key not in _SHARED:
        pool = _GROUPS.get(group, []) if cases is None else cases
        mine = sorted((c for c in pool if c["world"] == world), key=lambda c: bool(c.get("last")))
        if not mine:
            raise ValueError(f"no case of group {group!r} has world {world}")
        _SHARED[key] = launch(world, mine, timeout=max(timeout, 60 + 15 * len(mine)))
        print(f"{group} launch world={world}: {len(mine)} cases in {_SHARED[key].seconds:.1f}s")
    res = _SHARED[key]
    if res.results is None:
        message = f"launch {group} world={world} failed (rc={res.returncodes}):\n{res.output[-8000:]}"
        return replace(res, results=_Unfinished(res.done, message))
    return res


def shared_results(group: str, world: int, cases: list[dict] | None = None, *, timeout: float = 600.0) -> dict:
    """Rank 0's results of :func:`shared_launch` (keyed by case id)."""
    return shared_launch(group, world, cases, timeout=timeout).results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, cases: list[dict], *, timeout: float = 240.0, env: dict | None = None) -> LaunchResult:
    """Run ``cases`` on ``world`` ranks; results (rank 0's) keyed by case id, or None if a rank failed."""
    import torch

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(cases, os.path.join(tmp, "cases.pt"))
        port = free_port()
        procs, logs = [], []
        for r in range(world):
            e = {k: v for k, v in os.environ.items() if not k.startswith("MOREH_")}
            e.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
                     MOREH_AP_DIST_TIMEOUT="60", MOREH_AP_DEVICE="cpu", PYTHONPATH=str(ROOT) + os.pathsep + e.get("PYTHONPATH", ""))
            e.update(env or {})
            log = open(os.path.join(tmp, f"rank{r}.log"), "w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, __file__, tmp], env=e, cwd=str(ROOT),
                                          stdout=log, stderr=subprocess.STDOUT))
        deadline = t0 + timeout
        while time.time() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):  # one failed: peers get 10 s to notice, then are killed
                grace = time.time() + 10
                while time.time() < min(grace, deadline) and any(p.poll() is None for p in procs):
                    time.sleep(0.1)
                break
            time.sleep(0.05)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        out = []
        for r, log in enumerate(logs):
            log.seek(0)
            out.append(f"----- rank {r} (rc={procs[r].returncode}) -----\n{log.read()}")
            log.close()
        path = os.path.join(tmp, "results.pt")
        results = torch.load(path, weights_only=False) if os.path.exists(path) else None
        done = {} if results is not None else {  # a rank failed: the cases rank 0 finished before
            c["id"]: torch.load(os.path.join(tmp, f"done{i}.pt"), weights_only=False)
            for i, c in enumerate(cases) if os.path.exists(os.path.join(tmp, f"done{i}.pt"))}
        return LaunchResult([p.returncode for p in procs], "\n".join(out), results, time.time() - t0, done)


def _worker(tmp: str) -> None:
    import torch

    torch.set_num_threads(1)
    import moreh_ap
    from tests.helpers.runtime_cases import parallel_run

    moreh_ap.runtime.init_distributed()
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    cases = torch.load(os.path.join(tmp, "cases.pt"), weights_only=False)
    results = {}
    for i, case in enumerate(cases):
        t = time.time()
        try:
            res = _runner(case, parallel_run)(case, world, rank)
        except BaseException:
            sys.stderr.write(f"[rank {rank}] case {case['id']} failed:\n{traceback.format_exc()}")
            sys.stderr.flush()
            os._exit(1)
        res["seconds"] = time.time() - t
        results[case["id"]] = res
        if rank == 0:  # kept if a later case fails
            torch.save(res, os.path.join(tmp, f"done{i}.pt"))
    if rank == 0:
        torch.save(results, os.path.join(tmp, "results.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _runner(case: dict, default):
    """The case's ``runner`` ("package.module:function", e.g. ``tests.helpers.pipeline_memory_cases:memory_run``), else ``runtime_cases.parallel_run``."""
    if not case.get("runner"):
        return default
    import importlib

    mod, fn = case["runner"].split(":")
    return getattr(importlib.import_module(mod), fn)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(sys.argv[1])
