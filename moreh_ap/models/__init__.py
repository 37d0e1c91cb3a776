# moreh_ap.models: one adapter per model family (blocks for the planner, stage split and loss for the runtime).
"""The model registry.

``find_adapter(model)`` returns the :class:`ModelAdapter` of the model's family: Hugging Face Llama-family
causal LMs, Hugging Face GPT-2, nanoGPT-style GPTs, torchtitan-style block lists, ``nn.Sequential``, and a generic adapter for
every other model (blocks found for the planner, but no pipeline split). ``register_adapter`` adds a family.
"""
from moreh_ap.models.base import (ModelAdapter, block_signature, clean_name, is_hf_model, map_stage_names,
                                  param_names)
from moreh_ap.models.block_list import BlockListAdapter
from moreh_ap.models.generic import GenericAdapter
from moreh_ap.models.gpt2 import GPT2Adapter
from moreh_ap.models.hf_llama import LlamaAdapter
from moreh_ap.models.nanogpt import NanoGPTAdapter
from moreh_ap.models.registry import find_adapter, find_blocks, register_adapter, registered_adapters
from moreh_ap.models.sequential import SequentialAdapter

__all__ = [
    "BlockListAdapter",
    "GPT2Adapter",
    "GenericAdapter",
    "LlamaAdapter",
    "ModelAdapter",
    "NanoGPTAdapter",
    "SequentialAdapter",
    "block_signature",
    "clean_name",
    "find_adapter",
    "find_blocks",
    "is_hf_model",
    "map_stage_names",
    "param_names",
    "register_adapter",
    "registered_adapters",
]
