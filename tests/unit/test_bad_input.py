# Bad input in the one-line mode and the runtime: each raises a ValueError naming the variable/option at the user's call.
import pytest
import torch

from moreh_ap import env, oneline
from moreh_ap.config import ParallelConfig
from moreh_ap.errors import InputError
from moreh_ap.oneline import choose
from moreh_ap.oneline.state import STATE
from moreh_ap.option import APOptions, disable_advanced_parallelization, enable_advanced_parallelization
from moreh_ap.runtime.inputs import StepInputs, dp_slice

pytestmark = pytest.mark.timeout(120)

LINE = "num_stages : 1, num_micro_batches : 1, batch_per_device : 3, No TP, recomputation : 0"


def _config_cases(tmp_path):
    (tmp_path / "empty.dump").write_text("\n  \n")
    (tmp_path / "bad.dump").write_text("num_stages 1\n")
    return {
        "missing file": (str(tmp_path / "nope.dump"), "no such file"),
        "directory": (str(tmp_path), "is a directory"),
        "empty file": (str(tmp_path / "empty.dump"), "is empty"),
        "malformed file": (str(tmp_path / "bad.dump"), "malformed item"),
        "malformed line": ("num_stages : two, num_micro_batches : 1, batch_per_device : 1", "not an integer"),
        "missing field": ("num_stages : 1, num_micro_batches : 1", "'batch_per_device' missing"),
        "unknown field": ('{"num_stages": 1, "num_micro_batches": 1, "batch_per_device": 1, "stages": 2}',
                          "unknown field(s) ['stages']"),
        "bad JSON": ("{not json", "not valid JSON"),
        "JSON list": ("[1, 2]", "no such file"),
    }


@pytest.mark.parametrize("case", ["missing file", "directory", "empty file", "malformed file", "malformed line",
                                  "missing field", "unknown field", "bad JSON", "JSON list"])
def test_bad_config_env_fails_at_enable_naming_the_variable(case, monkeypatch, tmp_path):
    value, words = _config_cases(tmp_path)[case]
    monkeypatch.setenv(env.CONFIG, value)
    with pytest.raises(ValueError) as info:
        enable_advanced_parallelization()
    msg = str(info.value)
    assert msg.startswith(f"MOREH_AP_CONFIG={value!r} is not valid") and words in msg, msg
    assert "accepted: the JSON of ParallelConfig.to_dict()" in msg


def test_bad_config_env_is_ignored_when_ap_is_off(monkeypatch):
    monkeypatch.setenv(env.CONFIG, "{not json")
    monkeypatch.setenv(env.ENABLE, "0")
    enable_advanced_parallelization()  # AP stays off: nothing reads the pinned config


def test_pinned_batch_that_disagrees_with_the_real_one_names_both():
    cfg = ParallelConfig.from_moreh_line(LINE)
    choose.check_pinned_batch(cfg, 3, 1)
    with pytest.raises(ValueError) as info:
        choose.check_pinned_batch(cfg, 4, 1)
    msg = str(info.value)
    assert "MOREH_AP_CONFIG pins batch_per_device : 3" in msg and "the training batch has 4 samples" in msg
    assert "batch_per_device : 4 fits it" in msg
    two = cfg.replace(num_micro_batches=2, batch_per_device=1)
    with pytest.raises(ValueError, match="no batch_per_device fits it with dp\\(2\\) x num_micro_batches\\(2\\)"):
        choose.check_pinned_batch(two, 6, 2)


def test_pinned_batch_mismatch_raises_at_the_first_forward(monkeypatch, tmp_path):
    from tests.helpers.models import tiny_llama

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(env.CONFIG, LINE)
    enable_advanced_parallelization(mixed_precision=False)
    model = tiny_llama(layers=2)
    opt = torch.optim.AdamW(model.parameters())  # noqa: F841 (AP looks for a live optimizer)
    ids = torch.ones(4, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="pins batch_per_device : 3 .* the training batch has 4 samples"):
        model(ids, labels=ids)
    assert not (tmp_path / oneline.DUMP_FILE).exists()


def test_micro_batches_that_divide_no_replica_batch_name_the_option():
    choose.check_micro_batches(APOptions(num_micro_batches=4), 8, 2)
    with pytest.raises(ValueError) as info:
        choose.check_micro_batches(APOptions(num_micro_batches=3), 8, 2)
    msg = str(info.value)
    assert msg.startswith("enable_advanced_parallelization(num_micro_batches=3)") and "dp" not in msg
    assert "samples per replica: 4, 8" in msg and "accepted: 'auto' or one of 1, 2, 4, 8" in msg


