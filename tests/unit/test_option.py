# Tests of moreh_ap.option: enable/disable, the seven keywords, and their errors.
import pytest

import moreh_ap
from moreh_ap import option
from moreh_ap.option import APOptions


def test_defaults_and_enable():
    assert not option.is_advanced_parallelization_enabled()
    assert option.current_options() == APOptions()
    option.enable_advanced_parallelization()
    assert option.is_advanced_parallelization_enabled()
    assert option.current_options().to_dict() == {
        "pipeline_parallel": True,
        "num_stages": "auto",
        "num_micro_batches": "auto",
        "activation_recomputation": "auto",
        "distribute_parameter": "auto",
        "mixed_precision": True,
        "tensor_parallel": "auto",
    }


def test_seed_overrides_are_recorded():
    option.enable_advanced_parallelization(
        num_stages=2, num_micro_batches=32, activation_recomputation=True, distribute_parameter=True
    )
    opts = option.current_options()
    assert (opts.num_stages, opts.num_micro_batches) == (2, 32)
    assert opts.activation_recomputation is True and opts.distribute_parameter is True


def test_disable_resets():
    option.enable_advanced_parallelization(num_stages=4)
    option.disable_advanced_parallelization()
    assert not option.is_advanced_parallelization_enabled()
    assert option.current_options() == APOptions()


def test_torch_moreh_is_the_package():
    import torch

    assert torch.moreh is moreh_ap
    assert torch.moreh.option.enable_advanced_parallelization is option.enable_advanced_parallelization


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"num_stages": 0}, ValueError, ["num_stages", "'auto' or an integer >= 1"]),
        ({"num_stages": "Auto"}, ValueError, ["num_stages", "'Auto'"]),
        ({"num_stages": 3.5}, TypeError, ["num_stages", "3.5"]),
        ({"num_stages": True}, TypeError, ["num_stages"]),
        ({"num_micro_batches": -1}, ValueError, ["num_micro_batches"]),
        ({"num_micro_batches": "4"}, ValueError, ["num_micro_batches", "'auto' or an integer"]),
        ({"activation_recomputation": "yes"}, ValueError, ["activation_recomputation", "'auto', True or False"]),
        ({"activation_recomputation": 1}, TypeError, ["activation_recomputation"]),
        ({"distribute_parameter": None}, TypeError, ["distribute_parameter"]),
        ({"pipeline_parallel": "auto"}, TypeError, ["pipeline_parallel", "True or False"]),
        ({"mixed_precision": 1}, TypeError, ["mixed_precision", "True or False"]),
        ({"num_stage": 2}, TypeError, ["'num_stage'", "accepted keywords", "num_stages"]),
    ],
)
def test_bad_keywords_raise_at_the_call(kwargs, exc, words):
    with pytest.raises(exc) as info:
        option.enable_advanced_parallelization(**kwargs)
    for word in words:
        assert word in str(info.value)
    assert not option.is_advanced_parallelization_enabled()


def test_env_zero_keeps_it_off(monkeypatch):
    monkeypatch.setenv("MOREH_ENABLE_ADVANCED_PARALLELIZATION", "0")
    option.enable_advanced_parallelization()
    assert not option.is_advanced_parallelization_enabled()


def test_env_one_enables_without_call(monkeypatch):
    monkeypatch.setenv("MOREH_ENABLE_ADVANCED_PARALLELIZATION", "1")
    option._enable_from_environment()
    assert option.is_advanced_parallelization_enabled()


def test_enable_validates_env(monkeypatch):
    monkeypatch.setenv("MOREH_ADVANCED_PARALLELIZATION_DETAILED_LOG", "3")
    with pytest.raises(ValueError, match="MOREH_ADVANCED_PARALLELIZATION_DETAILED_LOG"):
        option.enable_advanced_parallelization()


def test_no_feasible_config_error_is_a_runtime_error():
    from moreh_ap.errors import NoFeasibleConfigError

    assert issubclass(moreh_ap.NoFeasibleConfigError, RuntimeError)
    assert moreh_ap.NoFeasibleConfigError is NoFeasibleConfigError
