# Closed loop on 2 gloo ranks: steps 2-3 measured (max over ranks), stored by rank 0, re-planning predicts them.
from __future__ import annotations

import json
import os

import pytest
import torch

import moreh_ap
from tests.helpers.dist_harness import launch
from tests.helpers.models import tiny_gpt2

pytestmark = pytest.mark.multirank


def closed_loop_run(case: dict, world: int, rank: int) -> dict:
    """Runner for ``tests.helpers.dist_harness.launch``: plan for 2 CPU ranks, train 4 steps with the plan as
    prediction, then (rank 0) re-plan from the stored measurement."""
    from moreh_ap.planner import Cluster, plan
    from moreh_ap.planner.measurements import device_fingerprint, load_measurements, model_signature

    idx = torch.randint(0, 100, (8, 32), generator=torch.Generator().manual_seed(2))
    cluster = Cluster.preset("cpu", devices_per_node=world)
    opts = {"mixed_precision": False, "pipeline_parallel": False}
    model = tiny_gpt2()
    first = plan(model, (idx,), {"labels": idx}, cluster=cluster, options=opts)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pm = moreh_ap.parallelize(model, first.config, optimizer=opt, prediction=first)
    for _ in range(4):
        pm.train_step(idx, labels=idx)
        opt.step()
        opt.zero_grad()
    torch.distributed.barrier()
    if rank != 0:
        return {}
    found = load_measurements(device_fingerprint("cpu", world), model_signature(first.graph))
    again = plan(tiny_gpt2(), (idx,), {"labels": idx}, cluster=cluster, options=opts)
    a = next(c for c in again.candidates if c.config == first.config)
    return {"found": [m.to_dict() for m in found], "config": first.config.to_dict(),
            "replanned": {"step_time": a.step_time, "memory": a.memory.total},
            "probe_done": pm._probe is None}


@pytest.mark.multirank
@pytest.mark.timeout(300)
def test_two_ranks_measure_store_and_replan(tmp_path):
    cache = tmp_path / "cache"
    res = launch(2, [{"id": "loop", "runner": "tests.distributed.test_closed_loop_multirank:closed_loop_run"}],
                 env={"MOREH_AP_CACHE_DIR": str(cache)}, timeout=240)
    assert res.results is not None, res.output
    out = res.results["loop"]
    assert out["probe_done"]
    assert len(out["found"]) == 1, out
    m = out["found"][0]
    assert m["config"] == out["config"] and m["device"]["world"] == 2
    assert m["train_step_time"] > 0 and m["optimizer_time"] > 0 and m["peak_bytes"] > m["static_bytes"] > 0
    assert "Measured steps 2-3:" in res.output and "predicted step" in res.output
    step = m["train_step_time"] + m["optimizer_time"]
    assert out["replanned"]["step_time"] == pytest.approx(step, rel=0.05)
    assert out["replanned"]["memory"] == pytest.approx(m["peak_bytes"], rel=0.05)
    assert json.loads((cache / "measurements.json").read_text())["format"] == "moreh_ap.measurements/1"
    assert os.path.exists(cache / "measurements.json")
