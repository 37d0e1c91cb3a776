# A one-device script that saves in every way scripts do; under AP each rank names its files by its rank.
"""Usage: python tests/scripts/writes_script.py OUT_DIR

Trains 2 steps of a tiny Llama (AP engages at the first), then, on every rank, writes with ``torch.save``
(path and file object), safetensors, ``config.save_pretrained``, a tokenizer's ``save_pretrained``, the
Trainer's ``TrainerState.save_to_json`` and checkpoint rotation, and ``model.save_pretrained``; the paths
carry the rank so the test can see which rank wrote. Prints ``RESULT {json}`` on every rank.
"""
import io
import json
import os
import sys

import torch

torch.moreh.option.enable_advanced_parallelization(mixed_precision=False)

import moreh_ap  # noqa: E402
import safetensors.torch as st  # noqa: E402
import transformers.trainer as hf_trainer  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerState  # noqa: E402

OUT = sys.argv[1]
LAUNCH_RANK = moreh_ap.launch_rank()  # the script's way to know its rank (no RANK in its environment)

config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)
torch.manual_seed(0)
model = LlamaForCausalLM(config)
model.train()
optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
torch.save({"x": torch.ones(1)}, os.path.join(OUT, f"before_rank{LAUNCH_RANK}.pt"))  # not engaged: every rank

gen = torch.Generator().manual_seed(1)
for _ in range(2):
    ids = torch.randint(1, 64, (4, 8), generator=gen)
    model(ids, labels=ids).loss.backward()
    optim.step()
    optim.zero_grad()

rank = torch.distributed.get_rank()


def out(name: str) -> str:
    return os.path.join(OUT, name.format(r=rank))


state = model.state_dict()  # a collective after engagement: every rank calls it
torch.save(state, out("state_rank{r}.pt"))
with open(out("fileobj_rank{r}.pt"), "wb") as f:
    torch.save(optim.state_dict(), f)
buf = io.BytesIO()
torch.save(state, buf)
st.save_file({k: v.contiguous() for k, v in state.items()}, out("st_rank{r}.safetensors"))
st.save_model(torch.nn.Linear(2, 2), out("stmodel_rank{r}.safetensors"))
model.config.save_pretrained(out("config_rank{r}"))
vocab = {"[PAD]": 0, "[UNK]": 1, "hello": 2}
tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")),
                                    pad_token="[PAD]", unk_token="[UNK]")
tokenizer.save_pretrained(out("tok_rank{r}"))
TrainerState(global_step=2).save_to_json(out("trainer_state_rank{r}.json"))
run = os.path.join(OUT, "run")  # one directory for both ranks, as a Trainer's output_dir
for step in (1, 2):
    os.makedirs(os.path.join(run, f"checkpoint-{step}"), exist_ok=True)
torch.distributed.barrier()
hf_trainer.rotate_checkpoints(output_dir=run, save_total_limit=1)  # rank 1 deleting too would race rank 0
model.save_pretrained(os.path.join(OUT, "saved"))
print("RESULT " + json.dumps({"rank": rank, "bytesio": len(buf.getvalue()),
                              "world_zero": hf_trainer.Trainer.is_world_process_zero(None)}), flush=True)
