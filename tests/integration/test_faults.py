# Faults end every rank with the cause shown; Ctrl-C / SIGTERM reach the script's except/finally on every rank.
"""Each test runs tests/scripts/faults_train.py (a DDP dp 2 pinned run of a small own-loss model) under the
self-launcher or torchrun, bounded in time, and kills only the processes it started (their pids are in
the script's markers)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers.env import clean_subprocess_env
from tests.helpers.paths import REPO_ROOT

pytestmark = [pytest.mark.multirank,
              pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads Linux's process table")]

SCRIPT = REPO_ROOT / "tests" / "scripts" / "faults_train.py"
CONFIG = '{"num_stages": 1, "num_micro_batches": 1, "batch_per_device": 4, "mixed_precision": false}'
TIMEOUT_S = 15  # MOREH_AP_DIST_TIMEOUT: start-up on a busy 2-core machine fits in it


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return True


def _all_gone(out, seconds: float = 10) -> bool:
    """Every rank whose pid the script wrote has exited within ``seconds``; those left are killed."""
    pids = [int(p.read_text()) for p in out.glob("pid[0-9]")]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if not _gone(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return not left


def _ignores(pid: int, sig: int) -> bool:
    """Whether process ``pid`` ignores ``sig`` (its ``SigIgn`` mask in Linux's process table)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    return bool(mask >> (sig - 1) & 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sigint_as_in_a_terminal() -> None:
    """In the child, before exec: Ctrl-C at Python's default, as for a script run in a terminal. A test run
    started in the background by a non-interactive shell (``pytest ... &``) inherits SIGINT ignored; Python
    then leaves it ignored and the script would never see the test's Ctrl-C (it would run to its end)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(tmp_path, fault: str, rank: int, at: int, *, torchrun: bool = False, steps: int = 6):
    out = tmp_path / "out"
    out.mkdir()
    env = clean_subprocess_env(PYTHONPATH=str(REPO_ROOT), MOREH_AP_DIST_TIMEOUT=str(TIMEOUT_S), OMP_NUM_THREADS="1",
                               MOREH_AP_CACHE_DIR=str(tmp_path / "cache"), MOREH_AP_CONFIG=CONFIG,
                               FAULT_STEPS=str(steps))
    args = [str(SCRIPT), str(out), fault, str(rank), str(at)]
    if torchrun:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--monitor-interval=0.2",
                  "--master-addr=127.0.0.1", f"--master-port={_free_port()}"]
        cmd = [*launch, *args]
    else:
        env["MOREH_AP_NPROC"] = "2"
        cmd = [sys.executable, *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_in_a_terminal)
    return proc, out


def _finish(proc, out, seconds: float):
    try:
        stdout, stderr = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        _all_gone(out, 0)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the run did not end within {seconds} s:\n{stderr[-6000:]}")
    return stdout, stderr


def _wait_for(path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name} was not written within {seconds} s")
        time.sleep(0.1)


def _wait_failed(proc, out, marker: str, seconds: float = 120):
    """Wait until the ranks have started training (``marker`` written) and return the time then."""
    deadline = time.monotonic() + seconds
    while not (out / marker).exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return time.monotonic()


@pytest.mark.parametrize("torchrun", [False, True], ids=["self-launch", "torchrun"])
def test_a_raising_rank_1_is_named_with_its_traceback(tmp_path, torchrun):
    proc, out = _start(tmp_path, "raise", 1, 2, torchrun=torchrun)
    started = _wait_failed(proc, out, "step0")
    stdout, stderr = _finish(proc, out, 120)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert "RuntimeError: boom in the forward of rank 1" in stderr
    assert 'raise RuntimeError(f"boom in the forward of rank {RANK}")' in stderr  # the traceback, not one line
    if torchrun:  # torchrun's summary: rank 1 is the root cause; rank 0 was stopped, not failed
        root = stderr[stderr.index("Root Cause"):]
        assert "rank      : 1 " in root.split("Other Failures")[0], root
    else:
        assert "moreh_ap: rank 1 of 2 failed" in stderr
        assert "rank 0 of 2 failed" not in stderr
    assert "[rank 0] moreh_ap: train_step stopped: rank 1 failed first in train_step" in stderr
    assert (out / "finally1").read_text() == "2"  # rank 1's own finally ran
    assert not (out / "finally0").exists()  # rank 0 was stopped
    assert elapsed < 30
    assert _all_gone(out)


# torchrun: -m full (CI time). Covered in CI by [self-launch] (the same script and rank 0's failure: moreh_ap's
# messages, its finally, every rank gone) and by test_a_raising_rank_1_is_named_with_its_traceback[torchrun]
# (torchrun's root cause and moreh_ap stopping the other rank under torchrun)
@pytest.mark.parametrize("torchrun", [False, pytest.param(True, marks=pytest.mark.full)],
                         ids=["self-launch", "torchrun"])
def test_an_exception_in_rank_0s_forward_reaches_its_finally(tmp_path, torchrun):
    proc, out = _start(tmp_path, "raise", 0, 2, torchrun=torchrun)
    started = _wait_failed(proc, out, "step0")
    stdout, stderr = _finish(proc, out, 120)
    assert proc.returncode != 0
    assert (out / "finally0").read_text() == "2"  # the script's finally ran on rank 0
    assert "RuntimeError: boom in the forward of rank 0" in stderr
    assert "[rank 0] moreh_ap: train_step failed (RuntimeError: boom in the forward of rank 0)" in stderr
    if torchrun:
        root = stderr[stderr.index("Root Cause"):]
        assert "rank      : 0 " in root.split("Other Failures")[0], root
    else:
        assert "moreh_ap: rank 0 of 2 failed (RuntimeError); stopping the other ranks." in stderr
    assert time.monotonic() - started < 30
    assert _all_gone(out)


def test_a_hung_rank_1_ends_within_the_timeout(tmp_path):
    proc, out = _start(tmp_path, "hang", 1, 2)
    started = _wait_failed(proc, out, "step0")
    stdout, stderr = _finish(proc, out, 150)
    assert proc.returncode != 0
    assert time.monotonic() - started < TIMEOUT_S + 30
    assert "[rank 0] moreh_ap: train_step failed" in stderr  # the collective with the hung rank timed out
    assert (out / "finally0").exists()
    assert _all_gone(out)


@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.full)],  # same path
                         ids=["ctrl-c", "sigterm"])
def test_a_signal_to_rank_0_stops_every_rank_at_the_same_step(tmp_path, sig):
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a test run started with `&`: the child
    try:  # must still get Ctrl-C at Python's default (it inherits an ignored signal, not a handler)
        proc, out = _start(tmp_path, "none", 0, 0, steps=400)
    finally:
        signal.signal(signal.SIGINT, before)
    _wait_failed(proc, out, "step1")
    assert (out / "step1").exists(), "no training step ran"
    assert not _ignores(int((out / "pid0").read_text()), sig), "rank 0 was started with the signal ignored"
    os.kill(int((out / "pid0").read_text()), sig)
    stdout, stderr = _finish(proc, out, 60)
    assert proc.returncode != 0
    kind = "KeyboardInterrupt" if sig == signal.SIGINT else "Terminated"
    seen = [json.loads((out / f"interrupted{r}").read_text()) for r in (0, 1)]
    assert seen[0]["type"] == seen[1]["type"] == kind
    assert seen[0]["step"] == seen[1]["step"]  # every rank stopped before the same step
    assert (out / "saved0").exists() and (out / "saved1").exists()  # the finally's collective ran everywhere
    assert (out / "finally0").exists() and (out / "finally1").exists()
    assert f"moreh_ap: every rank of 2 stopped on {sig.name} at the same step." in stderr
    assert "every rank stops at the next step" in stderr  # rank 0 said what it does with the signal
    assert "SignalException" not in stderr and "failed" not in stderr
    assert _all_gone(out)
