# A causal-LM training loop in the shape of transformers' run_clm_no_trainer.py: accelerate, accumulation, save/load_state.
"""Usage: python tests/scripts/accelerate_clm.py OUT_DIR [--resume CKPT_DIR] [--ap line|off]

A small random GPT-2 (tied embeddings, dropout 0) built from a config, synthetic token batches, AdamW with
run_clm_no_trainer.py's two weight-decay groups, a linear schedule, ``Accelerator(gradient_accumulation_steps=2)``
and ``accelerator.prepare(model, optimizer, train_dataloader, eval_dataloader, lr_scheduler)``. Each of 4
optimizer steps runs two micro-steps under ``accelerator.accumulate(model)`` with ``accelerator.backward``;
after step 2 ``accelerator.save_state(OUT_DIR/step_2)``; then the evaluation loop with ``gather_for_metrics``
(perplexity), ``wait_for_everyone``, ``unwrap_model(model).save_pretrained(..., save_function=accelerator.save)``.
``--resume`` loads a ``save_state`` directory (``accelerator.load_state``) and runs steps 3-4 only
(``skip_first_batches``). ``--ap line`` puts the one line at the top. Prints ``RESULT {json}`` (the loss of every
micro-step, the perplexity) on every rank.
"""
import json
import math
import sys
from pathlib import Path

import torch

if "--ap" in sys.argv and sys.argv[sys.argv.index("--ap") + 1] == "line":
    torch.moreh.option.enable_advanced_parallelization(mixed_precision=False)

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, default_data_collator, get_scheduler  # noqa: E402

STEPS, ACCUMULATION, BATCH, SEQ, VOCAB = 4, 2, 4, 16, 96


class Tokens(Dataset):
    """Random token sequences (labels = inputs: the model shifts them)."""

    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.ids[i]}


def main() -> None:
    out = Path(sys.argv[1])
    resume = sys.argv[sys.argv.index("--resume") + 1] if "--resume" in sys.argv else None
    accelerator = Accelerator(gradient_accumulation_steps=ACCUMULATION, cpu=True)
    set_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=SEQ, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    train_dataloader = DataLoader(Tokens(STEPS * ACCUMULATION * BATCH, 1), collate_fn=default_data_collator,
                                  batch_size=BATCH)
    eval_dataloader = DataLoader(Tokens(2 * BATCH, 2), collate_fn=default_data_collator, batch_size=BATCH)
    no_decay = ["bias", "layer_norm.weight"]
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)],
         "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    lr_scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=1, num_training_steps=STEPS)
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler)

    completed, losses = 0, []
    active_dataloader = train_dataloader
    if resume:
        accelerator.load_state(resume)
        completed = 2
        active_dataloader = accelerator.skip_first_batches(train_dataloader, completed * ACCUMULATION)
    model.train()
    for batch in active_dataloader:
        with accelerator.accumulate(model):
            outputs = model(**batch)
            loss = outputs.loss
            losses.append(loss.detach().float().item())
            accelerator.backward(loss)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            completed += 1
            if completed == 2 and not resume:
                accelerator.save_state(str(out / "step_2"))
        if completed >= STEPS:
            break

    model.eval()
    eval_losses = []
    for batch in eval_dataloader:
        with torch.no_grad():
            outputs = model(**batch)
        eval_losses.append(accelerator.gather_for_metrics(outputs.loss.repeat(BATCH)))
    perplexity = math.exp(torch.mean(torch.cat(eval_losses)))

    accelerator.wait_for_everyone()
    unwrapped_model = accelerator.unwrap_model(model)
    unwrapped_model.save_pretrained(str(out / "final"), is_main_process=accelerator.is_main_process,
                                    save_function=accelerator.save)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    print("RESULT " + json.dumps({"rank": rank, "losses": losses, "perplexity": perplexity,
                                  "completed": completed}), flush=True)


if __name__ == "__main__":
    main()
