# Own loss in any output (ModelOutput / dict / tuple / scalar), the caller's num_items_in_batch, loss outside: one process.
import json
from collections import namedtuple

import pytest
import torch

from moreh_ap.errors import InputError
from moreh_ap.models import NanoGPTAdapter, find_adapter
from moreh_ap.oneline.loss_mode import AdapterMismatchError, _checksum, decide_loss_mode
from moreh_ap.option import enable_advanced_parallelization
from moreh_ap.runtime.inputs import prepare_inputs
from moreh_ap.runtime.outputs import find_loss

from tests.helpers.loss_scripts import GPT_CFG, SCRIPTS, build_model, reference
from tests.helpers.script_models import gpt_batch

pytestmark = pytest.mark.timeout(300)

Pair = namedtuple("Pair", "logits loss")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    from moreh_ap.oneline.state import STATE

    monkeypatch.chdir(tmp_path)
    yield tmp_path
    STATE.engines.clear()  # an engine holds its model: the weak keys would keep this test's model engaged


def test_find_loss_in_every_structure_and_rebuild_keeps_it():
    from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutput

    loss, logits = torch.tensor(1.5), torch.randn(2, 3)
    new = torch.tensor(7.0)
    cases = [
        (loss, lambda o: o),
        (SequenceClassifierOutput(loss=loss, logits=logits), lambda o: o.loss),
        ({"logits": logits, "loss": loss}, lambda o: o["loss"]),
        ((logits, loss), lambda o: o[1]),
        ([logits, loss, logits], lambda o: o[1]),
        (Pair(logits, loss), lambda o: o.loss),
    ]
    for out, get in cases:
        where = find_loss(out)
        assert where is not None and where.take(out) is get(out)
        rebuilt = where.rebuild(new)
        assert type(rebuilt) is type(out) and get(rebuilt) is new
        if not isinstance(out, torch.Tensor):  # the other entries are None
            others = [v for v in (rebuilt.values() if isinstance(rebuilt, dict) else rebuilt) if v is not new]
            assert all(v is None for v in others), rebuilt
    assert find_loss(CausalLMOutputWithPast(logits=logits)) is None  # no loss given
    assert find_loss(logits) is None and find_loss((logits, logits)) is None and find_loss({"logits": logits}) is None
    assert find_loss((logits, torch.tensor(3))) is None  # an int scalar is not a loss
    with pytest.raises(InputError, match=r"no scalar loss at output\[1\]"):
        find_loss((logits, loss)).take((logits, None))


def test_prepare_inputs_takes_the_callers_count_and_the_adapter_target():
    ids = torch.ones(4, 6, dtype=torch.long)
    got = prepare_inputs((), None, {"input_ids": ids, "labels": ids, "num_items_in_batch": torch.tensor(11)},
                         hf_model=True, pipelined=False, has_loss_fn=False)
    assert got.hf_labels and got.num_items == 11 and "num_items_in_batch" not in got.kwargs
    own = prepare_inputs((ids, ids), None, {}, hf_model=False, pipelined=False, has_loss_fn=False, output_loss=True,
                         target_arg=("targets", 1))
    assert own.from_output and len(own.args) == 2 and own.target is None  # pp = 1: the whole call to the model
    for args, kwargs in (((ids, ids + 1), {}), ((ids,), {"targets": ids + 1})):
        piped = prepare_inputs(args, None, kwargs, hf_model=False, pipelined=True, has_loss_fn=False,
                               output_loss=True, target_arg=("targets", 1))
        assert len(piped.args) == 1 and torch.equal(piped.target, ids + 1) and not piped.kwargs
    with pytest.raises(InputError, match="'targets' argument"):
        prepare_inputs((ids,), None, {}, hf_model=False, pipelined=True, has_loss_fn=False, output_loss=True,
                       target_arg=("targets", 1))
    with pytest.raises(InputError, match="num_stages=1"):
        prepare_inputs((ids,), None, {}, hf_model=False, pipelined=True, has_loss_fn=False, output_loss=True)


def test_input_checksum_sees_values_order_and_shapes():
    x = torch.arange(12.0).reshape(3, 4)
    base = _checksum((x,), {"y": torch.tensor([1, 2, 3])}, device=torch.device("cpu"))
    assert torch.equal(base, _checksum((x.clone(),), {"y": torch.tensor([1, 2, 3])}, device=torch.device("cpu")))
    for other in [((x.flip(0),), {"y": torch.tensor([1, 2, 3])}), ((x,), {"y": torch.tensor([1, 3, 2])}),
                  ((x[:2],), {"y": torch.tensor([1, 2, 3])}), ((x + 1e-3,), {"y": torch.tensor([1, 2, 3])})]:
        assert not torch.equal(base, _checksum(*other, device=torch.device("cpu")))


def test_nanogpt_split_computes_the_models_loss():
    model = build_model("gpt", 0)
    adapter = find_adapter(model)
    assert isinstance(adapter, NanoGPTAdapter) and adapter.supports_pipeline
    x, y = gpt_batch(torch.Generator().manual_seed(0), n=2, cfg=GPT_CFG)
    first, _ = adapter.build_stage(0, 2, first=True, last=False)
    last, _ = adapter.build_stage(2, 4, first=False, last=True)
    assert first.wte.weight is last.lm_head.weight  # the tie spans the stages
    torch.testing.assert_close(adapter.stage_loss()(last(first(x)), y), model(x, y)[1], rtol=0, atol=0)
    mode = decide_loss_mode(model, (x, y), {}, adapter=adapter)
    assert mode.kind == "own" and mode.pipeline and mode.location.key == 1
    scaled = build_model("scaled_gpt", 0)
    with pytest.raises(AdapterMismatchError, match="num_stages 1"):
        decide_loss_mode(scaled, (x, y), {}, adapter=find_adapter(scaled))


