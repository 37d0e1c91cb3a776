# Training loops shaped like user scripts (own loss, loss outside the model), run plain or under the one-line mode.
"""Each ``*_script(model, ...)`` is a plain torch training loop; :func:`oneline_run` (a harness runner, see
tests/helpers/dist_harness.py) runs one under ``moreh_ap.oneline`` on every rank with the case's pinned
configuration, and :func:`reference` runs it in this process without AP. Results: losses, gradient norms,
outputs' checks and the final full state dict."""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from tests.helpers.script_models import (DictLossMLP, GPT, GPTConfig, ScaledGPT, SkewedMLP, SmallCNN, gpt_batch,
                                         image_batch)

GPT_CFG = GPTConfig()


def _state(model) -> dict:
    # after engagement only rank 0 gets the weights; the other ranks get meta placeholders (no data)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not v.is_meta}


def _norm(model) -> float:
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))


def gpt_script(model, *, steps: int = 3, k: int = 2, n: int = 4, data_seed: int = 0) -> dict:
    """nanoGPT's loop: ``logits, loss = model(X, Y)``, ``loss / k`` accumulation, clip, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(data_seed)
    res = {"loss": [], "norm": [], "structure": None}
    for _ in range(steps):
        for _ in range(k):
            x, y = gpt_batch(gen, n=n, cfg=GPT_CFG)
            logits, loss = model(x, y)
            res["loss"].append(loss.item())
            res["structure"] = [logits is None, tuple(loss.shape)]
            (loss / k).backward()
        res["norm"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        x, y = gpt_batch(gen, n=n, cfg=GPT_CFG)
        res["eval"] = model(x, y)[1].item()
    model.train()
    res["state"] = _state(model)
    return res


def dict_script(model, *, steps: int = 3, n: int = 8, data_seed: int = 0) -> dict:
    """``out = model(x, y)``; ``out["loss"].backward()``; SGD with momentum."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(data_seed)
    res = {"loss": [], "norm": []}
    for _ in range(steps):
        x, y = torch.randn(n, 8, generator=gen), torch.randn(n, 1, generator=gen)
        out = model(x, y)
        res["keys"] = sorted(out)
        res["logits_none"] = out["logits"] is None
        out["loss"].backward()
        res["loss"].append(out["loss"].item())
        res["norm"].append(_norm(model))
        opt.step()
        opt.zero_grad()
    res["state"] = _state(model)
    return res


