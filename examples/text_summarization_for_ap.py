# The MoAI AP guide's Llama 2 summarization script, runnable offline: small random Llama, local tokenizer, synthetic data.
"""The seed's ``text_summarization_for_ap.py`` (the script of the MoAI AP guide) with only its
model and data source changed:

- the model is a small ``LlamaConfig`` with random weights (``--model-name-or-path``
  also accepts a local directory written by ``save_pretrained``);
- the tokenizer is built locally with the ``tokenizers`` library;
- the CNN/Daily Mail dataset is replaced by synthetic article/highlights pairs
  made on the fly (no hub, no network).

The seed's bugs are fixed: the stray ``break`` after the first step, the
undefined ``epoch``, the tab-indented prints, and ``from transformers import
AdamW`` (removed in transformers 5: ``torch.optim.AdamW`` is used). The default
learning rate is 1e-3 instead of the seed's 1e-5 because the model starts from
random weights instead of a pretrained checkpoint.

As in the seed, the script calls ``model.cuda()`` and ``tensor.cuda()``: under AP on a machine
without CUDA they leave everything on the CPU. Not in the seed: ``--ap-options`` passes keyword
overrides to ``enable_advanced_parallelization`` (e.g. ``mixed_precision=false,num_stages=2``).

Run (AP on; ``MOREH_AP_NPROC=2`` starts two CPU ranks)::

    MOREH_AP_NPROC=2 python examples/text_summarization_for_ap.py
"""
import copy
import os
import random
from argparse import ArgumentParser

import torch
from loguru import logger
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

import moreh_ap  # noqa: F401  (makes torch.moreh available even without the start-up hook)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "[SUMMARIZE]", "[/SUMMARIZE]"]
WORDS = (
    "the a city council river storm market team player coach school road bridge report "
    "said on in at after before during new old big small record season game win lost "
    "rain wind flood fire police court judge vote plan budget price rise fall year week "
    "today people officials residents students workers company shares profit loss north "
    "south east west minister president leader election campaign festival museum music"
).split()


# Compose pad token mask
def create_mask(input_ids, tokenizer):
    pad_token_ids = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return (input_ids != pad_token_ids).long()


# Mask pad tokens
def mask_pads(inputs, tokenizer, ignore_index=-100):
    idx_mask = create_mask(inputs, tokenizer)
    labels = copy.deepcopy(inputs)
    labels[~idx_mask.bool()] = ignore_index
    return labels


# Construct a formatted prompt
def create_prompt(prompt):
    full_prompt = f"[SUMMARIZE] {prompt['article']} [/SUMMARIZE]\n{prompt['highlights']}"
    return full_prompt


def synthetic_dataset(num_samples, *, seed=0):
    """Article/highlights pairs with structure a small model can learn.

    Articles follow a fixed word-to-next-word chain (90% of the time) and the
    highlights repeat the article's first words.
    """
    rng = random.Random(seed)
    successor = dict(zip(WORDS, rng.sample(WORDS, len(WORDS))))
    rows = []
    for _ in range(num_samples):
        article = [rng.choice(WORDS)]
        for _ in range(rng.randint(12, 40)):
            article.append(successor[article[-1]] if rng.random() < 0.9 else rng.choice(WORDS))
        rows.append({"article": " ".join(article), "highlights": " ".join(article[: rng.randint(3, 8)])})
    return rows


def build_tokenizer():
    """A word-level tokenizer over WORDS, built locally (pad id 0 as the seed sets it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def load_model_and_tokenizer(args):
    if args.model_name_or_path:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.model_name_or_path)
        model = LlamaForCausalLM.from_pretrained(args.model_name_or_path)
        return model, tokenizer
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.block_size,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config), tokenizer


def _ap_options(text):
    """'key=value,...' -> keyword overrides ('auto', true/false, integers)."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, raw = item.partition("=")
        low = raw.strip().lower()
        out[key.strip()] = {"true": True, "false": False}.get(low, int(low) if low.isdigit() else raw.strip())
    return out


