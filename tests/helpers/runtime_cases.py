# Test models, data and the two trainers (single-process reference, moreh_ap parallel) for runtime tests.
"""A case = one model kind + one ParallelConfig + options; both trainers see the same global batches.

Models (8 blocks each, so up to 8 pipeline stages, dropout 0 unless asked):
``mlp`` (nn.Sequential with loss_fn), ``gpt`` (plain-torch, torchtitan-style), ``llama``
(HF LlamaForCausalLM, tiny), ``gpt2`` (HF GPT2LMHeadModel, tiny, tied wte/lm_head).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

N_BLOCKS = 8
VOCAB, SEQ, DIM = 64, 12, 32
LR = 1e-3
EPS = 1e-6
"""AdamW eps: 1e-6 so that gradients that are zero in exact math (a key bias: softmax ignores it) but
carry ~1e-10 float noise are not amplified by Adam into lr-sized, sign-random steps."""
STEPS = 3


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.heads, self.dropout = heads, dropout

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Plain-torch GPT, torchtitan-style: children before ``layers`` = first stage, after = last."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, DIM)
        self.pos_emb = nn.Embedding(SEQ * 2, DIM)
        self.layers = nn.ModuleList(_Block(DIM, 4, dropout) for _ in range(N_BLOCKS))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, idx):
        if self.tok_emb is not None:
            h = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        else:
            h = idx
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h) if self.norm is not None else h
        return self.head(h) if self.head is not None else h


def gpt_loss(logits, target):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def mse_loss(out, target):
    return F.mse_loss(out, target)


def build_model(kind: str, seed: int, *, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        blocks = [nn.Sequential(nn.Linear(16, 32), nn.Tanh())]
        blocks += [nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(N_BLOCKS - 2)]
        blocks += [nn.Linear(32, 8)]
        return nn.Sequential(*blocks)
    if kind == "gpt":
        return TinyGPT(dropout)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=64, num_hidden_layers=N_BLOCKS,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          attention_dropout=dropout, tie_word_embeddings=False)
        cfg._attn_implementation = "sdpa"
        return LlamaForCausalLM(cfg)
    if kind in ("qwen2", "mistral"):  # Llama-family: Qwen2's q/k/v carry biases, Mistral a sliding window
        import transformers

        name = {"qwen2": "Qwen2", "mistral": "Mistral"}[kind]
        cfg = getattr(transformers, f"{name}Config")(
            vocab_size=VOCAB, hidden_size=DIM, intermediate_size=64, num_hidden_layers=N_BLOCKS,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_dropout=dropout,
            tie_word_embeddings=False, **({"sliding_window": 8} if kind == "mistral" else {}))
        cfg._attn_implementation = "sdpa"
        return getattr(transformers, f"{name}ForCausalLM")(cfg)
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=VOCAB, n_embd=DIM, n_layer=N_BLOCKS, n_head=4, n_positions=64,
                         resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                         bos_token_id=0, eos_token_id=0)
        cfg._attn_implementation = "sdpa"
        return GPT2LMHeadModel(cfg)
    raise ValueError(kind)


def shifted_lm_loss(logits, labels):
    """A causal LM's loss computed by the script from the model's logits (HF's own shift and ignore index)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def outside_loss(forward, batch: dict):
    """``loss_outside`` cases: an HF model called without labels, the loss computed from its logits outside."""
    kwargs = dict(batch["kwargs"])
    labels = kwargs.pop("labels")
    return shifted_lm_loss(forward(*batch["args"], **kwargs).logits, labels)


def loss_fn_for(kind: str):
    return {"mlp": mse_loss, "gpt": gpt_loss}.get(kind)


def make_batch(kind: str, batch: int, step: int, seed: int, *, padding: bool = False, seq: int = SEQ) -> dict:
    """The global batch of ``step``: {"args": tuple, "kwargs": dict, "target": tensor|None}."""
    SEQ = seq  # noqa: N806 (shadows the module default for this batch)
    g = torch.Generator().manual_seed(1000 * seed + step)
    if kind == "mlp":
        return {"args": (torch.randn(batch, 16, generator=g),), "kwargs": {}, "target": torch.randn(batch, 8, generator=g)}
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    if kind == "gpt":
        return {"args": (ids,), "kwargs": {}, "target": torch.randint(0, VOCAB, (batch, SEQ), generator=g)}
    labels = ids.clone()
    kwargs = {"labels": labels}
    if padding:  # right padding, a different length per sample, plus random ignored labels
        lengths = torch.randint(SEQ // 3, SEQ + 1, (batch,), generator=g)
        mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
        labels[mask == 0] = -100
        labels[torch.rand(batch, SEQ, generator=g) < 0.2] = -100
        kwargs["attention_mask"] = mask
    return {"args": (), "kwargs": {"input_ids": ids, **kwargs}, "target": None}


def case_batches(case: dict, global_batch: int) -> list[dict]:
    """The global batches of all steps (the last one shorter when ``short_last``)."""
    out = []
    for step in range(case.get("steps", STEPS)):
        b, seq = global_batch, SEQ
        if step == case.get("steps", STEPS) - 1:
            b = case.get("short_last") or b
            seq = case.get("seq_last") or seq
        data_step = 0 if case.get("same_batch") else step
        out.append(make_batch(case["model"], b, data_step, case.get("seed", 0), padding=case.get("padding", False),
                              seq=seq))
    return out


def _prepare_model(case: dict, seed: int) -> nn.Module:
    model = build_model(case["model"], seed, dropout=0.1 if case.get("dropout") else 0.0)
    if case.get("frozen"):
        for p in _first_block(model).parameters():
            p.requires_grad_(False)
    model.train()
    return model


FROZEN_PREFIX = {"mlp": "1.", "gpt": "layers.1.", "llama": "model.layers.1.", "gpt2": "transformer.h.1."}
"""State-dict prefix of the block that ``frozen`` cases freeze."""


def _first_block(model: nn.Module) -> nn.Module:
    if isinstance(model, nn.Sequential):
        return model[1]
    if hasattr(model, "layers"):
        return model.layers[1]
    if hasattr(model, "model"):
        return model.model.layers[1]
    return model.transformer.h[1]


LAMB_LR = 1e-2
"""FusedLAMB's lr in ``optim="lamb"`` cases (the trust ratio makes each step ~lr relative to ||p||)."""


def make_optimizer(case: dict, params: list) -> torch.optim.Optimizer:
    """AdamW (lr LR, eps EPS), or with ``optim="lamb"`` moreh_ap's FusedLAMB (``lamb`` holds its kwargs)."""
    if case.get("optim") == "lamb":
        from moreh_ap.optim import FusedLAMB

        return FusedLAMB(params, **{"lr": LAMB_LR, **case.get("lamb", {})})
    return torch.optim.AdamW(params, lr=LR, eps=EPS)


def reference_run(case: dict, global_batch: int) -> dict:
    """Single-process training of the case: losses per step and the final state dict."""
    model = _prepare_model(case, case.get("seed", 0))
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(case, [p for p in model.parameters()])
    loss_fn = loss_fn_for(case["model"])
    losses, norms = [], []
    for batch in case_batches(case, global_batch):
        if case.get("loss_outside"):
            loss = outside_loss(model, batch)
        elif loss_fn is not None:
            loss = loss_fn(model(*batch["args"], **batch["kwargs"]), batch["target"])
        else:
            loss = model(*batch["args"], **batch["kwargs"]).loss
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        if case.get("clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), case["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    out = {"losses": losses, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "init": init,
           "grad_norms": norms, "opt_state": opt.state_dict()}
    if case.get("eval"):
        out["eval_loss"] = _eval_loss(model, case, global_batch)
    return out


def _eval_loss(model, case: dict, global_batch: int) -> float:
    """Loss of a held-out batch in eval mode under no_grad (works for the plain model and a ParallelModel)."""
    batch = make_batch(case["model"], global_batch, 99, case.get("seed", 0), padding=case.get("padding", False))
    model.eval()
    with torch.no_grad():
        if batch["target"] is not None:
            res = model(*batch["args"], target=batch["target"]) if hasattr(model, "train_step") \
                else model(*batch["args"])
            loss = res.loss if hasattr(res, "loss") else loss_fn_for(case["model"])(res, batch["target"])
        else:
            loss = model(*batch["args"], **batch["kwargs"]).loss
    model.train()
    return float(loss)


def parallel_run(case: dict, world: int, rank: int) -> dict:
    """The same training through ``moreh_ap.parallelize`` on this rank (call on every rank)."""
    import moreh_ap
    from moreh_ap.config import ParallelConfig

    cfg = ParallelConfig.from_dict(case["cfg"])
    seed = case.get("seed", 0) + (rank if case.get("rank_seed") else 0)
    model = _prepare_model(case, seed)
    opt = make_optimizer(case, [p for p in model.parameters()])
    if case.get("spy_moves"):
        with _MoveSpy(model) as spy:
            pm = moreh_ap.parallelize(model, cfg, optimizer=opt, loss_fn=loss_fn_for(case["model"]))
        extra = spy.report(pm)
    else:
        pm = moreh_ap.parallelize(model, cfg, optimizer=opt, loss_fn=loss_fn_for(case["model"]))
        extra = {}
    norm_inputs = _watch_norm_inputs(model) if cfg.tp > 1 else None
    losses = []
    for step, batch in enumerate(case_batches(case, cfg.global_batch(world))):
        if case.get("crash") and rank == case["crash"] and step == 1:
            _arm_crash(pm)
        if case.get("loss_outside"):  # the script's loss on the global batch's outputs (forward_global)
            loss = outside_loss(pm.forward_global, batch)
            loss.backward()
        elif case.get("hf_style") and batch["target"] is None:
            loss = pm(*batch["args"], **batch["kwargs"]).loss
            loss.backward()
        else:
            loss = pm.train_step(*batch["args"], target=batch["target"], **batch["kwargs"])
        if case.get("clip"):
            extra.setdefault("grad_norms", []).append(float(moreh_ap.clip_grad_norm_(pm, case["clip"])))
        else:
            extra.setdefault("grad_norms", []).append(float(pm.grad_norm()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        extra["loss_spread"] = max(extra.get("loss_spread", 0.0), _spread(loss.detach()))
    if case.get("eval"):
        extra["eval_loss"] = _eval_loss(pm, case, cfg.global_batch(world))
    if case.get("frozen"):
        extra["frozen_state"] = sum(len(opt.state[p]) for g in opt.param_groups for p in g["params"]
                                    if not p.requires_grad)
    if norm_inputs is not None:
        extra["norm_inputs"] = sorted(set(norm_inputs))
    state = pm.full_state_dict()
    if case.get("probe"):  # "package.module:function"(pm, model=..., opt=...) -> more results (a collective)
        import importlib

        mod, fn = case["probe"].split(":")
        extra.update(getattr(importlib.import_module(mod), fn)(pm, model=model, opt=opt))
    return {"losses": losses, "state": state, **extra}


def _watch_norm_inputs(model: nn.Module) -> list[tuple]:
    """Records, for every forward of a norm module of ``model`` (a class named ``...Norm``), how its input was
    laid: ``(DTensor placements or "plain", local sequence length, whole sequence length)``."""
    from torch.distributed.tensor import DTensor

    seen: list[tuple] = []

    def hook(mod, args):
        x = args[0]
        if isinstance(x, DTensor):
            seen.append((str(tuple(x.placements)), x.to_local().shape[1], x.shape[1]))
        else:
            seen.append(("plain", x.shape[1], x.shape[1]))

    for m in model.modules():
        if type(m).__name__.endswith("Norm"):
            m.register_forward_pre_hook(hook)
    return seen


class _MoveSpy:
    """Records every tensor that ``nn.Module._apply`` (``.to``/``.cuda``/``.float``...) or ``Tensor.to``
    with a device is applied to while active: on the CPU a move is a no-op, so this is how a test sees one.

    ``report(pm)`` (a collective) counts, over all ranks, the model's parameters and buffers that the
    plan gives to another rank (no stage of ``pm`` holds them) but that were moved anyway.
    """

    def __init__(self, model: nn.Module) -> None:
        self.tensors = list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False))  # before any wrapper replaces them

    def __enter__(self):
        self.seen: list[torch.Tensor] = []  # strong references: ids stay unique
        self._apply0, self._to0 = nn.Module._apply, torch.Tensor.to
        spy, apply0, to0 = self, self._apply0, self._to0

        def _apply(module, fn, recurse=True):
            def watched(t):
                spy.seen.append(t)
                return fn(t)
            return apply0(module, watched, recurse)

        def to(t, *args, **kwargs):
            if torch._C._nn._parse_to(*args, **kwargs)[0] is not None:
                spy.seen.append(t)
            return to0(t, *args, **kwargs)

        nn.Module._apply, torch.Tensor.to = _apply, to
        return self

    def __exit__(self, *exc):
        nn.Module._apply, torch.Tensor.to = self._apply0, self._to0

    def report(self, pm) -> dict:
        import torch.distributed as dist

        held = {n for st in pm._stages for names in st.names.values() for n in names}
        seen = {id(t) for t in self.seen}
        foreign = [t for n, t in self.tensors if n not in held]
        own = [t for n, t in self.tensors if n in held and isinstance(t, nn.Parameter)]
        moved = torch.tensor([sum(id(t) in seen for t in foreign)])
        mins = torch.tensor([-sum(id(t) in seen for t in own), -len(foreign)])  # max of negatives = min
        if dist.is_initialized():
            dist.all_reduce(moved)
            dist.all_reduce(mins, op=dist.ReduceOp.MAX)
        counts = [int(moved[0]), int(mins[0]), int(mins[1])]
        return {"foreign_moved": int(counts[0]), "own_moved_min": -int(counts[1]), "foreign_min": -int(counts[2])}


def _spread(loss: torch.Tensor) -> float:
    """max - min of the returned loss over all ranks (must be 0: the same value everywhere)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return 0.0
    hi, lo = loss.clone().float(), loss.clone().float()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float(hi - lo)


def _arm_crash(pm) -> None:
    stage = pm.stage_modules[0]

    def boom(*_):
        raise RuntimeError("injected failure in forward (crash test)")

    stage.register_forward_pre_hook(boom)


def max_abs_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a) if a else math.nan


def assert_close_fp32(a, b, what: str) -> None:
    """fp32 equivalence with one process (``rtol=1e-4, atol=1e-5``), naming what differs."""
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-4, atol=1e-5,
                               msg=lambda m: f"{what}: {m}")


def update_rel_error(got: dict, ref: dict, init: dict) -> float:
    """||(got - init) - (ref - init)|| / ||ref - init|| over all weights: how far a run's training
    moved the model away from where the reference moved it (for bf16 runs)."""
    num = sum(float((got[k].float() - ref[k].float()).pow(2).sum()) for k in ref)
    den = sum(float((ref[k].float() - init[k].float()).pow(2).sum()) for k in ref)
    return math.sqrt(num / den)


# ------------------------------------------------------------------ the combinations under test
DIMENSIONS = {
    "model": ("gpt", "llama", "gpt2", "mlp"),
    "pp_dp": ((1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (4, 1)),
    "schedule": ("GPipe", "1F1B", "Interleaved1F1B"),
    "distribute_param": (False, True),
    "distribute_low_prec_param": (False, True),
    "recomputation": (False, True),
    "num_micro_batches": (1, 2, 4),
    "mixed_precision": (False, True),
}
BATCH_PER_DEVICE = 2


def combo_config(combo: dict):
    """The ParallelConfig of a combination, or None when ``validate()`` rejects it."""
    from moreh_ap.config import ParallelConfig

    pp, dp = combo["pp_dp"]
    interleaved = combo["schedule"] == "Interleaved1F1B" and pp > 1
    try:
        cfg = ParallelConfig(num_stages=pp, num_micro_batches=combo["num_micro_batches"],
                             batch_per_device=BATCH_PER_DEVICE, recomputation=combo["recomputation"],
                             distribute_param=combo["distribute_param"],
                             distribute_low_prec_param=combo["distribute_low_prec_param"],
                             mixed_precision=combo["mixed_precision"], schedule=combo["schedule"],
                             stages_per_rank=2 if interleaved else 1)
        return cfg.validate(pp * dp, num_blocks=N_BLOCKS)
    except ValueError:
        return None


def all_valid_combos() -> list[dict]:
    """Every combination of DIMENSIONS that ``ParallelConfig.validate`` accepts (the ``full`` set)."""
    import itertools

    names = list(DIMENSIONS)
    out = []
    for values in itertools.product(*(DIMENSIONS[n] for n in names)):
        combo = dict(zip(names, values))
        if combo_config(combo) is not None:
            out.append(combo)
    return out


def covering_combos() -> list[dict]:
    """A greedy pairwise covering set: every pair of dimension values that some valid combination
    holds appears in at least one chosen combination (deterministic)."""
    import itertools

    combos = all_valid_combos()
    names = list(DIMENSIONS)

    def pairs(c):
        return {((a, c[a]), (b, c[b])) for a, b in itertools.combinations(names, 2)}

    uncovered = set().union(*(pairs(c) for c in combos))
    chosen = []
    cached = [pairs(c) for c in combos]
    while uncovered:
        best = max(range(len(combos)), key=lambda i: (len(cached[i] & uncovered), -i))
        chosen.append(combos[best])
        uncovered -= cached[best]
    return chosen


def combo_case(combo: dict) -> dict:
    cfg = combo_config(combo)
    pp, dp = combo["pp_dp"]
    cid = (f"{combo['model']}-pp{pp}dp{dp}-{combo['schedule'] if pp > 1 else 'nopipe'}-mb{combo['num_micro_batches']}"
           f"-dist{int(combo['distribute_param'])}{int(combo['distribute_low_prec_param'])}"
           f"-rc{int(combo['recomputation'])}-{'bf16' if combo['mixed_precision'] else 'fp32'}")
    return {"id": cid, "model": combo["model"], "cfg": cfg.to_dict(), "world": pp * dp}
