# Closed loop: the engine measures steps 2-3 of a real CPU run, logs them, stores them; re-planning is corrected by part.
import dataclasses
import json
import re

import pytest
import torch

from moreh_ap.config import ParallelConfig
from moreh_ap.planner import Cluster, plan
from moreh_ap.planner.measurements import (Corrections, Measurement, device_fingerprint, load_measurements,
                                           measurement_path, model_signature)
from moreh_ap.runtime import parallelize
from moreh_ap.runtime.closed_loop import StepProbe
from tests.helpers.models import tiny_gpt2

pytestmark = pytest.mark.timeout(180)

LINE = re.compile(r"Measured steps 2-3: step ([\d.e+-]+) s \(train_step ([\d.e+-]+) s, optimizer ([\d.e+-]+) s\), "
                  r"peak ([\d.]+) MiB \(static ([\d.]+) MiB, live tracker\); predicted step ([\d.e+-]+) s "
                  r"\(([+-][\d.]+) %\), peak ([\d.]+) MiB \(([+-][\d.]+) %\)")


def _batch():
    torch.manual_seed(1)
    idx = torch.randint(0, 100, (8, 32))
    return idx


def _plan(model, idx):
    return plan(model, (idx,), {"labels": idx}, cluster=Cluster.preset("cpu"), optimizer="adamw",
                options={"mixed_precision": False})


def _train(model, config, idx, *, prediction, steps=5):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pm = parallelize(model, config, optimizer=opt, prediction=prediction)
    for _ in range(steps):
        pm.train_step(idx, labels=idx)
        opt.step()
        opt.zero_grad()
    return pm, opt


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """Config A planned, run (5 steps, CPU, one process), measured and stored; then re-planned."""
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOREH_AP_CACHE_DIR", str(cache))
    mp.setenv("MOREH_AP_DEVICE", "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        idx = _batch()
        model = tiny_gpt2()
        first = _plan(model, idx)
        from moreh_ap.log import logger

        lines: list[str] = []
        sink = logger.add(lambda msg: lines.append(str(msg)), level="INFO")
        try:
            pm, opt = _train(model, first.config, idx, prediction=first)
        finally:
            logger.remove(sink)
        again = _plan(tiny_gpt2(), idx)
        yield {"first": first, "again": again, "pm": pm, "opt": opt, "lines": lines, "cache": cache}
    finally:
        torch.set_num_threads(threads)
        mp.undo()


def _cand(p, config):
    return next(c for c in p.candidates if c.config == config)


def test_one_line_with_real_numbers_and_stored_measurement(run_a):
    hits = [m for line in run_a["lines"] if (m := LINE.search(line))]
    assert len(hits) == 1, run_a["lines"]
    step, ts, opt, peak, static, pred, _, pred_peak, _ = (float(x) for x in hits[0].groups())
    assert step > 0 and ts > 0 and opt > 0 and peak > static > 0
    assert step == pytest.approx(ts + opt, rel=1e-2)
    assert pred == pytest.approx(run_a["first"].selected.step_time, rel=1e-3)
    found = load_measurements(device_fingerprint("cpu", 1), model_signature(run_a["first"].graph),
                              cache_dir=run_a["cache"])
    assert len(found) == 1 and found[0].config == run_a["first"].config.to_dict()
    assert found[0].predicted["step_time"] == run_a["first"].selected.step_time
    assert json.loads(measurement_path(run_a["cache"]).read_text())["format"] == "moreh_ap.measurements/1"


def test_nothing_measured_after_step_three(run_a):
    pm, opt = run_a["pm"], run_a["opt"]
    assert pm._probe is None
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_replan_predicts_the_measured_config_within_5_percent(run_a):
    first, again = run_a["first"], run_a["again"]
    m = load_measurements(device_fingerprint("cpu", 1), model_signature(first.graph), cache_dir=run_a["cache"])[0]
    a = _cand(again, first.config)
    assert a.step_time == pytest.approx(m.step_time(), rel=0.05)
    assert a.memory.total == pytest.approx(m.peak_bytes, rel=0.05)
    assert again.corrections is not None and again.corrections.own


def test_other_candidates_move_by_their_own_parts(run_a):
    first, again = run_a["first"], run_a["again"]
    a0, a1 = _cand(first, first.config), _cand(again, first.config)
    f = again.corrections.mean
    assert f.compute != pytest.approx(f.optimizer, rel=0.05)  # two parts learnt apart
    moved = []
    for b0 in first.candidates:
        if b0.config == first.config or b0.step_time is None:
            continue
        b1 = _cand(again, b0.config)
        tb0, tb1 = b0.time_breakdown, b1.time_breakdown
        assert tb1["compute"] == pytest.approx(tb0["compute"] * f.compute, rel=1e-9)
        assert tb1["optimizer"] == pytest.approx(tb0["optimizer"] * f.optimizer, rel=1e-9)
        share = lambda tb: tb["optimizer"] / tb["total"]  # noqa: E731
        if abs(share(tb0) - share(a0.time_breakdown)) > 0.02:
            moved.append(b1.step_time / b0.step_time)
    assert moved, "no candidate with a different time breakdown"
    ratio_a = a1.step_time / a0.step_time
    assert all(r != pytest.approx(ratio_a, rel=0.01) for r in moved), (moved, ratio_a)


def test_advice_pins_a_faster_candidate_and_warns_near_the_cap(run_a, capsys):
    first = run_a["first"]
    m = load_measurements(device_fingerprint("cpu", 1), model_signature(first.graph), cache_dir=run_a["cache"])[0]
    other = min((c for c in first.candidates if c.config != first.config and c.step_time is not None),
                key=lambda c: c.memory.total)  # the one that still fits under the tight cap below
    fast = dataclasses.replace(other, time_breakdown={k: v * 0.2 for k, v in other.time_breakdown.items()})
    cands = [fast if c is other else c for c in first.candidates]
    fake = dataclasses.replace(first, candidates=cands, memory_cap=int(m.peak_bytes / 0.97))
    probe = StepProbe(run_a["pm"], optimizer=None, prediction=fake)
    probe.measurement = m
    probe.advise(_cand(first, first.config))
    err = capsys.readouterr().err
    pins = re.findall(r"MOREH_AP_CONFIG='(\{.*?\})'", err)
    assert "predicted" in err and "faster" in err and "within 5 % of the memory cap" in err, err
    assert ParallelConfig.from_dict(json.loads(pins[0])) == other.config


def test_explicit_api_without_a_plan_only_logs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOREH_AP_CACHE_DIR", str(tmp_path))
    idx = _batch()
    _train(tiny_gpt2(), ParallelConfig(num_stages=1, num_micro_batches=2, batch_per_device=4), idx, prediction=None, steps=4)
    err = capsys.readouterr().err
    assert "Measured steps 2-3" in err and "no prediction (no plan given to parallelize)" in err
    assert not (tmp_path / "measurements.json").exists()


def _cand_stub(config, *, compute, comm, opt, static, dynamic):
    from moreh_ap.planner.memory import MemoryBreakdown
    from moreh_ap.planner.planning import Candidate

    tb = {"compute": compute, "bubble": 0.0, "p2p": 0.0, "dp_comm": comm, "optimizer": opt}
    tb["total"] = sum(tb.values())
    return Candidate(config=config, feasible=True, step_time=tb["total"], time_breakdown=tb,
                     memory=MemoryBreakdown(params=static, activations=dynamic))


def test_correction_rule_by_parts():
    a_cfg = ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=8)
    b_cfg = ParallelConfig(num_stages=1, num_micro_batches=2, batch_per_device=4)
    a = _cand_stub(a_cfg, compute=1.0, comm=0.5, opt=0.5, static=1000, dynamic=1000)
    b = _cand_stub(b_cfg, compute=1.0, comm=2.0, opt=0.1, static=1000, dynamic=500)
    m = Measurement(device={}, model={}, config=a_cfg.to_dict(), train_step_time=2.5, optimizer_time=1.0,
                    peak_bytes=3000, static_bytes=1200, memory_source="test")
    fix = Corrections([m]).learn([a, b])
    assert fix.mean.compute == pytest.approx(2.0) and fix.mean.optimizer == pytest.approx(2.0)
    assert fix.mean.comm == 1.0 and fix.mean.static == pytest.approx(1.2) and fix.mean.dynamic == pytest.approx(1.8)
    for c in (a, b):
        fix.correct_memory(c, cap=2900)
        fix.correct_time(c)
    assert a.step_time == pytest.approx(3.5) and a.memory.total == 3000 and not a.feasible
    assert b.step_time == pytest.approx(2.0 + 2.0 + 0.2) and b.memory.total == 1200 + 900 and b.feasible
    # communication predicted longer than the whole measured train_step: compute and comm share the factor
    m2 = dataclasses.replace(m, train_step_time=0.75)
    a2 = _cand_stub(a_cfg, compute=1.0, comm=2.0, opt=0.5, static=1000, dynamic=1000)
    assert Corrections([m2]).learn([a2]).mean.comm == pytest.approx(0.25)


