# The resume matrix of the one-line mode: save after 4 steps, continue in new processes, equal to one device.
"""Each saved case trains 4 steps with the one line (2 gloo ranks, config pinned by ``MOREH_AP_CONFIG``) and
rank 0 writes ``torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)``. A NEW
launch builds the model (other weights on every rank) and optimizer, loads both state dicts BEFORE the
line engages (plain torch; carried at engagement) or AFTER (one training forward engages first), and
trains 2 more steps. The 6 losses, the final weights and the final optimizer state (one-device format,
rank 0) equal 6 uninterrupted steps on one device: fp32, ``assert_close(rtol=1e-4, atol=1e-5)``. Ranks
other than 0 get meta placeholders from ``state_dict()``. One launch saves, one resumes every case (both shared
with test_checkpoint_dcp.py's cases); the pp 2 file is also continued on one device with plain ``torch.optim.AdamW``.
"""
from __future__ import annotations

import pytest
import torch

from moreh_ap.config import ParallelConfig
from tests.helpers.dist_harness import register
from tests.helpers.resume_cases import (LOAD_GROUP, RESUME_STEPS, SAVE_GROUP, SAVE_STEPS, batch, build_model,
                                        build_optimizer, checkpoint_runs, reference)

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(500)]

RUNNER = "tests.helpers.resume_cases:run"
PP2 = ParallelConfig(num_stages=2, num_micro_batches=2, batch_per_device=2, mixed_precision=False).to_dict()
ZERO3 = ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=2, distribute_param=True,
                       distribute_low_prec_param=True, mixed_precision=False).to_dict()
SAVED = {  # id: (model, optimizer, config)
    "llama-adamw-pp2": ("llama", "adamw", PP2),
    "llama-adamw-zero3": ("llama", "adamw", ZERO3),
    "gpt2-lamb-pp2": ("gpt2", "lamb", PP2),  # tied wte / lm_head on both pipeline ranks; FusedLAMB
}
RESUMED = {  # id: (saved case, config, when the state dicts are loaded)
    "pp2-to-pp2-before": ("llama-adamw-pp2", PP2, "before"),
    "zero3-to-zero3-before": ("llama-adamw-zero3", ZERO3, "before"),
    "pp2-to-zero3-before": ("llama-adamw-pp2", ZERO3, "before"),
    "zero3-to-pp2-after": ("llama-adamw-zero3", PP2, "after"),
    "gpt2-lamb-pp2-to-zero3-after": ("gpt2-lamb-pp2", ZERO3, "after"),
    "gpt2-lamb-pp2-to-pp2-after": ("gpt2-lamb-pp2", PP2, "after"),  # both tied copies filled by load_state_dict
}
register(SAVE_GROUP, [{"id": sid, "runner": RUNNER, "world": 2, "phase": "save", "model": m, "optim": o, "cfg": cfg,
                        "file": f"{sid}.pt"} for sid, (m, o, cfg) in SAVED.items()])
register(LOAD_GROUP, [{"id": rid, "runner": RUNNER, "world": 2, "phase": "resume", "model": SAVED[sid][0],
                       "optim": SAVED[sid][1], "cfg": cfg, "when": when, "file": f"{sid}.pt"}
                      for rid, (sid, cfg, when) in RESUMED.items()])  # one save and one load launch with the DCP tests


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


def _runs(tmp_path_factory) -> dict:
    return checkpoint_runs(tmp_path_factory)


def _assert_optimizer_equal(have: dict, want: dict) -> None:
    assert have["param_groups"] == want["param_groups"]
    assert sorted(have["state"]) == sorted(want["state"])
    for i, st in want["state"].items():
        assert sorted(have["state"][i]) == sorted(st)
        for k, v in st.items():
            assert have["state"][i][k].shape == v.shape, (i, k)  # `step` stays 0-dim
            _close(have["state"][i][k], v, f"optimizer state {i}.{k}")


@pytest.mark.parametrize("rid", list(RESUMED))
def test_resumed_run_equals_the_uninterrupted_one(rid, tmp_path_factory):
    runs = _runs(tmp_path_factory)
    sid, _, when = RESUMED[rid]
    model_name, optim, _ = SAVED[sid]
    ref = reference({"model": model_name, "optim": optim})
    saved, got = runs["save"][sid], runs["load"][rid]
    assert saved["ranks"][0]["same_keys"] and saved["ranks"][1]["placeholders"]  # rank 1: meta, same structure
    for r in got["ranks"]:
        _close(torch.tensor(saved["losses"] + r["losses"]), torch.tensor(ref["losses"]), "losses")
    assert got["ranks"][1]["placeholders"]
    if when == "after":
        assert got["ranks"][0]["engaged_first"]
    assert list(got["state"]) == list(ref["state"])  # one device's keys and order (GPT-2: both tied names)
    for k, v in ref["state"].items():
        _close(got["state"][k], v, k)
    _assert_optimizer_equal(got["optimizer"], ref["optimizer"])


def test_saved_file_continues_on_one_device_with_plain_adamw(tmp_path_factory):
    runs = _runs(tmp_path_factory)
    ref = reference({"model": "llama", "optim": "adamw"})
    ckpt = torch.load(runs["root"] / "llama-adamw-pp2.pt", weights_only=True)
    model = build_model("llama", 10)
    opt = build_optimizer("adamw", model)
    assert type(opt) is torch.optim.AdamW
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    losses = []
    for step in range(SAVE_STEPS, SAVE_STEPS + RESUME_STEPS):
        ids, labels = batch(step)
        loss = model(ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    _close(torch.tensor(runs["save"]["llama-adamw-pp2"]["losses"] + losses), torch.tensor(ref["losses"]), "losses")
    for k, v in ref["state"].items():
        _close(model.state_dict()[k], v, k)
    _assert_optimizer_equal(opt.state_dict(), ref["optimizer"])
