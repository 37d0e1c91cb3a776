# Optimizer state across engagement and one-device-format state dicts, in one process (world 1).
"""The multi-rank matrix is tests/distributed/test_resume.py; here the formats and the carry in one process:
an optimizer that stepped before ``parallelize`` / before the one line engages keeps its state (the run
equals one device's), ``optimizer.state_dict()`` after engagement is exactly torch's one-device dict, and
``load_state_dict`` of model and optimizer work before and after engagement. fp32, tolerances rtol 1e-5 /
atol 1e-6 (one process: the same arithmetic as the reference)."""
import json

import pytest
import torch

import moreh_ap
from moreh_ap import oneline
from moreh_ap.config import ParallelConfig
from moreh_ap.oneline.state import STATE
from moreh_ap.option import enable_advanced_parallelization
from moreh_ap.runtime.optim_state import OptimizerMap, named_from_one_device, one_device_from_named

from tests.helpers.resume_cases import (RESUME_STEPS, SAVE_STEPS, batch, build_model, build_optimizer, reference,
                                        run)

pytestmark = pytest.mark.timeout(180)
ONE = ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=4, mixed_precision=False)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _assert_optimizer_dicts_equal(got: dict, want: dict) -> None:
    assert got["param_groups"] == want["param_groups"]
    assert sorted(got["state"]) == sorted(want["state"])
    for i, st in want["state"].items():
        assert sorted(got["state"][i]) == sorted(st)
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                assert got["state"][i][k].shape == v.shape and got["state"][i][k].dtype == v.dtype, (i, k)
                _close(got["state"][i][k], v)
            else:
                assert got["state"][i][k] == v


@pytest.mark.parametrize("optim", ["adamw", "sgd", "lamb"])
def test_parallelize_keeps_the_state_of_an_optimizer_that_stepped(optim):
    case = {"model": "gpt2", "optim": optim}  # GPT-2: tied wte / lm_head
    ref = reference(case)
    model = build_model("gpt2", 0)
    opt = build_optimizer(optim, model)
    losses = []
    for step in range(SAVE_STEPS + RESUME_STEPS):
        ids, labels = batch(step)
        if step < SAVE_STEPS:
            loss = model(ids, labels=labels).loss
            loss.backward()
        else:
            if step == SAVE_STEPS:
                pm = moreh_ap.parallelize(model, ONE, optimizer=opt, measure=False)
            loss = pm.train_step(ids, labels=labels)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    _close(torch.tensor(losses), torch.tensor(ref["losses"]))
    for k, v in ref["state"].items():
        _close(pm.full_state_dict()[k], v)
    _assert_optimizer_dicts_equal(pm.optimizer_state_dict(), ref["optimizer"])


@pytest.mark.parametrize("when", ["before", "after"])
def test_oneline_resume_in_one_process(when, tmp_path, monkeypatch):
    """Save after 4 steps (AP on, one process), load into a fresh model before / after engagement, 2 more."""
    case = {"model": "gpt2", "optim": "adamw", "cfg": ONE.to_dict(), "path": str(tmp_path / "ckpt.pt")}
    ref = reference(case)
    saved = run({**case, "phase": "save"}, 1, 0)
    assert saved["same_keys"]
    got = run({**case, "phase": "resume", "when": when}, 1, 0)
    _close(torch.tensor(saved["losses"] + got["losses"]), torch.tensor(ref["losses"]))
    assert list(got["state"]) == list(ref["state"])  # tied: both names, as one device's state_dict
    for k, v in ref["state"].items():
        _close(got["state"][k], v)
    _assert_optimizer_dicts_equal(got["optimizer"], ref["optimizer"])
    ckpt = torch.load(case["path"], weights_only=True)
    want_at_save = reference({**case})["state_at_save"]
    for k, v in want_at_save.items():
        _close(ckpt["model"][k], v)


def test_line_after_a_step_engages_and_keeps_the_state(tmp_path, monkeypatch):
    """Formerly OptimizerAlreadySteppedError: now AP engages at the next training forward with that state."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOREH_AP_CONFIG", json.dumps(ONE.to_dict()))  # the state is tested here, not planning
    ref = reference({"model": "llama", "optim": "adamw"})
    model = build_model("llama", 0)
    opt = build_optimizer("adamw", model)
    losses = []
    for step in range(SAVE_STEPS + RESUME_STEPS):
        if step == 2:
            enable_advanced_parallelization(mixed_precision=False)
        ids, labels = batch(step)
        loss = model(ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    try:
        assert oneline.is_engaged() and isinstance(opt, torch.optim.AdamW) and type(opt).__name__ == "AdamW"
        _close(torch.tensor(losses), torch.tensor(ref["losses"]))
        _assert_optimizer_dicts_equal(opt.state_dict(), ref["optimizer"])
        for k, v in ref["state"].items():
            _close(model.state_dict()[k], v)
        with pytest.raises(ValueError, match="parameter groups"):
            opt.load_state_dict({"state": {}, "param_groups": ref["optimizer"]["param_groups"][:1]})
        with pytest.raises(RuntimeError, match="missing keys"):
            model.load_state_dict({})
        assert model.load_state_dict({}, strict=False).missing_keys == list(ref["state"])
    finally:
        STATE.engines.pop(model)


def test_named_and_one_device_formats_round_trip():
    omap = OptimizerMap(group_names=[["a", "b"], ["c"]])
    sd = {"state": {0: {"x": torch.ones(2)}, 2: {"x": torch.zeros(1)}},
          "param_groups": [{"lr": 0.1, "params": [0, 1]}, {"lr": 0.2, "params": [2]}]}
    named = named_from_one_device(sd, omap)
    assert named["param_groups"] == [{"lr": 0.1, "params": ["a", "b"]}, {"lr": 0.2, "params": ["c"]}]
    assert sorted(named["state"]) == ["a", "c"]
    back = one_device_from_named(named, omap)
    assert back["param_groups"] == sd["param_groups"] and sorted(back["state"]) == [0, 2]
    with pytest.raises(ValueError, match="doesn't match the size"):
        named_from_one_device({"state": {}, "param_groups": [{"params": [0]}, {"params": [2]}]}, omap)
