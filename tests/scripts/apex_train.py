# An apex amp training script in the shape of apex's own examples (loss outside the model, FusedLAMB/SGD/AdamW).
"""Usage: APEX_LEVEL=O2 APEX_MODEL=mlp APEX_OPT=lamb APEX_OUT=final.pt [MOREH_AP_NPROC=2] python apex_train.py

The shape of apex's examples (``examples/imagenet/main_amp.py``, the README's "three lines"): build the model,
``model.cuda()``, the optimizer, ``model, optimizer = amp.initialize(model, optimizer, opt_level=...)``, then
``output = model(input); loss = criterion(output, target); optimizer.zero_grad(); with amp.scale_loss(loss,
optimizer) as scaled_loss: scaled_loss.backward(); optimizer.step()``. The line turning AP on is the only
addition; ``MOREH_ENABLE_ADVANCED_PARALLELIZATION=0`` gives the one-device run of the same script.

Variables:
    APEX_LEVEL: the opt level (O0-O3).
    APEX_MODEL: ``mlp`` (a plain nn.Module, loss outside the model) or ``llama`` (a tiny Hugging Face Llama
        called with ``labels=``: its own loss, which AP can pipeline).
    APEX_OPT: ``lamb`` (``torch.ops.moreh.FusedLAMB``), ``sgd`` (momentum) or ``adamw``.
    APEX_STEPS: optimizer steps (default 4).
    APEX_ZERO_FIRST: ``1``: ``optimizer.zero_grad()`` before the forward (O2 then makes its masters before
        AP engages).
    APEX_HALVES: ``1`` (one device only): each step backpropagates the two halves of the batch in turn (the
        halves a dp 2 run gives its ranks), through ``scale_loss`` as gradient accumulation.
    APEX_CLIP: a max norm: ``torch.nn.utils.clip_grad_norm_(amp.master_params(optimizer), max_norm)`` before
        each step (what apex's examples clip; the norms are printed).
    APEX_RESUME: a checkpoint this script saved: loaded after ``amp.initialize`` (apex's order).
    APEX_OUT: where to save ``{"model", "optimizer", "amp", "init"}`` at the end (rank 0 writes under AP).
Prints ``RESULT {json}`` on every rank: the losses, the loss scale, the dtypes the last linear layer's output had,
the clipped norms.
"""
import json
import os

import torch
import torch.nn as nn

torch.moreh.option.enable_advanced_parallelization()
amp = torch.moreh.apex.amp

LEVEL = os.environ.get("APEX_LEVEL", "O1")
MODEL = os.environ.get("APEX_MODEL", "mlp")
OPT = os.environ.get("APEX_OPT", "lamb")
STEPS = int(os.environ.get("APEX_STEPS", "4"))
ZERO_FIRST = os.environ.get("APEX_ZERO_FIRST") == "1"
HALVES = os.environ.get("APEX_HALVES") == "1"
CLIP = float(os.environ.get("APEX_CLIP", "0"))
NORMS = []


class Net(nn.Module):
    """A small MLP with a LayerNorm: the classifier of a classic example."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 8)

    def forward(self, x):
        x = torch.relu(self.norm(self.fc1(x)))
        return self.fc3(torch.relu(self.fc2(x)))


def build_model() -> nn.Module:
    if MODEL == "mlp":
        return Net()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)
    return LlamaForCausalLM(config)


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    if OPT == "lamb":
        return torch.ops.moreh.FusedLAMB(model.parameters(), lr=1e-2, weight_decay=0.01)
    if OPT == "sgd":
        return torch.optim.SGD(model.parameters(), lr=5e-2, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def batches(steps: int):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        if MODEL == "mlp":
            yield torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)
        else:
            ids = torch.randint(1, 64, (4, 16), generator=g)
            yield ids, ids


def train_step(model, criterion, optimizer, inp, target) -> float:
    if ZERO_FIRST:
        optimizer.zero_grad()
    half = inp.shape[0] // 2
    parts = [(inp[:half], target[:half]), (inp[half:], target[half:])] if HALVES else [(inp, target)]
    total = 0.0
    for i, (x, y) in enumerate(parts):
        x, y = x.cuda(non_blocking=True), y.cuda(non_blocking=True)
        if MODEL == "mlp":
            output = model(x)
            loss = criterion(output, y)
        else:
            loss = model(x, labels=y).loss
        loss = loss / len(parts)
        if i == 0 and not ZERO_FIRST:
            optimizer.zero_grad()
        with amp.scale_loss(loss, optimizer) as scaled_loss:
            scaled_loss.backward()
        total += loss.item()
    if CLIP:
        NORMS.append(float(torch.nn.utils.clip_grad_norm_(amp.master_params(optimizer), CLIP)))
    optimizer.step()
    return total


def main() -> None:
    torch.manual_seed(0)
    model = build_model()
    model.cuda()
    model.train()
    init = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model)
    model, optimizer = amp.initialize(model, optimizer, opt_level=LEVEL, verbosity=0)
    if os.environ.get("APEX_RESUME"):
        checkpoint = torch.load(os.environ["APEX_RESUME"])
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        amp.load_state_dict(checkpoint["amp"])
    criterion = nn.MSELoss().cuda()
    seen = set()  # the dtype the last linear layer computes in (under AP: on the rank that holds it)
    watched = model.fc3 if MODEL == "mlp" else model.lm_head
    watched.register_forward_hook(lambda module, args, out: seen.add(str(out.dtype)))
    losses = [train_step(model, criterion, optimizer, inp, target) for inp, target in batches(STEPS)]
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "amp": amp.state_dict(),
                  "init": init}
    if os.environ.get("APEX_OUT"):
        torch.save(checkpoint, os.environ["APEX_OUT"])
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    print("RESULT " + json.dumps({"rank": rank, "loss": losses, "dtypes": sorted(seen), "norms": NORMS, "scale": amp.state_dict()["loss_scaler0"]}),
          flush=True)


if __name__ == "__main__":
    main()
