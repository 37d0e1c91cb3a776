# A one-device training script exercising what the one-line mode must keep working; run with AP off and on.
"""Usage: python tests/helpers/oneline_script.py OUT_DIR [line|env|off] [--ckpt] [--crash-rank R] [--stepped]

Everything a user script does: a rank-dependent seed (rank 0's weights must win), rank-dependent
batches (rank 0's batch must be used), ``model.cuda()`` / ``tensor.cuda()``, a frozen parameter,
``clip_grad_norm_``, gradient accumulation ``(loss / 2).backward()``, ``loss + f(loss)``, a short
last batch, ``model.eval()`` + forward, ``model.train()``, ``state_dict()``, ``to('cpu')`` and
``save_pretrained``. Prints ``RESULT {json}`` on every rank.
"""
import io
import json
import os
import sys
import time

import torch

import moreh_ap

OUT = sys.argv[1]
MODE = sys.argv[2] if len(sys.argv) > 2 else "line"

if MODE == "line":
    torch.moreh.option.enable_advanced_parallelization(mixed_precision=False)
RANK = moreh_ap.launch_rank()  # the self-launcher's rank (its script sees no RANK) or torchrun's

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

torch.manual_seed(RANK)  # different weights on every rank: rank 0's must win
config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     pad_token_id=0, tie_word_embeddings=False)
model = LlamaForCausalLM(config)
model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # frozen
if "--ckpt" in sys.argv:
    model.gradient_checkpointing_enable()
model.cuda()
model.train()
optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
if "--stepped" in sys.argv:
    optim.step()  # before AP engaged: must fail clearly
    model(torch.ones(2, 4, dtype=torch.long), labels=torch.ones(2, 4, dtype=torch.long))

gen = torch.Generator().manual_seed(100 + RANK)  # rank-dependent data: rank 0's batch must be used


def batch(n, seq=16):
    ids = torch.randint(1, 96, (n, seq), generator=gen)
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=gen)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, -100)
    return ids.cuda(), mask.cuda(), labels.cuda()


def forward(ids, mask, labels):
    return model(ids, attention_mask=mask, labels=labels, use_cache=False)


result = {"loss": [], "norm": [], "eval": None}
crash_rank = int(sys.argv[sys.argv.index("--crash-rank") + 1]) if "--crash-rank" in sys.argv else None
for step in range(5):
    if crash_rank is not None and step == 2 and RANK == crash_rank:
        print(f"CRASH_AT {time.time()}", file=sys.stderr, flush=True)
        raise RuntimeError(f"deliberate failure on rank {RANK}")
    if step == 2:  # gradient accumulation over two half batches
        for _ in range(2):
            out = forward(*batch(4))
            (out[0] / 2).backward()
            result["loss"].append(out.loss.item())
    elif step == 3:  # a loss with extra terms built from the returned loss
        out = forward(*batch(8))
        (out.loss + 0.1 * out.loss ** 2).backward()
        result["loss"].append(out.loss.item())
    else:  # step 4: a short last batch
        out = forward(*batch(8 if step < 4 else 4))
        out.loss.backward()
        result["loss"].append(out.loss.item())
    result["norm"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
    optim.step()
    model.zero_grad(set_to_none=True)

model.eval()
try:
    with torch.no_grad():
        result["eval"] = forward(*batch(8)).loss.item()
except NotImplementedError as exc:
    result["eval"] = f"NotImplementedError: {exc}"
model.train()

state = model.state_dict()
buffer = io.BytesIO()  # every rank's copy is checked: torch.save to a path writes on rank 0 only under AP
torch.save(state, buffer)
with open(os.path.join(OUT, f"state_rank{RANK}.pt"), "wb") as f:
    f.write(buffer.getvalue())
model = model.to("cpu")
model.save_pretrained(os.path.join(OUT, "saved"))
reloaded = LlamaForCausalLM.from_pretrained(os.path.join(OUT, "saved"))
# rank 0 holds the full weights; the other ranks meta placeholders of the same keys and shapes
result["reload_equal"] = all(torch.equal(v, state[k]) if state[k].device.type != "meta" else v.shape == state[k].shape
                             for k, v in reloaded.state_dict().items())
result["name"] = type(model).__name__
result["isinstance"] = isinstance(model, LlamaForCausalLM)
print("RESULT " + json.dumps(result), flush=True)
