# An apex amp script (O0-O3, FusedLAMB/SGD, loss outside the model) under the one-line AP vs the same script on one device.
"""tests/scripts/apex_train.py in the shape of apex's examples, run with AP (``MOREH_AP_CONFIG`` pinned, so
neither the planner nor the calibration runs) and on one device (``MOREH_ENABLE_ADVANCED_PARALLELIZATION=0``),
4 steps each (one launch per configuration; the cases in ``FULL_ONLY`` run with ``-m full``); compared: every rank's losses, the final ``model.state_dict()`` and ``optimizer.state_dict()``
(rank 0's file, one-device format), the amp loss scaler, and the dtype the last linear layer computed in.

Bounds:
- O0 (fp32): tight (losses rel 1e-5, weights and optimizer state atol 1e-5): only the order of fp32 sums differs.
- fp16 levels (O1-O3): a rank (dp) or a micro-batch (pp) reduces its share of the batch in fp16 (O1: autocast's
  fp16 matmuls; O2/O3: fp16 gradients, averaged by DDP/FSDP2 in fp16), so every weight gradient is rounded to
  fp16 (relative 2**-11) per share instead of once. After 4 steps with these learning rates that moves a weight
  by a few fp16 ulps at |w| <= 1 (2**-10 each): losses rel 1e-3, weights within 4e-3 AND within 10% of the
  largest change training made (a run that does not train, or steps wrong, fails), optimizer state within 2% of
  its norm. That the per-share rounding is the only cause is checked for O1 at dp 2: the one-device run that
  backpropagates the same two half batches in turn (``APEX_HALVES=1``) gives the same weights (1e-6).
"""
import json
import subprocess
import sys

import pytest
import torch

from tests.helpers.results import result_records
from tests.helpers.env import clean_subprocess_env
from tests.helpers.paths import REPO_ROOT

pytestmark = [pytest.mark.timeout(900),
              pytest.mark.skipif(torch.cuda.is_available(), reason="CPU ranks (gloo) against a CPU reference")]

SCRIPT = REPO_ROOT / "tests" / "scripts" / "apex_train.py"


def _config(**fields) -> str:
    return json.dumps({"num_stages": 1, "num_micro_batches": 1, "mixed_precision": False, **fields})


ONE = {"MOREH_AP_CONFIG": _config(batch_per_device=8)}
DDP = {"MOREH_AP_NPROC": "2", "MOREH_AP_CONFIG": _config(batch_per_device=4)}
FSDP = {"MOREH_AP_NPROC": "2", "MOREH_AP_CONFIG": _config(batch_per_device=4, distribute_param=True)}
PP2 = {"MOREH_AP_NPROC": "2", "MOREH_AP_CONFIG": _config(num_stages=2, num_micro_batches=2, batch_per_device=2)}
TP2 = {"MOREH_AP_NPROC": "2", "MOREH_AP_CONFIG": _config(batch_per_device=4, tp=2)}

# name -> (the script's variables, the AP launch's)
CASES = {
    "O0-lamb-ddp": ({"APEX_LEVEL": "O0", "APEX_OPT": "lamb"}, DDP),
    "O1-sgd-ddp": ({"APEX_LEVEL": "O1", "APEX_OPT": "sgd"}, DDP),
    "O1-sgd-fsdp2": ({"APEX_LEVEL": "O1", "APEX_OPT": "sgd"}, FSDP),
    "O2-lamb-1proc-zero-first": ({"APEX_LEVEL": "O2", "APEX_OPT": "lamb", "APEX_ZERO_FIRST": "1"}, ONE),
    "O2-lamb-ddp": ({"APEX_LEVEL": "O2", "APEX_OPT": "lamb"}, DDP),
    "O2-lamb-fsdp2-zero-first": ({"APEX_LEVEL": "O2", "APEX_OPT": "lamb", "APEX_ZERO_FIRST": "1"}, FSDP),
    "O3-sgd-ddp": ({"APEX_LEVEL": "O3", "APEX_OPT": "sgd"}, DDP),
    "llama-O1-sgd-pp2": ({"APEX_LEVEL": "O1", "APEX_OPT": "sgd", "APEX_MODEL": "llama"}, PP2),
    "llama-O2-lamb-pp2-clip": ({"APEX_LEVEL": "O2", "APEX_OPT": "lamb", "APEX_MODEL": "llama", "APEX_CLIP": "0.5"},
                               PP2),
    "llama-O1-sgd-tp2": ({"APEX_LEVEL": "O1", "APEX_OPT": "sgd", "APEX_MODEL": "llama"}, TP2),
    "llama-O2-lamb-tp2-clip": ({"APEX_LEVEL": "O2", "APEX_OPT": "lamb", "APEX_MODEL": "llama", "APEX_CLIP": "0.5"},
                               TP2),
}

_RUNS: dict = {}
"""(script variables, AP variables) -> (RESULT lines by rank, the saved checkpoint): one launch each."""


