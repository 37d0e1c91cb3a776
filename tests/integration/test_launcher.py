# Tests of the self-launcher: when it launches, the command it re-runs, and real 2-3 rank runs.
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from moreh_ap import launcher
from tests.helpers.env import clean_subprocess_env
from tests.helpers.paths import REPO_ROOT

TIMEOUT_S = 90
ROOT = REPO_ROOT

SCRIPT = textwrap.dedent(
    """
    import os, sys
    LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "GROUP_RANK", "TORCHELASTIC_USE_AGENT_STORE")
    seen = lambda: [v for v in LAUNCH_VARS if v in os.environ]
    print(f"before-line pid={os.getpid()} env={seen()}", flush=True)   # runs once per rank
    import torch
    import torch.distributed as dist
    torch.moreh.option.enable_advanced_parallelization()
    import moreh_ap
    after_line = seen()
    moreh_ap.runtime.init_distributed(timeout_s=60)
    t = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(t)
    if os.environ.get("CRASH_RANK") == str(dist.get_rank()):
        raise RuntimeError(f"boom on rank {dist.get_rank()}")
    dist.barrier()
    print(f"rank {dist.get_rank()}/{dist.get_world_size()} sum={t.item():g} argv={sys.argv[1:]}", flush=True)
    print(f"launch_rank={moreh_ap.launch_rank()} env={after_line}{seen()}", flush=True)
    dist.destroy_process_group()
    """
)

ENGAGING_SCRIPT = textwrap.dedent(
    """
    import os
    LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "GROUP_RANK", "TORCHELASTIC_USE_AGENT_STORE")
    seen = lambda: [v for v in LAUNCH_VARS if v in os.environ]
    env = {"start": seen()}
    import torch
    torch.moreh.option.enable_advanced_parallelization(mixed_precision=False)
    import moreh_ap
    env["line"] = seen()
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 64, (6, 8), generator=torch.Generator().manual_seed(0)).cuda()
    for step in range(2):
        loss = model(ids, labels=ids).loss
        env[f"step{step}"] = seen()
        loss.backward()
        opt.step()
        opt.zero_grad()
    engaged = moreh_ap.oneline.is_engaged()
    print(f"launch_rank={moreh_ap.launch_rank()} engaged={engaged} env={env}", flush=True)
    """
)
NO_VARS = "env={'start': [], 'line': [], 'step0': [], 'step1': []}"


def _write(tmp_path, name="train.py", text=SCRIPT):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _run(args, *, cwd, **environ):
    start = time.monotonic()
    environ.setdefault("PYTHONPATH", str(ROOT))  # this checkout's moreh_ap, not another installed one
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=clean_subprocess_env(**environ),
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    return proc, time.monotonic() - start


def test_decide():
    assert launcher.decide({}, cuda_count=0).launch is False
    d = launcher.decide({"MOREH_AP_NPROC": "2"}, cuda_count=0)
    assert (d.launch, d.nproc, d.device) == (True, 2, "cpu")
    d = launcher.decide({}, cuda_count=4)
    assert (d.launch, d.nproc, d.device) == (True, 4, "cuda")
    assert launcher.decide({"MOREH_AP_NPROC": "8"}, cuda_count=4).device == "cpu"
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "MOREH_AP_LAUNCHED", "MOREH_AP_RANK",
                "MOREH_AP_WORLD_SIZE", "MOREH_AP_LOCAL_RANK"):
        d = launcher.decide({"MOREH_AP_NPROC": "2", var: "1"}, cuda_count=0)
        assert not d.launch and "already a rank" in d.reason
    with pytest.raises(ValueError, match="MOREH_AP_NPROC"):
        launcher.decide({"MOREH_AP_NPROC": "-2"})
    assert set(d.to_dict()) == {"nproc", "device", "launch", "reason"}


def test_self_command_keeps_interpreter_and_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ignored", "--lr", "1e-3"])
    cmd = launcher.self_command()
    assert cmd[0] == sys.executable and cmd[-2:] == ["--lr", "1e-3"]


def _rank_log(cache, rank: int, stream: str = "stdout") -> str:
    """The one launch's ``rank<r>.<stream>.log`` under ``cache/logs/<run>/``."""
    runs = sorted((cache / "logs").iterdir())
    assert len(runs) == 1, runs
    return (runs[0] / f"rank{rank}.{stream}.log").read_text()


