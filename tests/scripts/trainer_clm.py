# A causal-LM fine-tuning script in the shape of transformers' run_clm.py: HfArgumentParser, Trainer, save, resume.
"""Usage: python tests/scripts/trainer_clm.py --output_dir DIR [TrainingArguments...] [--ap line|env|off]

A small random GPT-2 from a config (dropout 0), a tokenizer-free synthetic dataset of padded sequences
(labels -100 on the pads), ``Trainer`` + ``TrainingArguments`` (the test passes ``--use_cpu``,
``--gradient_accumulation_steps 2``, ``--save_steps``, ``--logging_steps 1``, ``--report_to none``),
``train()`` (resuming from ``--resume_from_checkpoint`` when given), ``save_model()``, ``evaluate()``,
``log_metrics`` / ``save_metrics`` / ``save_state``. ``--ap line`` puts the one line at the top (``env``:
the test sets ``MOREH_ENABLE_ADVANCED_PARALLELIZATION=1``; ``off``: nothing). Prints ``RESULT {json}``
(per-step losses from the trainer's log history, the evaluation loss) on every rank.
"""
import json
import sys
from dataclasses import dataclass, field

import torch

if "--ap" in sys.argv and sys.argv[sys.argv.index("--ap") + 1] == "line":
    torch.moreh.option.enable_advanced_parallelization(mixed_precision=False)

from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)


@dataclass
class ModelArguments:
    """What run_clm.py calls the model arguments: here a config to build the model from, no checkpoint."""

    n_layer: int = field(default=2, metadata={"help": "transformer blocks"})
    n_embd: int = field(default=32, metadata={"help": "width"})
    vocab_size: int = field(default=96, metadata={"help": "vocabulary (token 0 is the pad)"})
    ap: str = field(default="off", metadata={"help": "line | env | off (how the test turned AP on)"})


@dataclass
class DataArguments:
    """The synthetic dataset: ``train_samples`` / ``eval_samples`` sequences of ``block_size`` tokens."""

    train_samples: int = field(default=32)
    eval_samples: int = field(default=8)
    block_size: int = field(default=16)


class PaddedTokens(torch.utils.data.Dataset):
    """Sequences of random length, right-padded with token 0 (attention mask 0, label -100 on the pads)."""

    def __init__(self, n: int, *, block_size: int, vocab_size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab_size, (n, block_size), generator=g)
        lengths = torch.randint(block_size // 2, block_size + 1, (n,), generator=g)
        self.mask = (torch.arange(block_size)[None, :] < lengths[:, None]).long()
        self.ids = self.ids * self.mask

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "labels": self.ids[i].masked_fill(self.mask[i] == 0, -100)}


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    set_seed(training_args.seed)

    config = GPT2Config(n_layer=model_args.n_layer, n_embd=model_args.n_embd, n_head=4,
                        vocab_size=model_args.vocab_size, n_positions=data_args.block_size, pad_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    train_dataset = PaddedTokens(data_args.train_samples, block_size=data_args.block_size,
                                 vocab_size=model_args.vocab_size, seed=1)
    eval_dataset = PaddedTokens(data_args.eval_samples, block_size=data_args.block_size,
                                vocab_size=model_args.vocab_size, seed=2)

    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      data_collator=default_data_collator)
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    metrics = train_result.metrics
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    eval_metrics = trainer.evaluate()
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    steps = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    print("RESULT " + json.dumps({"rank": rank, "losses": steps, "eval_loss": eval_metrics["eval_loss"],
                                  "global_step": trainer.state.global_step}), flush=True)


if __name__ == "__main__":
    main()
