# Vocabulary-parallel loss test helpers: a spy on the engine's loss pieces and trainers for three loss modes.
"""``vocab_loss_run`` (a :func:`tests.helpers.dist_harness.launch` runner) trains a case on every rank with a
spy on :meth:`moreh_ap.runtime.loss.LossPlan.piece` recording what the loss got as logits (a DTensor and its
placements, or a plain tensor, and the shapes), gathered from every rank. ``case["mode"]``:

- ``"labels"`` (default): ``train_step(..., labels=...)``, the engine computes the HF model's own loss;
- ``"loss_fn"``: ``parallelize(..., loss_fn=shifted_lm_loss)`` and ``train_step(ids, target=labels)``; the
  loss_fn records what it was given too;
- ``"output_loss"``: ``parallelize(..., output_loss=lambda out: out.loss)``: the model computes its own loss
  from the labels inside its forward.

With ``case["eval_logits"]``, rank 0 also returns the evaluation forward's logits after training (``pm.eval()``,
``pm(input_ids=...)``) on the held-out batch :func:`eval_ids`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from tests.helpers.runtime_cases import (STEPS, VOCAB, _prepare_model, case_batches, make_optimizer,
                                         parallel_run, shifted_lm_loss)


def describe(t) -> dict:
    """Type, placements, global and local shape of a logits tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return {"dtensor": True, "placements": tuple((type(p).__name__, getattr(p, "dim", None)) for p in t.placements), "shape": tuple(t.shape),
                "local": tuple(t.to_local().shape)}
    return {"dtensor": False, "placements": (), "shape": tuple(t.shape), "local": tuple(t.shape)}


class LossSpy:
    """Records ``describe(logits)`` of every ``LossPlan.piece`` call while active (this rank)."""

    def __enter__(self):
        from moreh_ap.runtime import loss as L

        self.seen: list[dict] = []
        self._cls, self._orig = L.LossPlan, L.LossPlan.piece
        spy, orig = self, self._orig

        def piece(plan, output, target):
            spy.seen.append(describe(L.extract_logits(output)))
            return orig(plan, output, target)

        L.LossPlan.piece = piece
        return self

    def __exit__(self, *exc):
        self._cls.piece = self._orig


def eval_ids(batch: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, 12), generator=torch.Generator().manual_seed(4242))


def _train(case: dict, world: int, rank: int) -> dict:
    """``loss_fn`` / ``output_loss`` modes (see the module docstring)."""
    import moreh_ap
    from moreh_ap.config import ParallelConfig

    cfg = ParallelConfig.from_dict(case["cfg"])
    model = _prepare_model(case, case.get("seed", 0))
    opt = make_optimizer(case, list(model.parameters()))
    given: list[dict] = []

    def user_loss(logits, labels):
        given.append(describe(logits))
        return shifted_lm_loss(logits, labels)

    if case["mode"] == "loss_fn":
        pm = moreh_ap.parallelize(model, cfg, optimizer=opt, loss_fn=user_loss)
    else:
        pm = moreh_ap.parallelize(model, cfg, optimizer=opt, output_loss=lambda out: out.loss)
    losses = []
    for batch in case_batches(case, cfg.global_batch(world)):
        kw = dict(batch["kwargs"])
        if case["mode"] == "loss_fn":
            loss = pm.train_step(kw["input_ids"], target=kw["labels"])
        else:
            loss = pm.train_step(**kw)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return {"losses": losses, "state": pm.full_state_dict(), "given": given, "pm": pm}


def vocab_loss_run(case: dict, world: int, rank: int) -> dict:
    """Train ``case`` (every rank) with the loss spy; the spy's records of all ranks in ``"seen"``."""
    with LossSpy() as spy:
        if case.get("mode", "labels") == "labels":
            case = dict(case, probe="tests.helpers.loss_parallel_cases:_keep_pm")
            res = parallel_run(case, world, rank)
        else:
            res = _train(case, world, rank)
    pm = res.pop("pm")
    if case.get("eval_logits"):
        pm.eval()
        with torch.no_grad():
            out = pm(input_ids=eval_ids(4))
        pm.train()
        res["eval_desc"] = describe(out.logits)
        res["eval_logits"] = out.logits.detach().clone() if not res["eval_desc"]["dtensor"] else None
    everyone: list = [None] * world
    dist.all_gather_object(everyone, {"seen": spy.seen, "given": res.pop("given", [])})
    res["seen"] = [s for e in everyone for s in e["seen"]]
    res["given"] = [s for e in everyone for s in e["given"]]
    res["steps"] = STEPS
    return res


def _keep_pm(pm, *, model, opt) -> dict:
    """A ``parallel_run`` probe handing the ParallelModel back to :func:`vocab_loss_run`."""
    return {"pm": pm}
