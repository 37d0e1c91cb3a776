# moreh_ap.checkpoint (DCP, original names): saved under one config, loaded under another, equals one device.
"""Each case trains 4 steps under ``moreh_ap.parallelize`` on 2 gloo ranks and saves a sharded checkpoint
(``moreh_ap.checkpoint.save``); a NEW launch (new processes) builds the model with other weights, loads it
under another configuration (or one process) and trains 2 more steps. Losses of all 6 steps, the final
weights and the optimizer state (one-device format) equal 6 uninterrupted steps on one device: fp32,
``assert_close(rtol=1e-4, atol=1e-5)``. One launch saves every case, one loads every case (both shared
with test_resume.py's cases).
"""
from __future__ import annotations

import os

import pytest
import torch

import moreh_ap
from moreh_ap.config import ParallelConfig
from tests.helpers.dist_harness import register
from tests.helpers.resume_cases import (LOAD_GROUP, RESUME_STEPS, SAVE_GROUP, SAVE_STEPS, batch, build_model,
                                        build_optimizer, checkpoint_runs, reference)

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(500)]  # the first test waits for both shared launches

RUNNER = "tests.helpers.resume_cases:run"
PP2 = ParallelConfig(num_stages=2, num_micro_batches=2, batch_per_device=2, mixed_precision=False).to_dict()
FSDP2 = ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=2, distribute_param=True,
                       distribute_low_prec_param=True, mixed_precision=False).to_dict()
TP2 = ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=4, tp=2, mixed_precision=False).to_dict()
ONE = ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=4, mixed_precision=False).to_dict()
# id: (model, optimizer, saved under, loaded under: a 2-rank config or "one process")
CASES = {
    "llama-adamw-pp2-to-fsdp2": ("llama", "adamw", PP2, FSDP2),
    "gpt2-tied-lamb-fsdp2-to-pp2": ("gpt2", "lamb", FSDP2, PP2),
    "gpt2-tied-sgd-fsdp2-to-one-process": ("gpt2", "sgd", FSDP2, None),
    # tensor parallelism re-lays GPT-2's fused q/k/v: the checkpoint holds them in one-device order
    "gpt2-tied-adamw-tp2-to-fsdp2": ("gpt2", "adamw", TP2, FSDP2),
    "gpt2-tied-adamw-fsdp2-to-tp2": ("gpt2", "adamw", FSDP2, TP2),
}
_COMMON = {cid: {"id": cid, "runner": RUNNER, "world": 2, "model": m, "optim": o, "file": cid}
           for cid, (m, o, _, _) in CASES.items()}
register(SAVE_GROUP, [{**_COMMON[c], "phase": "dcp-save", "cfg": CASES[c][2]} for c in CASES])
register(LOAD_GROUP, [{**_COMMON[c], "phase": "dcp-load", "cfg": CASES[c][3]} for c in CASES
                      if CASES[c][3] is not None])  # one save and one load launch with test_resume.py's cases


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


def _runs(tmp_path_factory) -> dict:
    return checkpoint_runs(tmp_path_factory)


def _load_in_one_process(case_id: str, path: str) -> dict:
    model_name, optim, _, _ = CASES[case_id]
    model = build_model(model_name, 10)
    opt = build_optimizer(optim, model)
    pm = moreh_ap.parallelize(model, ParallelConfig.from_dict(ONE), optimizer=opt, measure=False)
    moreh_ap.checkpoint.load(path, pm, opt)
    losses = []
    for step in range(SAVE_STEPS, SAVE_STEPS + RESUME_STEPS):
        loss = pm.train_step(*batch(step)[:1], labels=batch(step)[1])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"losses": losses, "state": pm.full_state_dict(), "optimizer": pm.optimizer_state_dict()}


@pytest.mark.parametrize("case_id", list(CASES))
def test_checkpoint_resumes_under_another_config(case_id, tmp_path_factory):
    runs = _runs(tmp_path_factory)
    model_name, optim, _, loaded_under = CASES[case_id]
    ref = reference({"model": model_name, "optim": optim})
    saved = runs["save"][case_id]
    if loaded_under is None:
        got = _load_in_one_process(case_id, str(runs["root"] / case_id))
    else:
        got = runs["load"][case_id]
        assert got["ranks"][0]["losses"] == got["ranks"][1]["losses"]
    _close(torch.tensor(saved["losses"] + got["losses"]), torch.tensor(ref["losses"]), "losses")
    assert list(got["state"]) == list(ref["state"])
    for k, v in ref["state"].items():
        _close(got["state"][k], v, k)
    want, have = ref["optimizer"], got["optimizer"]
    assert have["param_groups"] == want["param_groups"]
    assert sorted(have["state"]) == sorted(want["state"])
    for i, st in want["state"].items():
        for k, v in st.items():
            _close(torch.as_tensor(have["state"][i][k]), torch.as_tensor(v), f"optimizer state {i}.{k}")
    files = os.listdir(runs["root"] / case_id)
    assert ".metadata" in files and sum(f.endswith(".distcp") for f in files) == 2  # each rank wrote its part


def test_bad_arguments_are_clear_errors(tmp_path):
    model = build_model("llama", 0)
    opt = build_optimizer("adamw", model)
    with pytest.raises(TypeError, match="ParallelModel"):
        moreh_ap.checkpoint.save(str(tmp_path), model, opt)
    pm = moreh_ap.parallelize(model, ParallelConfig.from_dict(ONE), optimizer=opt, measure=False)
    with pytest.raises(ValueError, match="not the one given"):
        moreh_ap.checkpoint.save(str(tmp_path), pm, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        moreh_ap.checkpoint.load(str(tmp_path / "nothing"), pm, opt)
    moreh_ap.checkpoint.save(str(tmp_path / "w"), pm)  # weights only
    with pytest.raises(ValueError, match="no optimizer state"):
        moreh_ap.checkpoint.load(str(tmp_path / "w"), pm, opt)
    other = moreh_ap.parallelize(build_model("gpt2", 0), ParallelConfig.from_dict(ONE), measure=False)
    with pytest.raises(ValueError, match="another model"):
        moreh_ap.checkpoint.load(str(tmp_path / "w"), other)
