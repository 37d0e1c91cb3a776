# No self-launched rank outlives rank 0: a hanging child is stopped when rank 0 leaves, and a child whose rank 0
# vanished (os._exit, no atexit) stops itself.
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers.env import clean_subprocess_env
from tests.helpers.paths import REPO_ROOT

pytestmark = pytest.mark.multirank

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    torch.moreh.option.enable_advanced_parallelization()
    import moreh_ap
    import torch.distributed as dist
    moreh_ap.runtime.init_distributed(timeout_s=60)
    dist.barrier()
    rank = moreh_ap.launch_rank()
    with open(f"pid{rank}", "w") as f:
        f.write(str(os.getpid()))
    dist.destroy_process_group()
    if rank == 1:
        while True:  # hangs after its last collective with rank 0 (a busy loop)
            pass
    print("rank 0 done", flush=True)
    if sys.argv[1] == "os_exit":
        os._exit(0)  # rank 0 vanishes: no atexit, no launcher clean-up
    """
)


def _gone(pid: int) -> bool:
    """The process has exited (absent, or a zombie waiting for a reaper)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, seconds: float) -> bool:
    """Whether ``pid`` exits within ``seconds``; if not, it is killed (a failing test leaves no busy loop)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.2)
    if not _gone(pid):
        os.kill(pid, signal.SIGKILL)
        return False
    return True


def _run(tmp_path, how: str):
    (tmp_path / "train.py").write_text(SCRIPT)
    env = clean_subprocess_env(PYTHONPATH=str(REPO_ROOT), MOREH_AP_NPROC="2", MOREH_AP_DIST_TIMEOUT="1",
                               MOREH_AP_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "train.py", how], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    return proc, time.monotonic() - start, int((tmp_path / "pid1").read_text())


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads Linux's process table")
@pytest.mark.full  # CI time; a hung rank inside training is tests/integration/test_faults.py
def test_a_hanging_child_is_stopped_when_rank_0_leaves(tmp_path):
    proc, elapsed, child = _run(tmp_path, "exit")
    assert "rank 0 done" in proc.stdout
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "moreh_ap: rank 0 of 2 finished, but rank(s) 1 did not finish within 31 s" in proc.stderr
    assert elapsed < 31 + 40  # start-up, the 31 s bound and the stop's grace
    assert _wait_gone(child, 10)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads Linux's process table")
def test_a_child_stops_itself_when_rank_0_vanishes(tmp_path):
    proc, elapsed, child = _run(tmp_path, "os_exit")
    assert proc.returncode == 0 and "rank 0 done" in proc.stdout
    assert _wait_gone(child, 10), "rank 1 outlived rank 0"
    log = next((tmp_path / "cache" / "logs").iterdir()) / "rank1.stderr.log"
    assert "moreh_ap: rank 1: rank 0 (pid" in log.read_text() and "this rank stops" in log.read_text()