def _inputs(batch: int, *, hf: bool) -> StepInputs:
    ids = torch.arange(batch * 4).reshape(batch, 4)
    return StepInputs(args=(ids,), kwargs={"attention_mask": torch.ones(batch, 4)}, target=ids.clone(),
                      hf_labels=hf, batch=batch)


def test_short_batch_with_labels_is_padded_with_ignored_rows():
    parts = [dp_slice(_inputs(3, hf=True), dp=2, dp_rank=r) for r in range(2)]
    assert [local for _, local in parts] == [2, 2] and parts[1][0].batch == 4
    last = parts[1][0]
    assert torch.equal(last.args[0][1], torch.arange(4)) and torch.equal(last.target[1], torch.full((4,), -100))
    assert torch.equal(last.target[0], torch.arange(8, 12))  # the real third row is kept


def test_short_batch_with_loss_fn_is_split_unevenly_at_pp1():
    parts = [dp_slice(_inputs(5, hf=False), dp=2, dp_rank=r) for r in range(2)]
    assert [local for _, local in parts] == [3, 2] and parts[0][0].batch == 5
    assert torch.equal(torch.cat([p.args[0] for p, _ in parts]), _inputs(5, hf=False).args[0])


def test_short_batch_with_loss_fn_in_a_pipeline_names_drop_last():
    with pytest.raises(InputError, match=r"drop_last=True"):
        dp_slice(_inputs(3, hf=False), dp=2, dp_rank=0, pipelined=True)
    with pytest.raises(InputError, match=r"fewer samples than dp\(2\).*drop_last=True"):
        dp_slice(_inputs(1, hf=False), dp=2, dp_rank=0)


@pytest.mark.parametrize("value", ["false", "2", "yes"])
def test_exit_on_error_accepts_only_0_or_1(value):
    with pytest.raises(ValueError, match=f"MOREH_AP_EXIT_ON_ERROR={value!r} is not valid: expected 0"):
        env.read_env({env.EXIT_ON_ERROR: value})
    assert env.exit_on_error({env.EXIT_ON_ERROR: "0"}) is False and env.exit_on_error({}) is True


def test_log_level_names_the_variable_and_the_loguru_levels():
    assert env.read_env({env.LOG_LEVEL: "debug"}).log_level == "DEBUG"
    with pytest.raises(ValueError) as info:
        env.read_env({env.LOG_LEVEL: "verbose"})
    assert "MOREH_AP_LOG_LEVEL='verbose' is not valid" in str(info.value)
    assert "TRACE, DEBUG, INFO, SUCCESS, WARNING, ERROR, CRITICAL" in str(info.value)


def test_env_only_run_with_a_bad_value_fails_at_the_first_cuda_or_optimizer(monkeypatch):
    from moreh_ap import option

    monkeypatch.setenv(env.ENABLE, "1")
    monkeypatch.setenv(env.CONFIG, "{not json")
    with pytest.raises(ValueError, match="MOREH_AP_CONFIG"):
        option._enable_from_environment()
    model = torch.nn.Linear(2, 2)
    for call in (model.cuda, lambda: model.to("cuda"), torch.zeros(1).cuda,
                 lambda: torch.optim.SGD(model.parameters(), lr=0.1)):
        with pytest.raises(ValueError, match="requested by MOREH_ENABLE_ADVANCED_PARALLELIZATION=1 but cannot "
                                             "start: MOREH_AP_CONFIG='{not json' is not valid"):
            call()
    assert model.to("cpu") is model
    disable_advanced_parallelization()
    torch.optim.SGD(model.parameters(), lr=0.1)  # the hooks are gone


def test_unwritable_working_directory_gives_one_warning_not_a_crash(monkeypatch, tmp_path, capfd):
    """The dump cannot be written (read-only working directory, simulated: the test runs as root): AP trains
    on and says so once."""
    from moreh_ap import files
    from tests.helpers.models import tiny_llama

    def refuse(*_a, **_k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    monkeypatch.setenv(env.CONFIG, LINE.replace("batch_per_device : 3", "batch_per_device : 4"))
    enable_advanced_parallelization(mixed_precision=False)
    model = tiny_llama(layers=2)
    opt = torch.optim.AdamW(model.parameters())
    ids = torch.ones(4, 8, dtype=torch.long)
    try:
        for _ in range(2):
            model(ids, labels=ids).loss.backward()
            opt.step()
        assert oneline.is_engaged() and not (tmp_path / oneline.DUMP_FILE).exists()
    finally:
        STATE.engines.pop(model, None)  # the engine holds the model: other tests expect no engaged model
    err = capfd.readouterr().err
    assert err.count(f"moreh_ap could not write {oneline.DUMP_FILE} (Permission denied)") == 1
