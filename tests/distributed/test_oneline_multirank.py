# The one-line mode end to end: user scripts with AP on (2 CPU ranks, self-launched) vs AP off in one process.
"""Each case launches a real script with ``MOREH_AP_NPROC=2`` or ``4`` (the self-launcher) and compares it
with the same script run with ``MOREH_ENABLE_ADVANCED_PARALLELIZATION=0`` in one process.

fp32 (``mixed_precision=False``); tolerances: losses and gradient norms rtol 1e-5; weights per tensor
``|a - b| / |a| < 1e-4`` and max abs diff < 2e-4 (AdamW, lr 1e-2, turns a gradient difference of
1e-9 on an element whose gradient is ~0 into an update difference of up to lr; measured: ~1e-5
relative, ~1e-5 max abs; a lost micro-batch or a wrong loss scale moves the weights by > 1e-2).
The parallel configuration is pinned with ``MOREH_AP_CONFIG`` so each case tests a known layout (its
``batch_per_device`` matches the first batch: a pinned config that disagrees with the batch is an error).
"""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moreh_ap.config import ParallelConfig

from tests.helpers.results import result_records
from tests.helpers.env import clean_subprocess_env
from tests.helpers.paths import HELPERS, REPO_ROOT

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

ROOT = REPO_ROOT
SCRIPT = HELPERS / "oneline_script.py"
EXAMPLE = ROOT / "examples" / "text_summarization_for_ap.py"
FP32 = {"mixed_precision": False}


def _config(**fields) -> str:
    return json.dumps({"batch_per_device": 1, **FP32, **fields})


def _run(cmd, cwd, *, ap: str | None, nproc: int | None = None, config: str | None = None, timeout=400, **extra):
    extra.setdefault("MOREH_AP_RANK_OUTPUT", "all")  # the checks read every rank's RESULT / log lines
    env = clean_subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error",
                               HF_HUB_DISABLE_PROGRESS_BARS="1", **extra)
    if ap is not None:
        env["MOREH_ENABLE_ADVANCED_PARALLELIZATION"] = ap
    if nproc:
        env["MOREH_AP_NPROC"] = str(nproc)
    if config:
        env["MOREH_AP_CONFIG"] = config
    started = time.monotonic()
    proc = subprocess.run([sys.executable, *map(str, cmd)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    proc.elapsed = time.monotonic() - started
    return proc


def _results(proc) -> list[dict]:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return result_records(proc.stdout)


def _assert_weights_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k].float() - b[k].float())
        assert diff.abs().max() < 2e-4, (k, diff.abs().max())
        assert diff.norm() <= 1e-4 * a[k].float().norm() + 1e-7, (k, diff.norm() / a[k].float().norm())


def _saved(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("off")
    (res,) = _results(_run([SCRIPT, out, "line"], out, ap="0"))
    return out, res


CASES = {
    # pp=1 data parallel (DDP), HF gradient checkpointing => recomputation fixed on
    "dp2-ddp-line-ckpt": (2, ["line", "--ckpt"], _config(num_stages=1, num_micro_batches=1, batch_per_device=4)),
    # pp=2, 1F1B over 2 micro-batches
    "pp2-1f1b-line": (2, ["line"], _config(num_stages=2, num_micro_batches=2, batch_per_device=4)),
    # env var only (no line in the script), FSDP2 over 2 ranks, 2 micro-batches
    "dp2-fsdp-env": (2, ["env"], _config(num_stages=1, num_micro_batches=2, distribute_param=True,
                                             batch_per_device=2)),
}
FULL_CASES = {
    # -m full (CI time: the slowest case here, ~30-60 s on 2 cores). Covered in CI by
    # test_example_pipelined_matches_one_device[4-ranks-2-stages-x-dp2-zero3] (the one line on 4 ranks, 2 stages x
    # FSDP2 over 2 data-parallel ranks, saved weights equal to one device's), by this script's pp2-1f1b-line and
    # dp2-fsdp-env cases (state_dict placeholders, eval, reload, save_pretrained) and by the runtime equivalence's
    # pp2 x dp2 dist10 cases (tests/distributed/test_runtime_equivalence.py)
    "pp2xdp2-fsdp-line": (4, ["line"], _config(num_stages=2, num_micro_batches=2, distribute_param=True,
                                                    batch_per_device=2)),
}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", [*CASES, *(pytest.param(c, marks=pytest.mark.full) for c in FULL_CASES)])
def test_script_matches_one_device(case, reference, tmp_path):
    ref_dir, ref = reference
    nproc, args, config = {**CASES, **FULL_CASES}[case]
    proc = _run([SCRIPT, tmp_path, *args], tmp_path, ap="1" if args[0] == "env" else None, nproc=nproc,
                config=config)
    results = _results(proc)
    assert len(results) == nproc, proc.stdout
    assert f"Launching {nproc} local cpu ranks" in proc.stderr
    assert "Configuration for parallelism is selected." in proc.stderr
    line = next(l for l in proc.stderr.splitlines() if "num_stages :" in l and "parallelize" not in l)
    assert (tmp_path / "advanced_parallelization_selected_config.dump").read_text().strip() in line
    if "--ckpt" in args:
        assert "recomputation : 1" in line
    for res in results:  # every rank: the same numbers as one device
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert res["norm"] == pytest.approx(ref["norm"], rel=1e-5)
        assert res["name"] == "LlamaForCausalLM" and res["isinstance"] and res["reload_equal"]
        assert res["eval"] == pytest.approx(ref["eval"], rel=1e-5)  # model.eval() + forward (pipelined too)
    assert all(res["loss"] == results[0]["loss"] for res in results)  # loss.item() identical on all ranks
    want = torch.load(ref_dir / "state_rank0.pt")
    got = torch.load(tmp_path / "state_rank0.pt")  # state_dict(): full weights on the CPU on rank 0
    assert all(t.device.type == "cpu" for t in got.values())
    _assert_weights_close(want, got)
    for r in range(1, nproc):  # the other ranks: the same keys and shapes, meta placeholders (no data)
        other = torch.load(tmp_path / f"state_rank{r}.pt")
        assert list(other) == list(want) and all(t.device.type == "meta" for t in other.values())
        assert all(other[k].shape == want[k].shape for k in want)
    _assert_weights_close(_saved(ref_dir / "saved"), _saved(tmp_path / "saved"))


LOSS = re.compile(r"\[Step (\d+)/\d+\] Loss: ([0-9.]+)")


EXAMPLE_CASES = {
    "2-ranks-2-stages": (2, dict(num_stages=2, num_micro_batches=4, batch_per_device=2)),
    "4-ranks-2-stages-x-dp2-zero3": (4, dict(num_stages=2, num_micro_batches=4, distribute_param=True,
                                             distribute_low_prec_param=True)),
}


EXAMPLE_ARGS = ["--num-samples", "24", "--block-size", "32", "--log-interval", "1", "--ap-options",
                "mixed_precision=false"]


@pytest.fixture(scope="module")
def example_off(tmp_path_factory):
    """The walkthrough with AP off, run once for every example case (its output directory and process)."""
    out = tmp_path_factory.mktemp("example_off")
    return out, _run([EXAMPLE, *EXAMPLE_ARGS, "--save-model-dir", out / "off"], out, ap="0")


# 2-ranks-2-stages: -m full (CI time, a 2-rank run of the walkthrough). Covered in CI by 4-ranks-2-stages-x-dp2-zero3
# (the same walkthrough, 2 stages, 4 micro-batches, every step's loss and the saved weights), by this file's
# pp2-1f1b-line case (the one line, 2 stages on 2 ranks) and by the planner run of the walkthrough on 2 ranks below
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.full] if c == "2-ranks-2-stages" else [])
                                  for c in EXAMPLE_CASES])
