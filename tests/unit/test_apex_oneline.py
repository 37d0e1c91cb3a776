# apex amp under the one-line AP in one process: O2's masters, their state dicts, the refusals, the hooks amp sets.
import copy
import json

import pytest
import torch
import torch.nn as nn

from moreh_ap.apex import amp
from moreh_ap.apex.amp import loss_casts
from moreh_ap.oneline.state import STATE
from moreh_ap.option import enable_advanced_parallelization
from moreh_ap.precision_hooks import (agree_overflow, autocast_dtype, autocast_like, is_master, loss_scale_of,
                                      model_param, precision_owner, set_overflow_sync)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _clean(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # engagement writes advanced_parallelization_selected_config.dump
    STATE.engines.clear()
    yield
    STATE.engines.clear()
    loss_casts.uninstall()


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _batches(n: int):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)) for _ in range(n)]


def _step(model, opt, x, y) -> float:
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    with amp.scale_loss(loss, opt) as scaled:
        scaled.backward()
    opt.step()
    return loss.item()


def _o2(seed: int = 0):
    model = _net(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return amp.initialize(model, opt, opt_level="O2", verbosity=0)


def _pin(monkeypatch) -> None:
    monkeypatch.setenv("MOREH_AP_CONFIG", json.dumps({"num_stages": 1, "num_micro_batches": 1,
                                                      "batch_per_device": 4}))


def test_o2_under_ap_trains_saves_and_loads_its_masters_state_like_one_device(monkeypatch):
    """Masters made after engagement stand for the rebound parameters: the one-device optimizer state dict
    (torch's format over the masters, fp32 moments) comes out and goes back in; training continues the same."""
    batches = _batches(4)
    model, opt = _o2()
    ref_losses = [_step(model, opt, x, y) for x, y in batches[:3]]
    ref_sd = copy.deepcopy(opt.state_dict())  # torch's state_dict holds the live tensors
    opt.load_state_dict(copy.deepcopy(ref_sd))  # torch keeps the loaded tensors: keep ref_sd apart
    ref_losses.append(_step(model, opt, *batches[3]))
    ref_model, ref_final = model.state_dict(), copy.deepcopy(opt.state_dict())

    _pin(monkeypatch)
    enable_advanced_parallelization()  # mixed_precision left at its default: amp's precision wins
    model, opt = _o2()
    losses = [_step(model, opt, x, y) for x, y in batches[:3]]
    assert model in STATE.engines and not STATE.engines[model].pm.config.mixed_precision
    assert all(is_master(p) and model_param(p).dtype == torch.float16 for p in opt.param_groups[0]["params"])
    sd = opt.state_dict()
    assert sd["param_groups"] == ref_sd["param_groups"] and sd["state"].keys() == ref_sd["state"].keys()
    for i, st in ref_sd["state"].items():
        assert st["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(sd["state"][i], st, rtol=0, atol=0)
    opt.load_state_dict(sd)  # the one-device format, laid back onto the masters
    losses.append(_step(model, opt, *batches[3]))
    assert losses == ref_losses
    got = model.state_dict()
    assert all(v.dtype == torch.float32 for v in got.values())  # O2's hook: fp32, as on one device
    torch.testing.assert_close(got, ref_model, rtol=0, atol=0)
    torch.testing.assert_close(opt.state_dict()["state"], ref_final["state"], rtol=0, atol=0)


def test_o2_masters_made_before_engagement_are_released_and_made_again(monkeypatch):
    """``optimizer.zero_grad()`` before the first forward makes the masters before AP engages: AP finds the
    optimizer through them, puts the model parameters back, and the next lazy init masters the rebound ones."""
    batches = _batches(2)
    model, opt = _o2()
    opt.zero_grad()
    ref = [_step(model, opt, x, y) for x, y in batches]
    _pin(monkeypatch)
    enable_advanced_parallelization()
    model, opt = _o2()
    opt.zero_grad()
    before = list(opt.param_groups[0]["params"])
    assert all(is_master(p) for p in before)
    assert [_step(model, opt, x, y) for x, y in batches] == ref
    assert model in STATE.engines
    after = opt.param_groups[0]["params"]
    assert all(is_master(p) for p in after) and not {id(p) for p in after} & {id(p) for p in before}


def test_o2_masters_updated_before_ap_engages_are_refused(monkeypatch):
    model, opt = _o2()
    x, y = _batches(1)[0]
    _step(model, opt, x, y)  # one device: the fp32 masters now hold more than the fp16 model
    _pin(monkeypatch)
    enable_advanced_parallelization()
    with pytest.raises(NotImplementedError, match=r"amp O2 .*advanced parallelization.*before the first"):
        model(x)


def test_amp_marks_the_model_it_casts_and_autocasts():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = amp.initialize(model, opt, opt_level="O1", verbosity=0)
    assert precision_owner(model) == "apex amp O1" and precision_owner(_net()) is None
    assert autocast_dtype(model) == torch.float16 and autocast_dtype(_net()) is None
    stage = nn.Linear(8, 4)  # a pipeline stage built from the model's parts runs under the same autocast
    autocast_like(stage, torch.float16)
    assert stage(torch.randn(2, 8)).dtype == torch.float16 and autocast_dtype(stage) == torch.float16
    # AP seeds a model's own backward with amp's current loss scale from the first step
    assert loss_scale_of(opt) == amp.state_dict()["loss_scaler0"]["loss_scale"] == 2.0**16
    model, opt = amp.initialize(_net(), torch.optim.SGD(_net().parameters(), lr=0.1), enabled=False, verbosity=0)
    assert loss_scale_of(opt) == 1.0  # amp disabled: no scale


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_an_overflow_found_on_another_rank_skips_the_step_here(level):
    """The ranks agree on an overflow (AP's sync): finite gradients here, an inf elsewhere -> skip, halve."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = amp.initialize(model, opt, opt_level=level, verbosity=0)
    assert agree_overflow(opt, False) is False  # no sync set: this rank's own finding
    seen = []
    set_overflow_sync(opt, lambda found: seen.append(found) or True)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batches(1)[0]
    _step(model, opt, x, y)
    assert seen == [False] and amp.state_dict()["loss_scaler0"]["loss_scale"] == 2.0**15
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_o1_nanogpt_passes_the_pipeline_split_check_under_autocast():
    """AP checks a nanoGPT-style split against the model's own forward; under O1 that forward is autocast, and
    so is the split's stage (else the fp32 split and the fp16 forward differ and the check refuses the model)."""
    from moreh_ap.models import find_adapter
    from moreh_ap.oneline.loss_mode import decide_loss_mode
    from tests.helpers.loss_scripts import GPT_CFG, build_model
    from tests.helpers.script_models import gpt_batch

    model = build_model("gpt", 0)
    with torch.no_grad():  # large logits: the fp16 forward's loss differs from an fp32 split's beyond the check's 1e-4
        for p in model.parameters():
            p.mul_(4.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = amp.initialize(model, opt, opt_level="O1", verbosity=0)
    x, y = gpt_batch(torch.Generator().manual_seed(0), n=2, cfg=GPT_CFG)
    mode = decide_loss_mode(model, (x, y), {}, adapter=find_adapter(model))
    assert mode.kind == "own" and mode.pipeline
