# The one-line mode in one process: hooks, root detection, engagement errors, config choice, one-device semantics.
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moreh_ap import oneline
from moreh_ap.config import ParallelConfig
from moreh_ap.oneline import choose, probe
from moreh_ap.oneline.state import STATE
from moreh_ap.option import APOptions, enable_advanced_parallelization

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # engagement writes advanced_parallelization_selected_config.dump
    return tmp_path


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def _batch(seed, n=4, seq=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, seq), generator=g)
    labels = ids.clone()
    labels[:, -2:] = -100
    return ids, labels


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only acceptance of .cuda()")
def test_cuda_calls_stay_on_cpu_while_ap_is_requested():
    with pytest.raises((AssertionError, RuntimeError)):
        torch.ones(1).cuda()  # plain torch on a CPU build
    enable_advanced_parallelization()
    t = torch.ones(3)
    assert t.cuda() is t
    lin = nn.Linear(2, 2)
    assert lin.cuda() is lin and lin.weight.device.type == "cpu"
    assert lin.to("cuda", torch.float64) is lin
    assert lin.weight.dtype == torch.float64 and lin.weight.device.type == "cpu"
    assert lin.to(torch.float32).weight.dtype == torch.float32  # non-cuda moves are plain torch
    from moreh_ap.option import disable_advanced_parallelization

    disable_advanced_parallelization()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.ones(1).cuda()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only acceptance")
def test_env_zero_keeps_ap_off_but_accepts_cuda_on_cpu(monkeypatch):
    monkeypatch.setenv("MOREH_ENABLE_ADVANCED_PARALLELIZATION", "0")
    enable_advanced_parallelization()
    assert nn.Module.__call__ is not probe.probe_call  # no engagement: plain one-device training
    t = torch.ones(2)
    assert t.cuda() is t


def test_no_hooks_without_enable():
    assert nn.Module.__call__ is not probe.probe_call
    assert not oneline.is_engaged()


def test_model_without_own_loss_engages_with_the_loss_outside(in_tmp, monkeypatch):
    """No loss in the output: the call returns the model's outputs (the loss is the script's)."""
    monkeypatch.setenv("MOREH_AP_CONFIG", json.dumps({"num_stages": 1, "num_micro_batches": 1, "batch_per_device": 2}))
    enable_advanced_parallelization()
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # noqa: F841 (kept alive)
    assert model(torch.ones(2, 4)).shape == (2, 1)
    STATE.engines.clear()


class _Engaged(Exception):
    pass


def test_root_is_the_outermost_trainable_module_and_eval_does_not_engage(in_tmp, monkeypatch):
    enable_advanced_parallelization()
    inner = nn.Linear(4, 4)
    outer = nn.Sequential(inner, nn.ReLU())
    calls = []

    def fake_engage(root, args, kwargs):
        calls.append(root)
        raise _Engaged

    monkeypatch.setattr(probe, "engage", fake_engage)
    outer(torch.ones(1, 4))  # no optimizer yet: runs plain, warns once
    assert calls == []
    opt = torch.optim.SGD(inner.parameters(), lr=0.1)  # noqa: F841
    outer.eval()
    outer(torch.ones(1, 4))  # eval mode: not a training forward
    assert calls == []
    outer.train()
    with pytest.raises(_Engaged):
        outer(torch.ones(1, 4))
    assert calls == [outer]  # the enclosing module, not the Linear that holds the parameters


