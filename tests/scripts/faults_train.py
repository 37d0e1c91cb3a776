# A one-device training script for the fault tests: one rank raises, hangs or is interrupted; markers go to OUT.
"""Usage: python faults_train.py OUT raise|hang|none FAULT_RANK AT_STEP  (env FAULT_STEPS: steps, default 6)

Writes ``OUT/pid<r>`` at the start, ``OUT/step<r>`` after each step, and in its ``except
KeyboardInterrupt`` ``OUT/interrupted<r>`` (the exception's type and step) and ``OUT/saved<r>`` (after
``model.state_dict()``, a collective), and ``OUT/finally<r>`` in its ``finally``.
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

torch.moreh.option.enable_advanced_parallelization(mixed_precision=False)
import moreh_ap  # noqa: E402

OUT, FAULT, FAULT_RANK, AT = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
STEPS = int(os.environ.get("FAULT_STEPS", "6"))
RANK = moreh_ap.launch_rank()
TRIGGER = [False]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x, y):
        if TRIGGER[0] and FAULT == "raise":
            raise RuntimeError(f"boom in the forward of rank {RANK}")
        if TRIGGER[0] and FAULT == "hang":
            while True:  # a busy loop inside the step
                pass
        pred = self.layers(x)
        return {"logits": pred, "loss": F.mse_loss(pred, y)}


def mark(name: str, text: str = "") -> None:
    with open(os.path.join(OUT, name + ".tmp"), "w") as f:
        f.write(text)
    os.replace(os.path.join(OUT, name + ".tmp"), os.path.join(OUT, name))


mark(f"pid{RANK}", str(os.getpid()))
torch.manual_seed(0)
model = Net()
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
gen = torch.Generator().manual_seed(1)
step = -1
try:
    for step in range(STEPS):
        TRIGGER[0] = step == AT and RANK == FAULT_RANK
        x = torch.randn(8, 8, generator=gen)
        out = model(x, x.sum(1, keepdim=True))
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        mark(f"step{RANK}", str(step))
        time.sleep(0.05)
except KeyboardInterrupt as exc:
    mark(f"interrupted{RANK}", json.dumps({"type": type(exc).__name__, "step": step}))
    state = model.state_dict()  # a collective: every rank stopped at the same boundary
    mark(f"saved{RANK}", str(len(state)))
    raise
finally:
    mark(f"finally{RANK}", str(step))
print(f"rank {RANK} done", flush=True)