def test_detection_forward_leaves_rng_and_batchnorm_statistics_alone():
    from tests.helpers.script_models import SmallCNN

    model = SmallCNN(batch_norm=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    mode = decide_loss_mode(model, (x,), {}, adapter=find_adapter(model))
    assert mode.outside and not mode.pipeline and "no loss" in mode.why
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _run_oneline(monkeypatch, case: dict) -> dict:
    monkeypatch.setenv("MOREH_AP_CONFIG", json.dumps({"mixed_precision": False, **case["config"]}))
    enable_advanced_parallelization(mixed_precision=False)
    model = build_model(case.get("model", case["script"]), case.get("seed", 0))
    return SCRIPTS[case["script"]](model, **case.get("kwargs", {}))


def _assert_same(got: dict, want: dict, *, tol: float) -> None:
    for key in ("loss", "norm", "acc"):
        if key in want:
            assert got[key] == pytest.approx(want[key], rel=tol, abs=tol), key
    assert got["state"].keys() == want["state"].keys()
    for k, ref in want["state"].items():
        diff = (got["state"][k].double() - ref.double())
        # per tensor (Adam(W) turns an fp32 summation-order difference on an element whose gradient is ~0 into
        # an update difference of up to lr on that element; a wrong loss scale moves every weight by ~lr)
        assert diff.norm() <= tol * ref.double().norm() + tol, (k, diff.norm() / ref.double().norm())
        assert diff.abs().max() <= 20 * tol, (k, diff.abs().max())


ONE_PROCESS = {  # micro-batches change fp32 summation order; AdamW turns that into ~1e-6 weight differences
    "gpt-tuple-2mb": {"tol": 1e-5, "script": "gpt", "config": {"num_stages": 1, "num_micro_batches": 2, "batch_per_device": 2}},
    "dict-2mb": {"script": "dict", "config": {"num_stages": 1, "num_micro_batches": 2, "batch_per_device": 4}},
    "hf-num-items-2mb": {"tol": 1e-5, "script": "hf", "config": {"num_stages": 1, "num_micro_batches": 2, "batch_per_device": 2}},
    "cnn-outside": {"script": "cnn", "config": {"num_stages": 1, "num_micro_batches": 1, "batch_per_device": 8}},
}


@pytest.mark.parametrize("name", list(ONE_PROCESS))
def test_one_process_matches_plain_training(name, monkeypatch, in_tmp):
    case = ONE_PROCESS[name]
    want = reference(case)
    got = _run_oneline(monkeypatch, case)
    _assert_same(got, want, tol=case.get("tol", 1e-6))
    if case["script"] == "gpt":
        assert got["structure"] == [True, ()]  # (None, loss): logits are not returned in training
        assert got["eval"] == pytest.approx(want["eval"], rel=1e-5)
    if case["script"] == "dict":
        assert got["keys"] == ["logits", "loss"] and got["logits_none"]
    if case["script"] == "cnn":
        assert got["shape"] == want["shape"]
        torch.testing.assert_close(got["eval_out"], want["eval_out"], rtol=1e-6, atol=1e-6)


def test_loss_outside_refuses_pinned_micro_batches(monkeypatch, in_tmp):
    case = {"script": "cnn", "config": {"num_stages": 1, "num_micro_batches": 2, "batch_per_device": 4}}
    with pytest.raises(ValueError, match="num_micro_batches : 1"):
        _run_oneline(monkeypatch, case)


def test_own_loss_model_without_split_refuses_pinned_pipeline(monkeypatch, in_tmp):
    case = {"script": "dict", "config": {"num_stages": 2, "num_micro_batches": 2, "batch_per_device": 4}}
    with pytest.raises(ValueError, match="cannot be pipelined"):
        _run_oneline(monkeypatch, case)


def test_loss_outside_refuses_a_pinned_pipeline(monkeypatch, in_tmp):
    case = {"script": "cnn", "config": {"num_stages": 2, "num_micro_batches": 1, "batch_per_device": 4}}
    with pytest.raises(ValueError, match=r"num_stages : 2, but this model cannot be pipelined \(.*holds no loss"):
        _run_oneline(monkeypatch, case)


def test_compiled_root_is_unwrapped_and_trains_as_one_device(monkeypatch, in_tmp):
    from moreh_ap.oneline.state import STATE

    case = {"script": "dict", "config": {"num_stages": 1, "num_micro_batches": 2, "batch_per_device": 4}}
    want = reference(case)
    monkeypatch.setenv("MOREH_AP_CONFIG", json.dumps({"mixed_precision": False, **case["config"]}))
    enable_advanced_parallelization(mixed_precision=False)
    inner = build_model("dict", 0)
    compiled = torch.compile(inner)
    got = SCRIPTS["dict"](compiled)
    assert STATE.engines[compiled] is STATE.engines[inner]
    assert type(compiled).__name__ == "OptimizedModule" and isinstance(inner, type(build_model("dict", 0)))
    _assert_same(got, want, tol=1e-6)