def test_one_process_engagement_matches_plain_training(in_tmp):
    """World 1 with AP on (fp32) = plain training: loss, (loss / 2) accumulation, clip norm, weights."""
    from transformers import LlamaForCausalLM

    ref = _tiny_llama()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ref_log = []
    for step in range(3):
        for half in range(2):
            ids, labels = _batch(10 * step + half)
            out = ref(ids, labels=labels)
            (out.loss / 2).backward()
            ref_log.append(out.loss.item())
        ref_log.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)))
        ref_opt.step()
        ref.zero_grad(set_to_none=True)

    enable_advanced_parallelization(mixed_precision=False)
    model = _tiny_llama()
    model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    log = []
    for step in range(3):
        for half in range(2):
            ids, labels = _batch(10 * step + half)
            out = model(ids.cuda(), labels=labels.cuda())
            (out[0] / 2).backward()
            log.append(out.loss.item())
        log.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)))
        opt.step()
        model.zero_grad(set_to_none=True)
    assert oneline.is_engaged() and oneline.engaged_model() is model
    assert type(model).__name__ == "LlamaForCausalLM" and isinstance(model, LlamaForCausalLM)
    assert nn.Module.__call__ is not probe.probe_call
    assert log == pytest.approx(ref_log, rel=1e-5)
    assert (in_tmp / oneline.DUMP_FILE).read_text().startswith("num_stages : 1")
    got, want = model.state_dict(), ref.state_dict()
    assert type(got) is type(want) and got.keys() == want.keys()  # an OrderedDict, as one device gives
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    model.eval()
    with torch.no_grad():
        ids, labels = _batch(99)
        assert model(ids, labels=labels).loss.item() == pytest.approx(ref.eval()(ids, labels=labels).loss.item(),
                                                                        rel=1e-4)


PINNED = json.dumps({"num_stages": 1, "num_micro_batches": 1, "batch_per_device": 4, "mixed_precision": False})
"""One device, the tests' batch of 4: pinned where the one-line mode's semantics are tested, not planning (a fresh
cache's calibration costs seconds; test_one_process_engagement_matches_plain_training plans)."""


def test_forward_without_backward_leaves_gradients_alone(in_tmp, monkeypatch):
    monkeypatch.setenv("MOREH_AP_CONFIG", PINNED)
    enable_advanced_parallelization(mixed_precision=False)
    model = _tiny_llama()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # noqa: F841 (kept alive)
    ids, labels = _batch(1)
    model(ids, labels=labels)  # engages; no backward
    assert all(p.grad is None for p in model.parameters())
    out = model(ids, labels=labels)
    (out.loss * 3).backward()
    g3 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model(ids, labels=labels).loss.backward()
    for a, b in zip(g3, model.parameters()):
        torch.testing.assert_close(a, 3 * b.grad, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- config choice (pure)
def test_enable_hands_its_options_to_the_oneline_mode():
    """The options travel as an argument: option -> oneline.install(options=...) -> the planner's call."""
    state = oneline.state.STATE
    enable_advanced_parallelization(num_stages=2, mixed_precision=False)
    assert state.options == APOptions(num_stages=2, mixed_precision=False)
    enable_advanced_parallelization(num_micro_batches=4)  # the latest call wins, hooks already in place
    assert state.options == APOptions(num_micro_batches=4)
    from moreh_ap.option import disable_advanced_parallelization

    disable_advanced_parallelization()
    assert state.options == APOptions() and not state.installed


def test_choose_config_plans_with_the_given_options(monkeypatch, in_tmp):
    seen = {}
    want = ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=4)

    def fake_plan(root, args, kwargs, *, options, optimizer, dump):
        seen.update(options=options, optimizer=optimizer, dump=dump)
        return SimpleNamespace(config=want)

    monkeypatch.setattr(choose, "plan", fake_plan)
    got = choose.choose_config(nn.Linear(2, 2), (), {}, optimizer="sgd", options=APOptions(num_stages=3),
                               recompute_fixed=True)
    assert got == want
    assert seen == {"options": APOptions(num_stages=3, activation_recomputation=True), "optimizer": "sgd",
                    "dump": True}