def test_example_pipelined_matches_one_device(case, example_off, tmp_path):
    """The seed's walkthrough with AP on (2 or 4 ranks) vs off: same loss at every step, same weights."""
    nproc, fields = EXAMPLE_CASES[case]
    off_dir, off = example_off
    on = _run([EXAMPLE, *EXAMPLE_ARGS, "--save-model-dir", tmp_path / "on"], tmp_path, ap=None, nproc=nproc,
              config=_config(**fields))
    assert off.returncode == 0, off.stderr[-3000:]
    assert on.returncode == 0, on.stderr[-3000:]
    ref = [float(v) for _, v in LOSS.findall(off.stderr)]
    got = {}
    for step, value in LOSS.findall(on.stderr):  # both ranks log: the same value
        got.setdefault(int(step), set()).add(float(value))
    assert len(ref) == 3 and sorted(got) == [1, 2, 3]
    assert all(len(v) == 1 for v in got.values()), got
    assert [next(iter(got[s])) for s in sorted(got)] == pytest.approx(ref, rel=1e-5)
    assert ParallelConfig.from_dict(json.loads(_config(**fields))).to_moreh_line() in on.stderr
    assert on.stdout.count("weights match") == nproc
    _assert_weights_close(_saved(off_dir / "off"), _saved(tmp_path / "on"))


@pytest.mark.timeout(600)
def test_crashing_rank_ends_the_run_with_its_traceback(tmp_path):
    proc = _run([SCRIPT, tmp_path, "line", "--crash-rank", "1"], tmp_path, ap=None, nproc=2,
                config=_config(num_stages=2, num_micro_batches=2, batch_per_device=4), MOREH_AP_RANK_OUTPUT="rank0",
                MOREH_AP_CACHE_DIR=str(tmp_path / "cache"))  # rank 1's traceback comes from its stderr file
    assert proc.returncode != 0
    crash_at = float(re.search(r"CRASH_AT ([0-9.]+)", proc.stderr).group(1))
    assert time.time() - crash_at < 60  # every rank gone within 60 s of the failure (start-up varies with load)
    assert "deliberate failure on rank 1" in proc.stderr
    assert "RuntimeError" in proc.stderr


@pytest.mark.timeout(900)
def test_example_with_the_planner_prints_the_seed_lines_and_trains(tmp_path):
    """The README's main command: the planner chooses (bf16 default), the seed's lines, training, save, reload."""
    from moreh_ap.config import ParallelConfig

    proc = _run([EXAMPLE, "--num-samples", "32", "--block-size", "32", "--log-interval", "1",
                 "--save-model-dir", tmp_path / "out"], tmp_path, ap=None, nproc=2,
                MOREH_AP_CACHE_DIR=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("The number of candidates is", "SelectBestGraphFromCandidates finished.",
                 "Configuration for parallelism is selected.", "train: true"):
        assert line in proc.stderr
    dumped = ParallelConfig.from_moreh_line((tmp_path / "advanced_parallelization_selected_config.dump").read_text())
    assert dumped.to_moreh_line() in proc.stderr
    got = {}
    for step, value in LOSS.findall(proc.stderr):
        got.setdefault(int(step), set()).add(float(value))
    assert sorted(got) == [1, 2, 3, 4] and all(len(v) == 1 for v in got.values()), got
    losses = [next(iter(got[s])) for s in sorted(got)]
    assert losses[-1] < losses[0], losses
    assert proc.stdout.count("weights match") == 2
