# Models that compute their own loss under the one-line mode on 2 / 4 gloo ranks vs one process (fp32).
"""nanoGPT-shaped GPT ``(logits, loss) = model(X, Y)`` with ``loss / k`` accumulation, clip and AdamW, at
pp 1 and through the nanoGPT pipeline split; a dict-loss MLP; an HF Llama called Trainer-style with
``labels`` and ``num_items_in_batch``; torch's ``GradScaler`` over FSDP2 shards whose first steps overflow on one
rank only (every rank must skip them). Every rank builds its model from another seed and reads other
data: rank 0's weights and batches must win. Tolerances: losses and norms 1e-5 relative; weights per
tensor (see tests/unit/test_loss_outputs.py: AdamW turns fp32 summation-order differences on
elements with ~0 gradient into differences up to lr)."""
import math

import pytest

from tests.helpers.dist_harness import register, shared_launch
from tests.helpers.loss_scripts import reference

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(600)]

RUNNER = "tests.helpers.loss_scripts:oneline_run"


def _cfg(stages, nmb, bpd, **more):
    return {"num_stages": stages, "num_micro_batches": nmb, "batch_per_device": bpd, **more}


CASES_2 = [{**c, "runner": RUNNER, "world": 2} for c in [
    {"id": "gpt-pp1-dp2-2mb", "script": "gpt", "config": _cfg(1, 2, 1)},
    {"id": "gpt-pp2-1f1b", "script": "gpt", "config": _cfg(2, 2, 2)},
    {"id": "dict-dp2-fsdp", "script": "dict", "config": _cfg(1, 2, 2, distribute_param=True)},
    {"id": "hf-num-items-dp2", "script": "hf", "config": _cfg(1, 1, 2)},
    # torch's GradScaler: the first steps overflow on one rank only (the first pipeline stage's embeddings, rank 1's
    # FSDP2 shard); every rank must skip them (FSDP2: DTensor's own found_inf reduction already agrees); the pp 2
    # Llama's 4th step overflows inside the scaled backward only: AP seeds its backward with the scale as well
    {"id": "grad-scaler-pp2", "script": "scaler", "model": "skewed_llama", "config": _cfg(2, 2, 2),
     "kwargs": {"n": 4}},
    {"id": "grad-scaler-dp2-fsdp", "script": "scaler", "model": "skewed", "config": _cfg(1, 1, 4, distribute_param=True),
     "kwargs": {"backoff": 2.0**-16}},
]]
CASES_4 = [{**c, "runner": RUNNER, "world": 4} for c in [
    {"id": "gpt-pp2xdp2-gpipe", "script": "gpt", "config": _cfg(2, 2, 1, schedule="GPipe")},
]]
register("oneline-losses", CASES_2)  # one 2-rank launch with test_loss_outside.py's cases


def _check(case: dict, got: dict, world: int) -> None:
    want = reference(case)
    tol = 1e-5
    assert got["loss"] == pytest.approx(want["loss"], rel=tol), case["id"]
    overflowed = [[not math.isfinite(n) for n in r["norm"]] for r in (got, want)]  # inf or nan: either
    assert overflowed[0] == overflowed[1], case["id"]
    assert [n for n, o in zip(got["norm"], overflowed[0]) if not o] == \
        pytest.approx([n for n, o in zip(want["norm"], overflowed[1]) if not o], rel=tol), case["id"]
    assert len(got["ranks"]) == world and all(r["loss"] == got["loss"] for r in got["ranks"])  # .item() agrees
    if case["script"] == "scaler":  # every rank skipped the overflowed steps and backed off as one device
        assert want["scale"][0] < 2.0**126, want["scale"]  # the case does overflow
        assert all(r["scale"] == want["scale"] for r in got["ranks"]), [r["scale"] for r in got["ranks"]]
    assert got["state"].keys() == want["state"].keys()
    for k, ref in want["state"].items():
        diff = (got["state"][k].double() - ref.double())
        assert diff.norm() <= tol * ref.double().norm() + tol, (case["id"], k)
        assert diff.abs().max() <= 20 * tol, (case["id"], k, diff.abs().max())
    if case["script"] == "gpt":
        assert got["structure"] == [True, ()]  # (None, loss)
        assert got["eval"] == pytest.approx(want["eval"], rel=tol)
    if case["script"] == "dict":
        assert got["keys"] == ["logits", "loss"] and got["logits_none"]


@pytest.mark.parametrize("world,cases", [(2, CASES_2), pytest.param(4, CASES_4, marks=pytest.mark.full)],  # 4 ranks: -m full
                         ids=["2-ranks", "4-ranks"])
def test_own_loss_models_match_one_process(world, cases):
    res = shared_launch("oneline-losses", 2) if world == 2 else shared_launch("own-loss", world, cases)
    for case in cases:
        _check(case, res.results[case["id"]], world)
    if any(c["config"]["num_stages"] > 1 for c in cases):  # the pipelines ran through the nanoGPT split
        assert "num_stages : 2" in res.output and "model split : nanoGPT-style GPT" in res.output