@pytest.mark.multirank
def test_two_ranks_from_plain_python(tmp_path):
    script = _write(tmp_path)
    cache = tmp_path / "cache"
    proc, _ = _run([str(script), "--x", "1"], cwd=tmp_path, MOREH_AP_NPROC="2", MOREH_AP_CACHE_DIR=str(cache))
    assert proc.returncode == 0, proc.stderr
    # default (MOREH_AP_RANK_OUTPUT=rank0): the user's prints appear once on the console, rank 1's in its file
    assert "rank 0/2 sum=3 argv=['--x', '1']" in proc.stdout
    assert "rank 1/2" not in proc.stdout and proc.stdout.count("before-line") == 1
    assert "rank 1/2 sum=3 argv=['--x', '1']" in _rank_log(cache, 1)
    assert _rank_log(cache, 1).count("before-line") == 1
    # the script sees none of torchrun's variables, before or after the line, on any rank; launch_rank() says
    for rank, out in ((0, proc.stdout), (1, _rank_log(cache, 1))):
        assert "env=[]" in out and f"launch_rank={rank} env=[][]" in out, out
    assert "[info] Launching 2 local cpu ranks: this process is rank 0." in proc.stderr
    run_dir = next((cache / "logs").iterdir())
    assert f"[info] Output of rank 1 goes to {run_dir} (rank<r>.stdout.log, rank<r>.stderr.log)" in proc.stderr
    # MOREH_AP_RANK_OUTPUT=all: every rank on the console (each user print twice)
    proc, _ = _run([str(script), "--x", "1"], cwd=tmp_path, MOREH_AP_NPROC="2", MOREH_AP_RANK_OUTPUT="all",
                   MOREH_AP_CACHE_DIR=str(tmp_path / "cache_all"))
    assert proc.returncode == 0, proc.stderr
    assert "rank 0/2 sum=3 argv=['--x', '1']" in proc.stdout
    assert "rank 1/2 sum=3 argv=['--x', '1']" in proc.stdout
    assert proc.stdout.count("before-line") == 2
    assert "Output of rank 1 goes to" not in proc.stderr and not (tmp_path / "cache_all" / "logs").exists()


@pytest.mark.multirank
def test_ranks_see_no_launch_variables_after_engagement(tmp_path):
    """Three self-launched ranks train a tiny Llama with AP engaged (a pinned dp=3 config): on every rank the
    script sees none of torchrun's variables at its start, after the line and after engagement, and
    ``moreh_ap.launch_rank()`` gives the ranks 0, 1, 2."""
    script = _write(tmp_path, text=ENGAGING_SCRIPT)
    config = '{"num_stages": 1, "num_micro_batches": 1, "batch_per_device": 2, "mixed_precision": false}'
    proc, _ = _run([str(script)], cwd=tmp_path, MOREH_AP_NPROC="3", MOREH_AP_RANK_OUTPUT="all",
                   MOREH_AP_CONFIG=config, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("launch_rank="))
    assert lines == [f"launch_rank={r} engaged=True {NO_VARS}" for r in range(3)], proc.stdout


@pytest.mark.multirank
def test_module_launch_and_env_only(tmp_path):
    _write(tmp_path, "pkg/__init__.py", "")
    _write(tmp_path, "pkg/train.py")
    proc, _ = _run(["-m", "pkg.train", "a"], cwd=tmp_path, MOREH_AP_NPROC="2", MOREH_AP_CACHE_DIR=str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    assert "rank 0/2 sum=3 argv=['a']" in proc.stdout
    assert "rank 1/2 sum=3 argv=['a']" in _rank_log(tmp_path / "c", 1)
    env_only = _write(tmp_path, "envonly.py", "import os, torch, moreh_ap\n"
                      "print('rank', moreh_ap.launch_rank(), os.environ.get('RANK'), flush=True)\n")
    proc, _ = _run([str(env_only)], cwd=tmp_path, MOREH_AP_NPROC="2", MOREH_ENABLE_ADVANCED_PARALLELIZATION="1",
                   MOREH_AP_RANK_OUTPUT="all")
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split("\n")[:2]) == ["rank 0 None", "rank 1 None"]


