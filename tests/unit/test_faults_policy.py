# The pieces of the fault policy in one process: the first-failure claim, error files, the report's choice, signals.
import json
import signal
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from moreh_ap import faults, signals
from moreh_ap.launch_report import first_failure, only_interrupts
from moreh_ap.runtime.failure import failure_policy


@pytest.fixture
def group(monkeypatch):
    """A store for the claim and a one-rank all-reduce, without a process group (creating one in this process
    would change later torch.compile tests); no failure or signal state left behind."""
    store = dist.HashStore()
    monkeypatch.setattr(faults, "_store", lambda: store)
    monkeypatch.setattr(signals, "_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(signals.dist, "all_reduce", lambda tensor, op=None: None)
    try:
        yield store
    finally:
        faults._local = None
        signals._State.pending = signals._State.agreed = None


def _raised(message: str) -> BaseException:
    try:
        raise RuntimeError(message)
    except RuntimeError as exc:
        return exc


def test_the_first_claim_is_the_cause_and_its_traceback_goes_to_the_error_file(group, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        assert faults.on_step_failure(exc, "train_step", rank=0) is None
    assert "[rank 0] moreh_ap: train_step failed (RuntimeError: boom)" in capsys.readouterr().err
    data = json.loads((tmp_path / "error.json").read_text())["message"]
    assert data["message"] == "RuntimeError: boom" and 'raise RuntimeError("boom")' in data["extraInfo"]["py_callstack"]
    with pytest.raises(faults.StoppedRankError, match="train_step failed on this rank .*RuntimeError: boom"):
        faults.check_usable("save")


def test_a_rank_that_finds_an_earlier_claim_is_stopped_and_its_file_says_so(group, tmp_path, monkeypatch):
    """The peer's claim came first: this rank's error file names it, dated after it (torchrun's root cause is
    the earliest file), and the report of a self-launch puts this rank last."""
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    cause = faults.FaultRecord(rank=1, where="train_step", error="RuntimeError: boom", time=time.time())
    group.set("moreh_ap/first_failure", json.dumps({"rank": 1, "where": "train_step",
                                                      "error": "RuntimeError: boom", "time": cause.time}))
    first = faults.on_step_failure(_raised("Connection closed by peer"), "train_step", rank=0)
    assert first == cause
    data = json.loads((tmp_path / "error.json").read_text())["message"]
    assert data["message"] == "stopped: rank 1 failed first in train_step (RuntimeError: boom)"
    assert int(data["extraInfo"]["timestamp"]) >= int(cause.time) + 1
    assert data["extraInfo"][faults.STOPPED_KEY] == 1
    stopped = SimpleNamespace(exitcode=1, timestamp=int(cause.time) - 5, error_file_data={"message": data})
    failed = SimpleNamespace(exitcode=1, timestamp=int(cause.time), error_file_data={})
    killed = SimpleNamespace(exitcode=-9, timestamp=int(cause.time) - 9, error_file_data={})
    result = SimpleNamespace(failures={0: stopped, 1: killed, 2: failed})
    assert first_failure(result)[0] == 2  # not the stopped rank, not the one killed by a signal
    assert not only_interrupts(result)
    assert only_interrupts(SimpleNamespace(failures={0: SimpleNamespace(exitcode=-2), 1: SimpleNamespace(exitcode=1)}))


def test_no_store_means_this_rank_is_the_cause(monkeypatch):
    assert not dist.is_initialized()
    try:
        assert faults.on_step_failure(_raised("x"), "forward", rank=3) is None
        assert faults.known_failure().rank == 3
    finally:
        faults._local = None


def test_the_failure_policy_raises_to_the_caller_with_the_hint_as_a_note():
    with pytest.raises(AttributeError) as info, failure_policy("train_step", hint=lambda exc: "hint: skip None\n"):
        raise AttributeError("'NoneType' object has no attribute 'x'")
    assert info.value.__notes__ == ["hint: skip None"]


def test_a_held_signal_is_agreed_at_the_boundary_and_a_second_one_raises_at_once(group, capsys):
    signals._handler(signal.SIGTERM, None)
    assert signals.pending() == signal.SIGTERM
    assert "SIGTERM received: every rank stops at the next step" in capsys.readouterr().err
    with pytest.raises(signals.Terminated, match="every rank stops here"):
        signals._agree()
    assert signals.pending() is None and signals.agreed() == signal.SIGTERM
    assert issubclass(signals.Terminated, KeyboardInterrupt)
    signals._handler(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt, match="again: this rank stops at once") as info:
        signals._handler(signal.SIGINT, None)
    assert type(info.value) is KeyboardInterrupt and signals.pending() is None
    signals._agree()  # nothing held: no exception


def test_collectives_after_this_ranks_own_failure_raise_at_once(tmp_path, monkeypatch):
    """State-dict gathers, save_pretrained and sharded checkpoints refuse to start after this rank failed: a
    peer is not in step with it, so the collective would pair with another one or wait for the timeout."""
    import moreh_ap
    from moreh_ap.oneline.state_dicts import model_state_dict, optimizer_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pm = moreh_ap.parallelize(model, moreh_ap.ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=2),
                              optimizer=opt, loss_fn=torch.nn.functional.mse_loss, measure=False)
    monkeypatch.setattr(faults, "_local", faults.FaultRecord(rank=1, where="train_step", error="RuntimeError: x",
                                                             time=time.time()))
    for call in (lambda: model_state_dict(pm), lambda: optimizer_state_dict(pm),
                 lambda: moreh_ap.checkpoint.save(tmp_path / "ckpt", pm, opt)):
        with pytest.raises(faults.StoppedRankError, match="failed on this rank"):
            call()
    monkeypatch.setattr(faults, "_local", None)
    assert set(model_state_dict(pm)) == {"0.weight", "0.bias", "1.weight", "1.bias"}