def test_oneline_mode_measures_against_its_plan(tmp_path, monkeypatch, capsys):
    """The one-line mode passes rank 0's plan to the engine: the line has a prediction and the file is written."""
    from moreh_ap.option import enable_advanced_parallelization
    from tests.helpers.models import tiny_llama

    monkeypatch.chdir(tmp_path)
    enable_advanced_parallelization(mixed_precision=False)
    model = tiny_llama(layers=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(1, 100, (4, 16))
    try:
        for _ in range(4):
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        from moreh_ap.oneline.state import STATE

        STATE.engines.pop(model, None)  # the engine holds its root: later tests' engaged_model() must not see it
    err = capsys.readouterr().err
    assert re.search(r"Measured steps 2-3: .*; predicted step [\d.e+-]+ s", err), err
    entries = json.loads(measurement_path().read_text())["entries"]
    assert len(entries) == 1 and next(iter(entries.values()))["config"]["num_stages"] == 1


def test_a_failing_step_stops_the_measurement_cleanly(monkeypatch):
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    from moreh_ap.errors import InputError

    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters())
    pm = parallelize(model, ParallelConfig(num_stages=1, num_micro_batches=2, batch_per_device=4,
                                           mixed_precision=False), optimizer=opt)
    idx = _batch()
    for _ in range(2):
        pm.train_step(idx, labels=idx)
        opt.step()
    with pytest.raises(InputError):
        pm.train_step(idx)  # step 3 (tracked on CPU) has no loss: raises
    assert pm._probe is None and not _get_current_dispatch_mode_stack()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
