# A loss computed outside the model (F.cross_entropy(model(x), y)) under the one-line mode: dp 2 / 4 vs one process.
"""A small CNN classification loop: the script computes the loss and the accuracy from the outputs. Every
rank reads the same data (required: the targets never reach AP) but builds its model from another seed
(rank 0's weights win). Compared with one process at 1e-6 (fp32): losses, accuracies, gradient norms,
output shapes, an evaluation pass's outputs and every weight after 3 SGD or Adam steps. Also: ranks that
read different batches stop with an error that says so, on every rank."""
import pytest

from tests.helpers.dist_harness import register, shared_launch
from tests.helpers.loss_scripts import reference

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(600)]

RUNNER = "tests.helpers.loss_scripts:oneline_run"


def _case(cid, dp, *, optimizer="sgd", n=8, **config):
    return {"id": cid, "runner": RUNNER, "script": "cnn", "same_data": True, "world": dp,
            "kwargs": {"optimizer": optimizer, "n": n},
            "config": {"num_stages": 1, "num_micro_batches": 1, "batch_per_device": n // dp, **config}}


CASES_2 = [
    _case("dp2-ddp-sgd", 2),
    _case("dp2-fsdp-adam", 2, optimizer="adam", distribute_param=True),
]
CASES_4 = [
    _case("dp4-ddp-adam", 4, optimizer="adam"),
    _case("dp4-fsdp-sgd", 4, distribute_param=True),
]
DIFFER = {**_case("differ", 2), "differ_rank": 1, "last": True}
"""Runs last in the 2-rank launch (its error is raised on every rank; the launch ends after it)."""
register("oneline-losses", CASES_2 + [DIFFER])  # one 2-rank launch with test_oneline_losses.py's cases


def _launch(world: int, cases: list[dict]):
    """One launch per world size, shared by the tests that read it (2 ranks: with other files' cases)."""
    return shared_launch("oneline-losses", 2) if world == 2 else shared_launch("loss-outside", world, cases)


def _check(case: dict, got: dict, world: int, tol: float = 1e-6) -> None:
    want = reference(case)
    assert "error" not in got, got.get("error")
    assert got["shape"] == want["shape"] == [case["kwargs"]["n"], 5]  # the whole global batch's outputs
    assert got["loss"] == pytest.approx(want["loss"], rel=tol, abs=tol), case["id"]
    assert got["acc"] == want["acc"], case["id"]
    assert got["norm"] == pytest.approx(want["norm"], rel=tol, abs=tol), case["id"]
    assert all(r["loss"] == got["loss"] and r["norm"] == got["norm"] for r in got["ranks"])
    assert (got["eval_out"] - want["eval_out"]).abs().max() <= tol
    assert got["state"].keys() == want["state"].keys()
    for k, ref in want["state"].items():
        assert (got["state"][k] - ref).abs().max() <= tol, (case["id"], k, (got["state"][k] - ref).abs().max())


# 4 ranks: -m full (CI time); the 2-rank cases cover DDP and FSDP2 with SGD and Adam on this path, and 4 data-parallel
# ranks are covered by the pp1dp4 cases of tests/distributed/test_runtime_equivalence.py
@pytest.mark.parametrize("world,cases", [(2, CASES_2), pytest.param(4, CASES_4, marks=pytest.mark.full)],
                         ids=["dp2", "dp4"])
def test_loss_outside_matches_one_process(world, cases):
    res = _launch(world, cases + [DIFFER] if world == 2 else cases)
    for case in cases:
        _check(case, res.results[case["id"]], world)
    assert "holds no loss (it is computed outside the model)" in res.output  # the planner's restriction, logged


def test_ranks_with_different_batches_stop_with_the_reason():
    res = _launch(2, CASES_2 + [DIFFER])  # the dp2 launch (one start-up for both tests)
    errors = [r["error"] for r in res.results["differ"]["ranks"]]
    assert all("the ranks see different batches (rank(s) [1] differ from rank 0" in e for e in errors), errors
    assert all("compute the loss inside the model" in e for e in errors)
