# Self-launcher: a plain `python train.py` re-executes itself once per extra local rank and goes on as rank 0.
"""How ``MOREH_AP_NPROC=G python train.py`` (or G > 1 CUDA devices) becomes G ranks.

When advanced parallelization is enabled in a process that is not already a
rank (no ``RANK``/``WORLD_SIZE`` of torchrun nor ``MOREH_AP_RANK`` of ours, not
a DataLoader or multiprocessing worker, not an interactive interpreter), the
script is started again G-1 times with the same interpreter, flags and argv,
and the calling process continues as rank 0. The ranks meet through variables
of moreh_ap's own (``MOREH_AP_RANK``, ``MOREH_AP_WORLD_SIZE``,
``MOREH_AP_LOCAL_RANK``, ``MOREH_AP_LOCAL_WORLD_SIZE``, ``MOREH_AP_MASTER_ADDR``,
``MOREH_AP_MASTER_PORT``; see :mod:`moreh_ap.launch_env`), never torchrun's:
the script keeps seeing no ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``
and stays a single-device script (one that tests ``RANK`` to start its own DDP
does not). :func:`moreh_ap.runtime.init_distributed` brings the process group up
from them; :func:`moreh_ap.launch_rank` tells the script its rank. On G CUDA
devices rank r > 0 gets ``CUDA_VISIBLE_DEVICES`` = the r-th visible device.

The port cannot race: rank 0 binds a ``TCPStore`` server on port 0 (the OS
picks a free port) before any child starts and keeps it, as torchrun's agent
does; every rank, rank 0 included, then connects to it as a client. The store
is unauthenticated, so it listens on loopback only (127.0.0.1): rank 0 binds
that socket itself and hands it to the store (``master_listen_fd``; the
store's ``host`` argument does not choose the address it listens on).
Children are started and stopped with torch's own elastic process context
(``torch.distributed.elastic.multiprocessing.start_processes``). By default
(``MOREH_AP_RANK_OUTPUT=rank0``) only rank 0 writes to the console: the
children's stdout and stderr are redirected by that context (a ``LogsSpecs``)
to ``rank<r>.stdout.log`` / ``rank<r>.stderr.log`` in a directory of their own
under ``MOREH_AP_CACHE_DIR/logs/``, named in one log line at launch (the newest
20 are kept, and any whose launcher is still alive);
``MOREH_AP_RANK_OUTPUT=all`` keeps every rank on the console. If a child
fails, the others and rank 0 are stopped and the failing rank is named, with
its traceback (from its torch elastic error file, or the tail of its stderr
file; with ``all`` it is already on the console); if rank 0 fails, the
children are stopped; Ctrl-C or SIGTERM stops every rank at the same step
(:mod:`moreh_ap.signals`) and rank 0 waits for the children's own ``finally``.
The exit code is then non-zero. No child
outlives rank 0 (:mod:`moreh_ap.launch_watch`): rank 0, leaving, waits for its
children at most ``MOREH_AP_DIST_TIMEOUT`` + 30 s, then stops them; a child
whose rank 0 is gone (any exit, ``os._exit`` or a signal included) stops itself.

Code that runs before the launch point runs once per rank: every child
re-executes the script from its first line.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch.utils.data import get_worker_info

from moreh_ap import env as _env
from moreh_ap import signals as _signals
from moreh_ap.faults import known_failure
from moreh_ap.files import prune_log_dirs
from moreh_ap.launch_context import quiet_context, start_children
from moreh_ap.launch_env import rank_env, visible_devices
from moreh_ap.launch_report import only_interrupts, report
from moreh_ap.launch_watch import EXIT_GRACE_S, exit_wait_s, running_ranks, watch_launcher
from moreh_ap.log import logger
from moreh_ap.ranks import rank_variables_present

__all__ = ["LaunchDecision", "decide", "self_command", "maybe_launch", "loopback_store"]

_POLL_S = 0.2
_STOP_GRACE_S = 5


@dataclass(kw_only=True, slots=True, frozen=True)
class LaunchDecision:
    """Whether this process should start extra local ranks, and why (or why not)."""

    nproc: int
    """Local ranks wanted in all (1 = no launch)."""
    device: str
    """'cuda' when there is a CUDA device per rank, else 'cpu' (gloo)."""
    launch: bool
    """True: start ``nproc - 1`` children and continue as rank 0."""
    reason: str
    """Human-readable reason, logged when a wanted launch is skipped."""

    def to_dict(self) -> dict:
        return {"nproc": self.nproc, "device": self.device, "launch": self.launch, "reason": self.reason}


def _cuda_count() -> int:
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _interactive() -> bool:
    import __main__  # the current one (IPython replaces it): not bound at module import

    if hasattr(sys, "ps1") or sys.flags.interactive:
        return True
    ipykernel, ipython = _ipython_loaded()
    if ipykernel or ipython and getattr(__main__, "__file__", None) is None:
        return True
    spec = getattr(__main__, "__spec__", None)
    return getattr(__main__, "__file__", None) is None and (spec is None or not spec.name)


def _ipython_loaded() -> tuple[bool, bool]:
    """Whether ipykernel and IPython are loaded; asked of the interpreter's table of loaded modules, since
    importing them to ask would load them into every script."""
    loaded = sys.modules
    return "ipykernel" in loaded, "IPython" in loaded


def _in_worker() -> bool:
    if multiprocessing.parent_process() is not None:
        return True
    try:
        return get_worker_info() is not None
    except Exception:
        return False


def decide(environ=None, *, cuda_count: int | None = None) -> LaunchDecision:
    """Decide whether to self-launch (pure apart from reading the process state).

    Args:
        environ: the environment to read (default ``os.environ``).
        cuda_count: CUDA devices visible (default: asked from torch).
    """
    environ = os.environ if environ is None else environ
    settings = _env.read_env(environ)
    cuda = _cuda_count() if cuda_count is None else cuda_count
    nproc = settings.nproc if settings.nproc is not None else max(cuda, 1)
    device = "cuda" if cuda >= nproc and cuda > 0 else "cpu"

    def no(reason: str) -> LaunchDecision:
        return LaunchDecision(nproc=nproc, device=device, launch=False, reason=reason)

    if nproc <= 1:
        return no("one local rank")
    present = rank_variables_present(environ)
    if present:
        return no(f"already a rank ({', '.join(present)} set): torchrun or a launched rank")
    if _in_worker():
        return no("inside a DataLoader or multiprocessing worker")
    if _interactive():
        return no("interactive interpreter (REPL, notebook, python -c): run a script to get several ranks")
    return LaunchDecision(nproc=nproc, device=device, launch=True, reason=f"{nproc} local {device} ranks")


def self_command() -> list[str]:
    """The command that re-executes this script: same interpreter, flags and argv (``-m`` kept)."""
    import __main__  # the current one: not bound at module import

    flags = subprocess._args_from_interpreter_flags()
    spec = getattr(__main__, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        name = spec.name[: -len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        return [sys.executable, *flags, "-m", name, *sys.argv[1:]]
    path = getattr(__main__, "__file__", None) or sys.argv[0]
    return [sys.executable, *flags, os.path.abspath(path), *sys.argv[1:]]


def _log_dir(cache_dir) -> str:
    """A new directory for this launch's per-rank output: ``<cache>/logs/<date>-<time>-<pid>`` (a temporary one if
    the cache cannot be written)."""
    name = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    path = os.path.join(str(cache_dir), "logs", name)
    try:
        os.makedirs(path, exist_ok=True)
        prune_log_dirs(os.path.dirname(path), exclude=path)
        return path
    except OSError:
        import tempfile

        return tempfile.mkdtemp(prefix=f"moreh_ap_logs_{name}_")


def loopback_store(world: int, *, timeout_s: float = 300.0):
    """A rendezvous ``TCPStore`` server on a free port of 127.0.0.1 only.

    ``TCPStore(host, ...)`` as a server listens on every interface whatever ``host`` says; the socket is
    bound here and handed over with ``master_listen_fd`` (the store then owns and closes it).
    """
    from torch.distributed import TCPStore

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(max(world, 8))
    try:
        store = TCPStore("127.0.0.1", sock.getsockname()[1], world, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=timeout_s), master_listen_fd=sock.fileno(), use_libuv=True)
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store owns the descriptor now
    return store


class _Launch:
    """The children of rank 0, watched by a thread; stopped on any failure."""

    def __init__(self, decision: LaunchDecision) -> None:
        self.world = decision.nproc
        settings = _env.read_env()
        self.log_dir = _log_dir(settings.cache_dir) if settings.rank_output == "rank0" else None
        # torch's own excepthook swaps sys.stderr for a buffer while hooks run: report to the real stream
        self._stderr = sys.stderr
        self.store = loopback_store(self.world)
        self.port = self.store.port
        base = self._rank_env(0, decision)
        os.environ.update(base)
        self.context = self._start_children(decision)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="moreh_ap-launcher", daemon=True)
        self._watcher.start()
        self._previous_hook = sys.excepthook
        sys.excepthook = self._excepthook
        atexit.register(self._at_exit)

    def _rank_env(self, rank: int, decision: LaunchDecision) -> dict[str, str]:
        devices = None
        if decision.device == "cuda":
            devices = visible_devices(self.world, cuda_visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
                                      device_count=_cuda_count())
        return rank_env(rank, world=self.world, port=self.port, device=decision.device, devices=devices,
                        environ=os.environ, cpu_count=os.cpu_count() or 1)

    def _start_children(self, decision: LaunchDecision):
        command = self_command()
        children = range(1, self.world)
        envs = {r - 1: {**os.environ, **self._rank_env(r, decision)} for r in children}
        if "OMP_NUM_THREADS" in envs.get(0, {}):
            torch.set_num_threads(int(envs[0]["OMP_NUM_THREADS"]))
        return start_children(command, envs=envs, log_dir=self.log_dir)

    def _poll(self):
        with self._lock, quiet_context():
            return self.context.wait(timeout=0)

    def _children_failed(self) -> bool | None:
        """True when a child exited non-zero, False when all exited cleanly, None while any runs (the context
        is not polled: its poll stops every child at the first failure)."""
        codes = [handler.proc.poll() for handler in (getattr(self.context, "subprocess_handlers", {}) or {}).values()]
        if any(code not in (None, 0) for code in codes):
            return True
        return None if any(code is None for code in codes) else False

    def _watch(self) -> None:
        while not self._stopped.is_set():
            failed = self._children_failed()
            if failed is None:
                time.sleep(_POLL_S)
                continue
            if failed and _signals.agreed() is None:
                result = self._poll()
                if result is not None and result.is_failed():
                    self._report(result)
                    os._exit(1)  # the peers of a failed rank cannot finish: stop rank 0 too
            return  # all children finished cleanly, or they stop on an agreed Ctrl-C / SIGTERM (rank 0 waits)

    def _report(self, result) -> None:
        """Name the rank that failed first (the others were stopped because of it)."""
        report(result, world=self.world, log_dir=self.log_dir, stream=self._stderr)

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            self.context.close(timeout=_STOP_GRACE_S)

    def _excepthook(self, exc_type, exc, tb) -> None:
        self._previous_hook(exc_type, exc, tb)
        if _signals.agreed() is not None and issubclass(exc_type, KeyboardInterrupt):
            return  # every rank stops at the same step boundary: wait for the children's own finally (at exit)
        result = None
        deadline = time.monotonic() + 2.0  # a child that died first is the cause: let its exit be seen
        while result is None and time.monotonic() < deadline:
            time.sleep(_POLL_S)
            result = self._poll()
        if result is not None and result.is_failed():
            self._report(result)
        else:
            self._stderr.write(f"moreh_ap: rank 0 of {self.world} failed ({exc_type.__name__}); stopping the other ranks.\n")
        self.stop()

    def _at_exit(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._watcher.join(timeout=2 * _POLL_S + 1)
        if known_failure() is not None:  # rank 0's step failed and its script went on to exit: nobody can finish
            self._stderr.write(f"moreh_ap: rank 0 of {self.world} failed earlier ({known_failure().error}); "
                               "stopping the other ranks.\n")
            self.context.close(timeout=_STOP_GRACE_S)
            return
        bound = exit_wait_s()
        if _signals.agreed() is not None:  # let every child end its own finally before the context is polled
            deadline = time.monotonic() + bound
            while running_ranks(self.context) and time.monotonic() < deadline:
                time.sleep(_POLL_S)
        with self._lock, quiet_context():
            result = self.context.wait(timeout=bound, period=_POLL_S)
        if result is None:  # a child still runs (e.g. it hangs) long after rank 0 finished: stop it
            running = ", ".join(map(str, running_ranks(self.context))) or "?"
            self._stderr.write(f"moreh_ap: rank 0 of {self.world} finished, but rank(s) {running} did not finish "
                               f"within {bound:g} s (MOREH_AP_DIST_TIMEOUT + {EXIT_GRACE_S:g}); stopping them.\n")
            self._stderr.flush()
            self.context.close(timeout=_STOP_GRACE_S)
            os._exit(1)
        if result.is_failed() and _signals.agreed() is not None and only_interrupts(result):
            where = f" (the other ranks' output is in {self.log_dir})" if self.log_dir else ""
            self._stderr.write(f"moreh_ap: every rank of {self.world} stopped on "
                               f"{signal.Signals(_signals.agreed()).name} at the same step.{where}\n")
        elif result.is_failed():
            self._report(result)
            os._exit(1)


_launch: _Launch | None = None
_launch_lock = threading.Lock()
_warned: set[str] = set()


def _warn_once(decision: LaunchDecision) -> None:
    if _launch is None and decision.nproc > 1 and "already a rank" not in decision.reason:
        if decision.reason not in _warned:
            _warned.add(decision.reason)
            logger.warning(f"Not starting {decision.nproc} local ranks: {decision.reason}.")


def maybe_launch() -> LaunchDecision:
    """Start the extra local ranks if :func:`decide` says so (at most once per process)."""
    global _launch
    decision = decide()
    with _launch_lock:
        if _launch is not None or not decision.launch:
            watch_launcher()  # a self-launched rank > 0 ends when rank 0 is gone
            _warn_once(decision)
            return decision
        logger.info(f"Launching {decision.reason}: this process is rank 0.")
        _launch = _Launch(decision)
        if _launch.log_dir is not None:
            others = "rank 1" if decision.nproc == 2 else f"ranks 1-{decision.nproc - 1}"
            logger.info(f"Output of {others} goes to {_launch.log_dir} (rank<r>.stdout.log, "
                        f"rank<r>.stderr.log); MOREH_AP_RANK_OUTPUT=all shows every rank on the console.")
    return decision
