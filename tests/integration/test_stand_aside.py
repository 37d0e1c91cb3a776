# A script that distributes itself (its own process group, DDP) under torchrun with the one line: AP stands aside.
"""The same script runs under ``torchrun --nproc-per-node=2`` with AP off and with the one line (or
``MOREH_ENABLE_ADVANCED_PARALLELIZATION=1``): it must train exactly as written (each rank its own data, as a
``DistributedSampler`` gives it; the same losses and final weights, printed by every rank) and say once
that it distributes itself. Without standing aside, AP would engage on the Hugging Face model at its first
training forward and train something else (one batch, rank 0's, for every rank)."""
import subprocess
import sys
import textwrap

import pytest

from tests.helpers.env import clean_subprocess_env
from tests.helpers.paths import REPO_ROOT

pytestmark = pytest.mark.multirank

TIMEOUT_S = 180
WARNING = "The script distributes itself"

SCRIPT = textwrap.dedent(
    """
    import os, sys
    from datetime import timedelta
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    ap, wrap, out = sys.argv[1], sys.argv[2], sys.argv[3]
    if ap == "line":
        torch.moreh.option.enable_advanced_parallelization(mixed_precision=False)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    lines = []
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    net = DistributedDataParallel(model) if wrap == "ddp" else model
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as a DistributedSampler gives it
    for step in range(3):
        ids = torch.randint(0, 64, (4, 8), generator=gen)
        loss = net(ids, labels=ids).loss
        loss.backward()
        if wrap == "allreduce":  # the script averages the gradients itself
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        opt.zero_grad()
        lines.append(f"rank {rank} step {step} loss {loss.item():.12e}")
    total = sum(float(p.detach().double().sum()) for p in model.parameters())
    lines.append(f"rank {rank} weights {total:.12e} class {type(model).__name__}")
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:  # the ranks share the console: a file each
        f.write("\\n".join(lines) + "\\n")
    dist.destroy_process_group()
    """
)


def _torchrun(script, out, *args, **extra) -> tuple[list[str], str]:
    """Run ``script`` under torchrun on 2 ranks; its result lines (both ranks) and torchrun's stderr."""
    env = clean_subprocess_env(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
                               TRANSFORMERS_VERBOSITY="error", **extra)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    out.mkdir()
    # --standalone: a rendezvous on a free local port chosen by torchrun itself
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
           args[0], args[1], str(out)]
    proc = subprocess.run(cmd, cwd=script.parent, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for r in range(2) for line in (out / f"rank{r}.txt").read_text().splitlines()]
    assert len(lines) == 2 * 4, lines
    return lines, proc.stderr


@pytest.mark.parametrize("wrap,enable", [("ddp", "line"),  # the script's own process group alone: -m full (CI time)
                                         pytest.param("allreduce", "env", marks=pytest.mark.full)])
def test_a_script_that_distributes_itself_runs_as_written(tmp_path, wrap, enable):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    off, off_err = _torchrun(script, tmp_path / "off", "off", wrap)
    if enable == "env":
        on, on_err = _torchrun(script, tmp_path / "on", "off", wrap, MOREH_ENABLE_ADVANCED_PARALLELIZATION="1")
    else:
        on, on_err = _torchrun(script, tmp_path / "on", "line", wrap)
    assert on == off  # exactly: same losses, same final weights, the user's own class
    assert WARNING not in off_err
    assert on_err.count(WARNING) == 1, on_err[-4000:]  # rank 0 only, once
    reason = "wrapped in DistributedDataParallel" if wrap == "ddp" else "initialized torch.distributed itself"
    assert reason in on_err and "Advanced parallelization is off for this run" in on_err
    # each rank trained on its own data: the two ranks' first losses differ (they did not share a batch)
    assert off[0].split()[-1] != off[4].split()[-1] and off[0].startswith("rank 0") and off[4].startswith("rank 1")