def test_pinned_config_from_json_line_or_dump_file(monkeypatch, tmp_path):
    line = "num_stages : 2, num_micro_batches : 4, batch_per_device : 1, No TP, recomputation : 0, " \
           "distribute_param : true, distribute_low_prec_param : false"
    monkeypatch.setenv(oneline.CONFIG_ENV, line)
    cfg = choose.pinned_config(APOptions(mixed_precision=False))
    assert (cfg.num_stages, cfg.num_micro_batches, cfg.distribute_param, cfg.mixed_precision) == (2, 4, True, False)
    dump = tmp_path / "advanced_parallelization_selected_config.dump"
    dump.write_text(line + "\n")
    monkeypatch.setenv(oneline.CONFIG_ENV, str(dump))
    assert choose.pinned_config(APOptions()).num_micro_batches == 4
    want = ParallelConfig(num_stages=1, num_micro_batches=2, batch_per_device=3, schedule="GPipe")
    monkeypatch.setenv(oneline.CONFIG_ENV, json.dumps(want.to_dict()))
    assert choose.pinned_config(APOptions()) == want
    monkeypatch.setenv(oneline.CONFIG_ENV, "{not json")
    with pytest.raises(ValueError, match="MOREH_AP_CONFIG"):
        choose.pinned_config(APOptions())


def test_optimizer_created_before_enable_is_found(in_tmp, monkeypatch):
    monkeypatch.setenv("MOREH_AP_CONFIG", PINNED)
    model = _tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # before the line
    enable_advanced_parallelization(mixed_precision=False)
    ids, labels = _batch(0)
    model(ids, labels=labels).loss.backward()
    opt.step()
    assert oneline.is_engaged() and model in STATE.engines  # the class was swapped: AP runs this model
    STATE.engines.pop(model)  # the engine holds the model: later tests expect no engaged model


def test_an_engaged_model_is_freed_when_the_script_drops_it(in_tmp, monkeypatch):
    """The engine lives on its root (not in a table that keeps roots alive): once the script drops the model
    and its optimizer, both are freed; a deep copy of an engaged model carries no engine."""
    import copy
    import gc
    import weakref

    monkeypatch.setenv("MOREH_AP_CONFIG", json.dumps({"num_stages": 1, "num_micro_batches": 1, "batch_per_device": 4,
                                                      "mixed_precision": False}))
    STATE.engines.clear()  # earlier tests' models
    model = _tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    enable_advanced_parallelization(mixed_precision=False)
    ids, labels = _batch(0)
    model(ids, labels=labels).loss.backward()
    opt.step()
    assert model in STATE.engines and oneline.engaged_model() is model
    twin = copy.deepcopy(model)
    assert twin not in STATE.engines and model in STATE.engines
    gone = weakref.ref(model)
    del model, opt, twin
    gc.collect()
    assert gone() is None and oneline.engaged_model() is None


@pytest.mark.parametrize("prefix", ["", "MOREH_AP_"])  # torchrun's RANK/WORLD_SIZE or the self-launcher's
@pytest.mark.parametrize("rank", [0, 1])
def test_a_step_before_engagement_stops_every_rank_but_0(rank, prefix, monkeypatch, in_tmp, capfd):
    monkeypatch.setenv(prefix + "WORLD_SIZE", "2")
    monkeypatch.setenv(prefix + "RANK", str(rank))
    monkeypatch.setattr(STATE, "warned", set())  # the once-only warning, fresh for each case
    enable_advanced_parallelization()
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.eval()
    model(torch.ones(2, 4)).sum().backward()  # eval mode: not a training forward, AP does not engage
    if rank == 1:
        with pytest.raises(oneline.APNotEngagedError, match="rank 1 stops: advanced parallelization has not "
                                                            "engaged, but SGD.step\\(\\) runs"):
            opt.step()
        return
    opt.step()  # rank 0 goes on (one device) and says why the others stopped, once
    opt.step()
    assert capfd.readouterr().err.count("each of the 2 ranks would train its own copy") == 1
    oneline.uninstall()
    monkeypatch.setenv(prefix + "RANK", "1")
    opt.step()  # the hook is gone with the line
