# A GPU training script, unchanged, on a CPU-only machine: every CUDA call such scripts make, then training.
"""Usage: python tests/scripts/cuda_calls_train.py

Run with AP (``MOREH_AP_NPROC=2``) and with ``MOREH_ENABLE_ADVANCED_PARALLELIZATION=0`` (one device, the
calls still accepted). The batches come from the global generator, so the run also shows whether AP
left the script's random stream alone. Prints ``RESULT {json}`` on every rank.
"""
import hashlib
import json

import torch

torch.moreh.option.enable_advanced_parallelization(mixed_precision=False)

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

local_rank = 0
torch.cuda.set_device(local_rank)
device = torch.device("cuda", local_rank)
torch.manual_seed(0)
torch.cuda.manual_seed(0)
torch.cuda.manual_seed_all(0)

config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
model = LlamaForCausalLM(config).to(device)
model.cuda()
model.train()
optim = torch.optim.AdamW(model.parameters(), lr=1e-2)


def rng_digest() -> str:
    return hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]


result = {"loss": [], "rng": [], "devices": []}
for step in range(3):
    result["rng"].append(rng_digest())  # before the step: AP engages in step 0
    ids = torch.randint(1, 96, (4, 16))  # the global generator, as nanoGPT's get_batch
    ids = ids.to(device, non_blocking=True)
    labels = ids.cuda()
    mask = torch.ones_like(ids).to(local_rank)
    out = model(ids, attention_mask=mask.to(device="cuda"), labels=labels)
    out.loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    result["loss"].append(out.loss.item())
    result["devices"] = sorted({ids.device.type, labels.device.type, mask.device.type})
result["rng"].append(rng_digest())

rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
print("RESULT " + json.dumps({"rank": rank, **result}), flush=True)
