# Tensor-parallel test helpers: a probe run on every rank after a runtime case trains (ties, state round trips).
from __future__ import annotations

import torch
import torch.distributed as dist


def tp_probe(pm, *, model, opt) -> dict:
    """After training (every rank): tie and DTensor facts, and the one-device state dicts' round trips.

    - ``tied``: GPT-2's ``lm_head.weight is transformer.wte.weight`` on every rank that holds both;
    - ``all_dtensor``: every parameter of this rank's stages is a DTensor (on every rank);
    - ``opt_state``: ``pm.optimizer_state_dict()`` (one-device format, rank 0);
    - ``load_err``: a changed one-device state dict loaded with ``load_full_state_dict`` and gathered back;
    - ``opt_load_err``: the optimizer state loaded back and gathered again;
    - ``generate_same`` (pp = 1): greedy ``model.generate`` (KV cache: one-token steps, uneven sequence shards)
      on the tensor-parallel model equals that of a one-process copy holding ``pm.full_state_dict()``.
    """
    from torch.distributed.tensor import DTensor

    out: dict = {}
    lm, wte = getattr(model, "lm_head", None), getattr(getattr(model, "transformer", None), "wte", None)
    flags = torch.tensor([1, 1])
    if lm is not None and wte is not None and pm.pp == 1:
        flags[0] = int(lm.weight is wte.weight and isinstance(lm.weight, DTensor))
    flags[1] = int(all(isinstance(p, DTensor) for m in pm.stage_modules for p in m.parameters()))
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    out["tied"], out["all_dtensor"] = bool(flags[0]), bool(flags[1])
    if pm.pp == 1 and hasattr(model, "generate"):
        out["generate_same"] = _generate_same(pm, model)
    osd = pm.optimizer_state_dict()
    out["opt_state"] = osd
    box = [pm.full_state_dict(), osd]
    dist.broadcast_object_list(box, src=0)
    offset = {id(v): 0.001 * (i + 1) for i, v in enumerate(box[0].values())}  # a tied tensor: one offset
    changed = {k: v + offset[id(v)] if v.is_floating_point() else v for k, v in box[0].items()}
    pm.load_full_state_dict(changed)
    back = pm.full_state_dict()
    pm.load_optimizer_state_dict(box[1])
    again = pm.optimizer_state_dict()
    if dist.get_rank() == 0:
        out["load_err"] = max(float((back[k].float() - changed[k].float()).abs().max()) for k in changed)
        out["opt_load_err"] = _state_err(again, osd)
    return out


def _state_err(a: dict, b: dict) -> float:
    assert sorted(a["state"]) == sorted(b["state"]), "optimizer state indices differ"
    err = 0.0
    for i, st in b["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                err = max(err, float((a["state"][i][k].float() - v.float()).abs().max()))
    return err


def _generate_same(pm, model) -> bool:
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(7))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    full = pm.full_state_dict()  # whole on rank 0
    model.eval()
    with torch.no_grad():
        got = model.generate(ids, **kw)  # every rank: the tensor-parallel forwards are collectives
        same = torch.tensor([1])
        if dist.get_rank() == 0:
            one = type(model)(model.config)
            one.load_state_dict(full)
            same[0] = int(torch.equal(got, one.eval().generate(ids, **kw)))
    model.train()
    dist.broadcast(same, src=0)
    return bool(same[0])