@pytest.mark.multirank
# crash_rank 0: -m full (CI time). Covered in CI by tests/integration/test_faults.py's
# test_an_exception_in_rank_0s_forward_reaches_its_finally[self-launch] (rank 0, the launching process, fails under
# the self-launcher: "rank 0 of 2 failed", the other ranks stopped, every rank gone) and by crash_rank 2 here
@pytest.mark.parametrize("crash_rank", [2, pytest.param(0, marks=pytest.mark.full)])
def test_a_failing_rank_stops_the_run(tmp_path, crash_rank):
    """A child's traceback reaches rank 0's console from its stderr file (default) or directly (all)."""
    script = _write(tmp_path)
    for output in ("rank0", "all") if crash_rank else ("rank0",):
        proc, elapsed = _run([str(script)], cwd=tmp_path, MOREH_AP_NPROC="3", CRASH_RANK=str(crash_rank),
                             MOREH_AP_RANK_OUTPUT=output, MOREH_AP_CACHE_DIR=str(tmp_path / output))
        assert proc.returncode != 0
        assert elapsed < 60
        assert f"RuntimeError: boom on rank {crash_rank}" in proc.stderr
        assert f"moreh_ap: rank {crash_rank} of 3 failed" in proc.stderr
        assert "rank 1/3" not in proc.stdout  # nobody finished
        if crash_rank and output == "rank0":
            assert f"rank{crash_rank}.stderr.log" in proc.stderr and "Traceback (most recent call last)" in proc.stderr


def test_no_launch_in_python_c_or_under_a_rank(tmp_path):
    code = "import torch; torch.moreh.option.enable_advanced_parallelization(); print('done')"
    proc, _ = _run(["-c", code], cwd=tmp_path, MOREH_AP_NPROC="2")
    assert proc.returncode == 0 and proc.stdout.strip() == "done"
    assert proc.stderr.count("Not starting 2 local ranks: interactive interpreter") == 1
    script = _write(tmp_path, "one.py", code + "\n")
    proc, _ = _run([str(script)], cwd=tmp_path, MOREH_AP_NPROC="2", RANK="0", WORLD_SIZE="1")
    assert proc.returncode == 0 and proc.stdout.strip() == "done" and "Launching" not in proc.stderr


@pytest.mark.multirank
def test_no_silent_copies_when_ap_cannot_engage(tmp_path):
    """A model trained in eval mode never engages AP: rank 1 stops at its first optimizer step, saying why,
    instead of training a copy of its own; the run ends non-zero with that reason on the console."""
    script = _write(tmp_path, text=textwrap.dedent(
        """
        import torch
        torch.moreh.option.enable_advanced_parallelization()
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model.eval()
        for step in range(3):
            model(torch.ones(2, 4)).sum().backward()
            opt.step()
        print("trained", flush=True)
        """))
    proc, elapsed = _run([str(script)], cwd=tmp_path, MOREH_AP_NPROC="2", MOREH_AP_CACHE_DIR=str(tmp_path / "c"))
    assert proc.returncode != 0 and elapsed < 60
    assert "moreh_ap: rank 1 of 2 failed" in proc.stderr
    assert "APNotEngagedError: rank 1 stops: advanced parallelization has not engaged, but SGD.step() runs" \
        in proc.stderr
    assert "[error] advanced parallelization has not engaged" in proc.stderr  # rank 0 says it too


def _listeners(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                found.append(local.rsplit(":", 1)[0])
    return found


def _own_address() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            return s.getsockname()[0]
    except OSError:
        return None


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's socket table")
def test_rendezvous_store_listens_on_loopback_only():
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = launcher.loopback_store(2, timeout_s=10)
    try:
        assert _listeners(store.port) == ["0100007F"]  # 127.0.0.1, not 00000000 (every interface)
        client = TCPStore("127.0.0.1", store.port, 2, is_master=False, timeout=timedelta(seconds=10))
        client.set("k", "v")
        assert store.get("k") == b"v"
        other = _own_address()
        if other and not other.startswith("127."):  # this machine's own address on another interface: refused
            with pytest.raises(OSError):
                socket.create_connection((other, store.port), timeout=5).close()
    finally:
        del store
