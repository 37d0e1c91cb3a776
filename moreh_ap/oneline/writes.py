# Writes happen once: after engagement, the checkpoint writes of ranks other than 0 write nothing.
"""The script runs on every rank, but its checkpoint files are written by rank 0 only.

After AP engaged (the process group is up), on ranks other than 0:

- ``torch.save(obj, path_or_file)`` and ``safetensors.torch.save_file`` / ``save_model`` write nothing and
  return None (``torch.save`` to an in-memory ``io.BytesIO`` still runs: it writes no file);
- for the Hugging Face ``Trainer`` (patched once its training loop steps the optimizer, or once the engaged
  model is a Hugging Face model): the trainer state JSON, the checkpoint rotation, the tokenizer / processor /
  config ``save_pretrained``, the metrics files (``Trainer.is_world_process_zero()`` is True on rank 0 only);
  its ``training_args.bin``, optimizer, scheduler and RNG-state files are ``torch.save`` calls.

What is computed before a write still runs on every rank: ``model.state_dict()`` and
``optimizer.state_dict()`` are collectives after engagement, and the script calls them on every rank as
it did on one device; only the write itself is dropped. ``save_pretrained`` of the engaged model is rank 0
only already (:mod:`moreh_ap.oneline.swap`). The library's own calls (under
:class:`~moreh_ap.oneline.state.Internal`) are never dropped. Other file writes (``open(..., "w")``,
``numpy.save``, ``os.makedirs``) happen on every rank.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import io
from typing import Any

import torch

from moreh_ap.log import logger
from moreh_ap.models import is_hf_model
from moreh_ap.oneline.state import STATE, engaged_model, internal
from moreh_ap.runtime.dist import rank

__all__ = ["writes_here", "patch_writes", "patch_library_writes", "restore_writes"]

# (module, owner in it, attribute): Hugging Face entry points whose writes only rank 0 makes
_HF_WRITES = (
    ("transformers.trainer_callback", "TrainerState", "save_to_json"),
    ("transformers.trainer", None, "rotate_checkpoints"),
    ("transformers.tokenization_utils_base", "PreTrainedTokenizerBase", "save_pretrained"),
    ("transformers.processing_utils", "ProcessorMixin", "save_pretrained"),
    ("transformers.feature_extraction_utils", "FeatureExtractionMixin", "save_pretrained"),
    ("transformers.image_processing_base", "ImageProcessingMixin", "save_pretrained"),
    ("transformers.configuration_utils", "PretrainedConfig", "save_pretrained"),
    ("transformers.generation.configuration_utils", "GenerationConfig", "save_pretrained"),
)


def writes_here() -> bool:
    """Whether this process writes checkpoint files: not engaged yet, rank 0, or the library's own call."""
    return internal() or not STATE.engaged or rank() == 0


def _rank0_only(original, *, keep_memory_files: bool = False):
    """``original`` on rank 0 (and before engagement); on other ranks a call that writes nothing."""

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        target = args[1] if len(args) > 1 else kwargs.get("f")
        if writes_here() or (keep_memory_files and isinstance(target, io.BytesIO)):
            return original(*args, **kwargs)
        return None

    return wrapper


def patch_writes() -> None:
    """``torch.save`` and safetensors' ``save_file`` / ``save_model`` write on rank 0 only (idempotent)."""
    o = STATE.originals
    if "torch_save" in o:
        return
    o["torch_save"] = torch.save
    torch.save = _rank0_only(torch.save, keep_memory_files=True)
    try:
        import safetensors.torch as st
    except ImportError:  # safetensors is optional
        return
    o["st_save_file"], o["st_save_model"] = st.save_file, st.save_model
    st.save_file, st.save_model = _rank0_only(st.save_file), _rank0_only(st.save_model)


def patch_library_writes() -> None:
    """After engagement, the Hugging Face writes (trainer state, rotation, tokenizer/config files, metrics)
    are rank 0's, when the engaged model is a Hugging Face model or transformers' code is stepping the
    optimizer (the ``Trainer``; transformers is then already imported, so importing it here costs little).
    Called at each optimizer step; does its work once."""
    if "hf_writes" in STATE.originals or not STATE.engaged:
        return
    root = engaged_model()
    if not (root is not None and is_hf_model(root)) and not _called_from_transformers():
        return
    STATE.originals["hf_writes"] = []
    try:
        import transformers.trainer as hf_trainer
    except Exception as exc:  # transformers absent, or its Trainer unusable (e.g. accelerate missing)
        logger.debug(f"Hugging Face write guards not installed: {exc}")
        return
    for module_name, owner, attr in _HF_WRITES:
        try:
            holder = importlib.import_module(module_name)
            holder = getattr(holder, owner) if owner else holder
            original = holder.__dict__[attr]
        except (ImportError, AttributeError, KeyError):
            continue  # not in this transformers version
        if not inspect.isfunction(original):
            continue
        STATE.originals["hf_writes"].append((holder, attr, original))
        setattr(holder, attr, _rank0_only(original))
    original = hf_trainer.Trainer.__dict__["is_world_process_zero"]
    STATE.originals["hf_writes"].append((hf_trainer.Trainer, "is_world_process_zero", original))
    hf_trainer.Trainer.is_world_process_zero = _world_process_zero(original)


def _world_process_zero(original):
    @functools.wraps(original)
    def is_world_process_zero(self) -> bool:
        """Rank 0 only after AP engaged (the Trainer itself sees one process)."""
        return rank() == 0 if STATE.engaged else original(self)

    return is_world_process_zero


def _called_from_transformers() -> bool:
    """Whether a caller in this thread's stack is transformers' code (e.g. its Trainer's training loop)."""
    frame = inspect.currentframe()
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith("transformers."):
            return True
        frame = frame.f_back
    return False


def restore_writes() -> None:
    """Put back every function :func:`patch_writes` and :func:`patch_library_writes` replaced."""
    o: dict[str, Any] = STATE.originals
    if "torch_save" in o:
        torch.save = o.pop("torch_save")
    if "st_save_file" in o:
        import safetensors.torch as st

        st.save_file, st.save_model = o.pop("st_save_file"), o.pop("st_save_model")
    for holder, attr, original in reversed(o.pop("hf_writes", [])):
        setattr(holder, attr, original)