def hf_script(model, *, steps: int = 2, k: int = 2, n: int = 4, data_seed: int = 0) -> dict:
    """transformers' Trainer with gradient accumulation: ``num_items_in_batch`` = tokens of the k batches;
    the loss is NOT divided by k."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(data_seed)
    res = {"loss": [], "norm": []}
    for _ in range(steps):
        batches = []
        for _ in range(k):
            ids = torch.randint(1, 64, (n, 12), generator=gen)
            labels = ids.clone()
            labels[torch.rand(n, 12, generator=gen) < 0.3] = -100  # micro-batches count different tokens
            batches.append((ids, labels))
        items = sum(int((lab[:, 1:] != -100).sum()) for _, lab in batches)
        for ids, labels in batches:
            out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(items))
            out.loss.backward()
            res["loss"].append(out.loss.item())
        res["norm"].append(_norm(model))
        opt.step()
        opt.zero_grad()
    res["state"] = _state(model)
    return res


def cnn_script(model, *, steps: int = 3, n: int = 8, optimizer: str = "sgd", data_seed: int = 0) -> dict:
    """``loss = F.cross_entropy(model(x), y)`` in the script, accuracy from the outputs, then an eval pass."""
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    gen = torch.Generator().manual_seed(data_seed)
    res = {"loss": [], "norm": [], "acc": [], "shape": None}
    for _ in range(steps):
        x, y = image_batch(gen, n=n)
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        res["shape"] = list(out.shape)
        res["acc"].append((out.argmax(1) == y).float().mean().item())
        res["loss"].append(loss.item())
        res["norm"].append(_norm(model))
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        x, y = image_batch(gen, n=n)
        res["eval_out"] = model(x).cpu()
    model.train()
    res["state"] = _state(model)
    return res


def scaler_script(model, *, steps: int = 5, n: int = 8, backoff: float = 2.0**-4, data_seed: int = 0) -> dict:
    """The fp16 loop of nanoGPT / the PyTorch AMP recipe with torch's own ``GradScaler``: ``scale(loss).backward()``,
    ``unscale_``, clip to 1, AdamW ``step``, ``update``. The initial scale (2**126, backoff 2**-4) overflows the
    gradients of the first steps, on some parameters only (SkewedMLP, or an HF Llama whose token embeddings were
    made 1e4 smaller: its embedding gradients are ~1e4 larger than the others'); with the Llama a later step
    overflows only inside the scaled backward (an intermediate), not in the finished gradients. A data-parallel
    run sums its ranks' scaled gradients, which can overflow up to dp times earlier: give it a wide ``backoff``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126, backoff_factor=backoff, growth_interval=1000)
    gen = torch.Generator().manual_seed(data_seed)
    res = {"loss": [], "norm": [], "scale": []}
    for _ in range(steps):
        if hasattr(model, "config"):  # a Hugging Face causal LM (its own loss from labels=)
            ids = torch.randint(1, 64, (n, 12), generator=gen)
            loss = model(input_ids=ids, labels=ids).loss
        else:
            x, y = torch.randn(n, 8, generator=gen), torch.randn(n, 1, generator=gen)
            loss = model(x, y)["loss"]
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        res["norm"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        res["loss"].append(loss.item())
        res["scale"].append(scaler.get_scale())
    res["state"] = _state(model)
    return res


SCRIPTS = {"gpt": gpt_script, "dict": dict_script, "hf": hf_script, "cnn": cnn_script, "scaler": scaler_script}


def build_model(name: str, seed: int):
    torch.manual_seed(seed)
    if name in ("gpt", "scaled_gpt"):
        return (ScaledGPT if name == "scaled_gpt" else GPT)(GPT_CFG)
    if name == "dict":
        return DictLossMLP()
    if name == "skewed":
        return SkewedMLP()
    if name == "cnn":
        return SmallCNN()
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                         pad_token_id=0))
    if name == "skewed_llama":  # layer 0's RMSNorm sees the same inputs; the embedding gradients grow 1e4 times
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(1e-4)
    return model


def reference(case: dict) -> dict:
    """The case's script in this process, AP off, with rank 0's model and data."""
    model = build_model(case.get("model", case["script"]), case.get("seed", 0))
    return SCRIPTS[case["script"]](model, **case.get("kwargs", {}))


def oneline_run(case: dict, world: int, rank: int) -> dict:
    """Harness runner: the case's script under the one-line mode (fp32, ``MOREH_AP_CONFIG`` pinned).

    Own-loss scripts get rank-dependent weights and data (rank 0's must win); ``same_data`` cases (loss
    outside the model) the same data on every rank unless ``differ_rank`` gives one rank other data.
    """
    import torch.distributed as dist

    from moreh_ap import oneline
    from moreh_ap.ap_options import APOptions

    os.environ["MOREH_AP_CONFIG"] = json.dumps({"mixed_precision": False, **case["config"]})
    oneline.install(options=APOptions(mixed_precision=False))
    try:
        model = build_model(case.get("model", case["script"]), case.get("seed", 0) + rank)
        kwargs = dict(case.get("kwargs", {}))
        if case.get("same_data"):
            kwargs["data_seed"] = kwargs.get("data_seed", 0) + (1 if rank == case.get("differ_rank") else 0)
        else:
            kwargs["data_seed"] = kwargs.get("data_seed", 0) + rank
        try:
            res = SCRIPTS[case["script"]](model, **kwargs)
        except (ValueError, NotImplementedError) as exc:
            res = {"error": f"{type(exc).__name__}: {exc}"}
        every = [None] * world
        dist.all_gather_object(every, {k: v for k, v in res.items() if k in ("loss", "norm", "scale", "error")})
        res["ranks"] = every
        return res
    finally:
        from moreh_ap.oneline.state import STATE

        oneline.uninstall()
        STATE.engines.clear()  # the next case engages its own model
        os.environ.pop("MOREH_AP_CONFIG", None)
