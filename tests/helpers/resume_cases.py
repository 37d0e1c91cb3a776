# Resume cases: train, save, then continue in new processes (one-line mode and the sharded checkpoint).
"""Every case trains tiny models on fixed batches; the reference is one device trained without interruption.

``run(case, world, rank)`` is a runner for ``tests.helpers.dist_harness.launch``:

- ``phase="save"``: the one-line mode (config pinned by ``MOREH_AP_CONFIG``) trains ``SAVE_STEPS`` steps and
  rank 0 writes ``torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)``;
- ``phase="resume"``: a fresh model (other weights) and optimizer load that file before the line engages
  (``when="before"``) or after (``when="after"``: one training forward engages, its gradients are dropped),
  then train ``RESUME_STEPS`` more;
- ``phase="dcp-save"`` / ``"dcp-load"``: the same with ``moreh_ap.parallelize`` and ``moreh_ap.checkpoint``.

Each returns the losses, rank 0's final weights and optimizer state dict (one-device format), and what the
other ranks got from ``state_dict()`` (placeholders).
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

SAVE_STEPS, RESUME_STEPS = 4, 2
LR = 1e-3


def build_model(name: str, seed: int):
    torch.manual_seed(seed)
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=False, use_cache=False)
        return LlamaForCausalLM(cfg)
    from transformers import GPT2Config, GPT2LMHeadModel  # tied wte / lm_head

    cfg = GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=96, n_positions=64, use_cache=False,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def build_optimizer(kind: str, model):
    """Two param groups (matrices, then vectors with another lr and no weight decay): the group order counts."""
    mats = [p for p in model.parameters() if p.dim() >= 2]
    vecs = [p for p in model.parameters() if p.dim() < 2]
    if kind == "sgd":
        return torch.optim.SGD([{"params": mats}, {"params": vecs, "lr": LR * 3}], lr=LR * 10, momentum=0.9)
    if kind == "lamb":
        from moreh_ap.optim import FusedLAMB

        return FusedLAMB([{"params": mats}, {"params": vecs, "weight_decay": 0.0}], lr=LR * 10, weight_decay=0.01)
    return torch.optim.AdamW([{"params": mats}, {"params": vecs, "lr": LR * 2, "weight_decay": 0.0}], lr=LR)


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(1, 96, (4, 16), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    return ids, labels


def reference(case: dict) -> dict:
    """One device, ``SAVE_STEPS + RESUME_STEPS`` steps without interruption; also the state after ``SAVE_STEPS``."""
    model = build_model(case["model"], 0)
    opt = build_optimizer(case["optim"], model)
    losses, saved = [], None
    for step in range(SAVE_STEPS + RESUME_STEPS):
        if step == SAVE_STEPS:
            saved = {k: v.clone() for k, v in model.state_dict().items()}
        ids, labels = batch(step)
        loss = model(ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"losses": losses, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(), "state_at_save": saved}


SAVE_GROUP, LOAD_GROUP = "checkpoint-save", "checkpoint-load"
"""``dist_harness`` groups of test_resume.py and test_checkpoint_dcp.py: one 2-rank launch saves every case of
both files, then one loads every case (cases name their file with ``"file"``; :func:`checkpoint_runs` sets
``"path"``)."""
_RUNS: dict = {}


def checkpoint_runs(tmp_path_factory) -> dict:
    """The checkpoint tests' two shared launches: every registered case's ``path`` is ``root / case["file"]``
    in one temporary directory, then the save launch, then the load launch (rank 0's results by case id).

    Returns:
        ``{"root": Path, "save": {id: result}, "load": {id: result}}``.
    """
    from tests.helpers.dist_harness import registered, shared_results

    if "root" not in _RUNS:
        _RUNS["root"] = tmp_path_factory.mktemp("checkpoints")
        for case in registered(SAVE_GROUP) + registered(LOAD_GROUP):
            case["path"] = str(_RUNS["root"] / case["file"])
    _RUNS["save"] = shared_results(SAVE_GROUP, 2, timeout=400)  # launched once (dist_harness keeps it)
    _RUNS["load"] = shared_results(LOAD_GROUP, 2, timeout=400)
    return _RUNS


def _train(model, opt, steps: range, *, pm=None) -> list[float]:
    losses = []
    for step in steps:
        ids, labels = batch(step)
        loss = pm.train_step(ids, labels=labels) if pm is not None else model(ids, labels=labels).loss
        if pm is None:
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _placeholders(sd) -> bool:
    """Only meta tensors (the structure of rank 0's state dict, no data)."""
    tensors = [v for v in _leaves(sd) if isinstance(v, torch.Tensor)]
    return bool(tensors) and all(t.device.type == "meta" for t in tensors)


def _leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


def run(case: dict, world: int, rank: int) -> dict:
    """Runner for the multi-rank harness (see the module docstring); rank 0 returns every rank's small results
    under ``"ranks"`` (the harness keeps rank 0's)."""
    out = _run_dcp(case, rank) if case["phase"].startswith("dcp") else _run_oneline(case, rank)
    if world == 1:
        return {**out, "ranks": [out]}
    small = {k: v for k, v in out.items() if k not in ("state", "optimizer")}
    parts = [None] * world if rank == 0 else None
    torch.distributed.gather_object(small, parts, dst=0)
    return {**out, "ranks": parts} if rank == 0 else {}


def _run_oneline(case: dict, rank: int) -> dict:
    from moreh_ap import oneline
    from moreh_ap.oneline.state import STATE
    from moreh_ap.option import disable_advanced_parallelization, enable_advanced_parallelization

    cwd = os.getcwd()
    os.chdir(tempfile.mkdtemp())  # the .dump file
    os.environ[oneline.CONFIG_ENV] = json.dumps(case["cfg"])
    try:
        enable_advanced_parallelization(mixed_precision=False)
        out = _oneline(case, rank)
    finally:
        model = oneline.engaged_model()
        if model is not None:
            STATE.engines.pop(model)
        disable_advanced_parallelization()
        del os.environ[oneline.CONFIG_ENV]
        os.chdir(cwd)
    return out


def _oneline(case: dict, rank: int) -> dict:
    model = build_model(case["model"], seed=rank + (0 if case["phase"] == "save" else 10))
    model.cuda()
    model.train()
    opt = build_optimizer(case["optim"], model)
    out: dict = {}
    if case["phase"] == "save":
        out["losses"] = _train(model, opt, range(SAVE_STEPS))
        sd = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        out["placeholders"] = rank != 0 and _placeholders(sd)
        out["same_keys"] = list(sd["model"]) == list(build_model(case["model"], 0).state_dict())
        if rank == 0:
            torch.save(sd, case["path"])
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return out
    ckpt = torch.load(case["path"], weights_only=True)
    if case["when"] == "before":
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    else:
        ids, labels = batch(0)
        model(ids, labels=labels)  # engages; its gradients are never used
        opt.zero_grad(set_to_none=True)
        out["engaged_first"] = type(model).__name__ == type(build_model(case["model"], 0)).__name__
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    out["losses"] = _train(model, opt, range(SAVE_STEPS, SAVE_STEPS + RESUME_STEPS))
    state, optim_state = model.state_dict(), opt.state_dict()
    if rank == 0:
        out["state"], out["optimizer"] = state, optim_state
    else:
        out["placeholders"] = _placeholders(state) and _placeholders(optim_state)
    return out


def _run_dcp(case: dict, rank: int) -> dict:
    import moreh_ap
    from moreh_ap.config import ParallelConfig

    model = build_model(case["model"], seed=rank + (0 if case["phase"] == "dcp-save" else 10))
    opt = build_optimizer(case["optim"], model)
    pm = moreh_ap.parallelize(model, ParallelConfig.from_dict(case["cfg"]), optimizer=opt, measure=False)
    if case["phase"] == "dcp-save":
        losses = _train(model, opt, range(SAVE_STEPS), pm=pm)
        moreh_ap.checkpoint.save(case["path"], pm, opt)
        return {"losses": losses}
    moreh_ap.checkpoint.load(case["path"], pm, opt)
    losses = _train(model, opt, range(SAVE_STEPS, SAVE_STEPS + RESUME_STEPS), pm=pm)
    state, optim_state = pm.full_state_dict(), pm.optimizer_state_dict()
    return {"losses": losses, "state": state, "optimizer": optim_state} if rank == 0 else {"losses": losses}
