# The vocabulary-parallel loss under tensor parallelism (issue 14) against one process: HF labels, loss_fn, output_loss.
"""With ``tp = 2`` the engine computes a Hugging Face causal LM's own loss on the head's vocabulary-sharded
logits under torch's ``loss_parallel`` (:mod:`moreh_ap.runtime.vocab_loss`). Each case trains 3 AdamW steps on
gloo CPU ranks and is compared with one process on the same global batches (fp32: losses every step and every
final weight, ``rtol=1e-4, atol=1e-5`` as ``test_tensor_parallel.py``). A spy on ``LossPlan.piece`` shows what
the loss got: with ``labels=`` a ``Shard(-1)`` DTensor holding ``V / 2`` of the vocabulary on each rank (so the
test fails on a head that gathers its logits); with a user ``loss_fn``, or a model reading its own loss
(``output_loss``), the plain whole ``(B, S, V)`` logits. The evaluation forward's logits are plain and equal to
one process's. One launch per world size (2 ranks: the runtime group's, shared with other files).
"""
from __future__ import annotations

import pytest
import torch

from moreh_ap.config import ParallelConfig
from tests.helpers.dist_harness import register, shared_results
from tests.helpers.loss_parallel_cases import eval_ids
from tests.helpers.runtime_cases import VOCAB, assert_close_fp32, build_model, reference_run

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(900)]

RUNNER = "tests.helpers.loss_parallel_cases:vocab_loss_run"


def _cfg(**kw) -> dict:
    kw.setdefault("batch_per_device", 2)
    kw.setdefault("num_stages", 1)
    kw.setdefault("mixed_precision", False)
    return ParallelConfig(**kw).to_dict()


CASES = [
    {"id": "llama-tp2-labels-mb2", "model": "llama", "world": 2, "runner": RUNNER, "eval_logits": True,
     "padding": True, "cfg": _cfg(tp=2, num_micro_batches=2)},
    {"id": "gpt2-tied-tp2-labels", "model": "gpt2", "world": 2, "runner": RUNNER, "padding": True,
     "cfg": _cfg(tp=2, num_micro_batches=1)},
    {"id": "llama-tp2-user-loss-fn-mb2", "model": "llama", "world": 2, "runner": RUNNER, "mode": "loss_fn",
     "cfg": _cfg(tp=2, num_micro_batches=2)},
    {"id": "gpt2-tied-tp2-output-loss", "model": "gpt2", "world": 2, "runner": RUNNER, "mode": "output_loss",
     "cfg": _cfg(tp=2, num_micro_batches=1)},
    {"id": "llama-pp2tp2-GPipe-labels", "model": "llama", "world": 4, "runner": RUNNER, "padding": True,
     "cfg": _cfg(tp=2, num_stages=2, num_micro_batches=2, schedule="GPipe")},
]
register("runtime", [c for c in CASES if c["world"] == 2])  # the 2-rank cases in the runtime group's launch


def _results(world: int) -> dict:
    return shared_results("runtime", world) if world == 2 else shared_results("loss-parallel", world, CASES)


# the 4-rank pipeline case runs with -m full: in the default run test_tensor_parallel.py's pp 2 x tp 2 cases (GPT-2
# 1F1B, Llama Interleaved1F1B, both with labels=) take the same vocabulary-parallel loss path inside a schedule
PARAMS = [pytest.param(c, id=c["id"], marks=[pytest.mark.full] if c["world"] > 2 else []) for c in CASES]


@pytest.mark.parametrize("case", PARAMS)
def test_loss_parallel_equals_one_process(case):
    got = _results(case["world"])[case["id"]]
    cfg = ParallelConfig.from_dict(case["cfg"])
    ref = reference_run(case, cfg.global_batch(case["world"]))
    assert_close_fp32(got["losses"], ref["losses"], "losses")
    assert list(got["state"]) == list(ref["state"])
    for k, v in ref["state"].items():
        assert_close_fp32(got["state"][k], v, k)
    seen = got["seen"]
    calls = got["steps"] * cfg.num_micro_batches * cfg.tp  # every tp rank holding the head computes every piece
    # (a pipeline schedule also runs the loss once per tp rank when it is built, to infer the backward's shapes)
    assert calls <= len(seen) <= calls + (cfg.tp if cfg.num_stages > 1 else 0), f"{len(seen)} loss pieces"
    tokens = (cfg.batch_per_device, 12)
    if case.get("mode", "labels") == "labels":
        for s in seen:  # vocabulary-parallel: the logits never gathered
            assert s["dtensor"] and s["placements"] == (("Shard", 2),), s
            assert s["shape"] == (*tokens, VOCAB) and s["local"] == (*tokens, VOCAB // cfg.tp), s
    else:
        for s in seen + got["given"]:  # the user's loss / the model's own: the whole logits, a plain tensor
            assert not s["dtensor"] and s["shape"] == (*tokens, VOCAB), s
    if case.get("mode") == "loss_fn":
        assert len(got["given"]) == calls
    if case.get("eval_logits"):
        _check_eval_logits(case, got, ref)


def _check_eval_logits(case: dict, got: dict, ref: dict) -> None:
    assert not got["eval_desc"]["dtensor"] and got["eval_desc"]["shape"] == (4, 12, VOCAB), got["eval_desc"]
    model = build_model(case["model"], 0)
    model.load_state_dict(ref["state"])
    model.eval()
    with torch.no_grad():
        want = model(input_ids=eval_ids(4)).logits
    assert_close_fp32(got["eval_logits"], want, "evaluation logits")