# Arguments
def parse_args(argv=None):
    parser = ArgumentParser(description="LLaMA2 FineTuning")
    parser.add_argument("--model-name-or-path", type=str, default=None,
                        help="local model directory (default: a small random Llama)")
    parser.add_argument("--num-train-epochs", type=int, default=1, help="num training epochs")
    parser.add_argument("--batch-size", type=int, default=8, help="train bacth size")
    parser.add_argument("--block-size", type=int, default=128, help="max input token length")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_argument("--log-interval", type=int, default=2, help="log interval")
    parser.add_argument("--save-model-dir", type=str, default="./outputs", help="path to save model")
    # not in the seed: the size of the offline stand-ins
    parser.add_argument("--num-samples", type=int, default=96, help="synthetic training samples")
    parser.add_argument("--hidden-size", type=int, default=64, help="hidden size of the random Llama")
    parser.add_argument("--num-layers", type=int, default=4, help="decoder layers of the random Llama")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the data")
    parser.add_argument("--ap-options", type=_ap_options, default={},
                        help="keyword overrides for enable_advanced_parallelization, e.g. "
                             "'num_stages=2,mixed_precision=false'")
    return parser.parse_args(argv)


def main(args):
    hf_logging.disable_progress_bar()  # not in the seed: keep the log readable

    # Apply Advanced Parallelization
    torch.moreh.option.enable_advanced_parallelization(**args.ap_options)

    # Load base model and tokenizer
    model, tokenizer = load_model_and_tokenizer(args)
    # Set pad token
    tokenizer.pad_token_id = 0

    # Prepare the model for training on Accelerator
    model.cuda()
    model.train()

    dataset = synthetic_dataset(args.num_samples, seed=args.seed)

    # Tokenize and prepare the input prompt
    def preprocess(prompt):
        input_ids = tokenizer(
            create_prompt(prompt),
            return_attention_mask=False,
            return_token_type_ids=False,
            padding="max_length",
            truncation=True,
            max_length=args.block_size,
        )["input_ids"]
        return {"input_ids": torch.tensor(input_ids)}

    # Apply preprocess function
    dataset = [preprocess(row) for row in dataset]

    # Create a DataLoader for the training set
    generator = torch.Generator().manual_seed(args.seed)
    train_dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, generator=generator
    )

    # Define AdamW optimizer
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr)

    # Calculate total training steps
    total_step = len(train_dataloader) * args.num_train_epochs

    # Start training
    for epoch in range(args.num_train_epochs):
        for step, batch in enumerate(train_dataloader, start=1):
            input_ids = batch["input_ids"]
            inputs, labels = input_ids, mask_pads(input_ids, tokenizer)
            attn_mask = create_mask(inputs, tokenizer)
            outputs = model(
                input_ids.cuda(),
                attention_mask=attn_mask.cuda(),
                labels=labels.cuda(),
                use_cache=False,
            )
            loss = outputs[0]
            loss.backward()

            optim.step()
            model.zero_grad(set_to_none=True)
            if step % args.log_interval == 0:
                logger.info(f"[Step {step + (epoch * len(train_dataloader))}/{total_step}] Loss: {loss.item()}")

    print("Training Done")
    print("Saving Model...")

    # Save trained model
    model = model.to("cpu")
    model.save_pretrained(args.save_model_dir)
    tokenizer.save_pretrained(args.save_model_dir)
    print(f"Model saved in '{args.save_model_dir}'")

    # Not in the seed: load it back and check it is the model that was trained
    reloaded = LlamaForCausalLM.from_pretrained(args.save_model_dir)
    trained = model.state_dict()  # under AP: full weights on rank 0, meta placeholders (no data) on the others
    same = all(torch.equal(v, trained[k]) if trained[k].device.type != "meta" else v.shape == trained[k].shape
               for k, v in reloaded.state_dict().items())
    print(f"Model reloaded from '{args.save_model_dir}': {'weights match' if same else 'WEIGHTS DIFFER'}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":

    args = parse_args()
    main(args)