def _run(tmp_dir, script_env: dict, ap_env: dict | None):
    key = (json.dumps(script_env, sort_keys=True), json.dumps(ap_env, sort_keys=True))
    if key in _RUNS:
        return _RUNS[key]
    out = tmp_dir / f"run{len(_RUNS)}.pt"
    launch = ap_env if ap_env is not None else {"MOREH_ENABLE_ADVANCED_PARALLELIZATION": "0"}
    env = clean_subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), TRANSFORMERS_VERBOSITY="error",
                               MOREH_AP_CACHE_DIR=str(tmp_dir / "cache"), MOREH_AP_RANK_OUTPUT="all",
                               APEX_OUT=str(out), **script_env, **launch)
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_dir, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = result_records(proc.stdout)
    _RUNS[key] = (sorted(results, key=lambda r: r["rank"]), torch.load(out), proc.stderr)
    return _RUNS[key]


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("apex_script")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _assert_optimizer_state(ap: dict, ref: dict, *, fp32: bool) -> None:
    assert ap["param_groups"] == ref["param_groups"]
    assert ap["state"].keys() == ref["state"].keys()
    for i, st in ref["state"].items():
        assert ap["state"][i].keys() == st.keys()
        for k, v in st.items():
            got = ap["state"][i][k]
            if not isinstance(v, torch.Tensor):
                assert got == v
                continue
            assert got.dtype == v.dtype and got.shape == v.shape, (i, k)
            if fp32:
                torch.testing.assert_close(got, v, rtol=1e-5, atol=1e-5)
            else:
                assert (got.float() - v.float()).norm() <= 0.02 * v.float().norm() + 1e-6, (i, k)


FULL_ONLY = {"O1-sgd-fsdp2", "llama-O1-sgd-tp2", "llama-O2-lamb-tp2-clip"}
"""Run with ``-m full`` only (the default set covers every level, one process, DDP, FSDP2 and the pipeline)."""


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.full) if n in FULL_ONLY else n for n in CASES])
def test_apex_script_under_ap_trains_like_one_device(tmp_dir, name):
    script_env, ap_env = CASES[name]
    fp32 = script_env["APEX_LEVEL"] == "O0"
    (ref,), ref_ckpt, _ = _run(tmp_dir, script_env, None)
    ranks, ckpt, stderr = _run(tmp_dir, script_env, ap_env)
    assert "parallelize:" in stderr  # AP engaged, with the pinned configuration
    assert [r["rank"] for r in ranks] == list(range(int(ap_env.get("MOREH_AP_NPROC", "1"))))
    for r in ranks:
        assert r["loss"] == ranks[0]["loss"]  # one loss on every rank
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5 if fp32 else 1e-3)
        assert r["scale"] == ref["scale"]  # the same loss-scale history (no rank skipped a step of its own)
        assert r["norms"] == pytest.approx(ref["norms"], rel=1e-5 if fp32 else 1e-2)  # clipped over all stages
    # the last linear layer computed in the one-device dtype (O1 under a pipeline: its stage ran under autocast)
    assert sorted({d for r in ranks for d in r["dtypes"]}) == ref["dtypes"]
    assert {k: v.dtype for k, v in ckpt["model"].items()} == {k: v.dtype for k, v in ref_ckpt["model"].items()}
    diff = _max_diff(ckpt["model"], ref_ckpt["model"])
    trained = _max_diff(ref_ckpt["model"], ref_ckpt["init"])
    if fp32:
        assert diff <= 1e-5
    else:
        assert diff <= 4e-3 and diff <= 0.1 * trained, (diff, trained)
    _assert_optimizer_state(ckpt["optimizer"], ref_ckpt["optimizer"], fp32=fp32)
    assert ckpt["amp"] == ref_ckpt["amp"]


def test_o1_at_dp2_differs_from_one_device_only_by_the_per_rank_fp16_rounding(tmp_dir):
    """The one-device run that backpropagates the two half batches in turn rounds each half's fp16 products
    as the two ranks do: the weights are the same."""
    script_env, ap_env = CASES["O1-sgd-ddp"]
    _, halves, _ = _run(tmp_dir, {**script_env, "APEX_HALVES": "1"}, None)
    _, ckpt, _ = _run(tmp_dir, script_env, ap_env)
    assert _max_diff(ckpt["model"], halves["model"]) <= 1e-6


def test_o2_resumes_from_a_one_device_checkpoint_under_fsdp2(tmp_dir):
    """apex's checkpoint order (initialize, then model/optimizer/amp load_state_dict) with O2's fp32 moments:
    a one-device checkpoint continues under FSDP2 as on one device."""
    script_env, _ = CASES["O2-lamb-fsdp2-zero-first"]
    _, first, _ = _run(tmp_dir, script_env, None)
    path = tmp_dir / "o2_checkpoint.pt"
    torch.save({k: first[k] for k in ("model", "optimizer", "amp")}, path)
    resume = {**script_env, "APEX_RESUME": str(path), "APEX_STEPS": "2"}
    (ref,), ref_ckpt, _ = _run(tmp_dir, resume, None)
    ranks, ckpt, _ = _run(tmp_dir, resume, FSDP)
    for r in ranks:
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-3)
    assert ckpt["amp"] == ref_ckpt["amp"] and ckpt["amp"]["loss_scaler0"]["unskipped"] == 6
    assert _max_diff(ckpt["model"], ref_ckpt["model"]) <= 4e-3
    _assert_optimizer_state(ckpt["optimizer"], ref_ckpt["optimizer"], fp32=False)
