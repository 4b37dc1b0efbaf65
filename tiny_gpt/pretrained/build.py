"""A model of a config's shape: built on the meta device first, then given its storage.

Built on "meta", a module has the shapes of its tensors but no memory behind them, so nothing
is allocated twice: build_model then gives every tensor its storage once, in the dtype asked
for, and initializes it; the loader instead fills each tensor from the checkpoint (loader.py).
"""
import contextlib

import torch
import torch.nn as nn

from .causal_lm import init_weights
from .config import ModelConfig
from .gpt2 import GPT2LMHeadModel
from .llama import LlamaForCausalLM

MODEL_CLASSES = {"llama": LlamaForCausalLM, "qwen2": LlamaForCausalLM, "gpt2": GPT2LMHeadModel}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_dtype(dtype, role="dtype"):
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{role} must be one of {FLOAT_DTYPES}, got {dtype!r}")
    return dtype


def empty_model(cfg: ModelConfig, dtype=torch.float32, embedding_dtype=None):
    """The model's modules on the meta device, in `dtype` (the token embedding in
    `embedding_dtype` when given, and frozen): shapes only, no storage."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build_model needs a ModelConfig (read_config, shipped_config), got "
                        f"{type(cfg).__name__}")
    check_dtype(dtype)
    if embedding_dtype is not None:
        check_dtype(embedding_dtype, "embedding_dtype")
    with torch.device("meta"), modules_without_init():
        model = MODEL_CLASSES[cfg.model_type](cfg).to(dtype)
    if embedding_dtype not in (None, dtype):  # stored in fewer bits because it stays frozen
        model.tok_emb.to(embedding_dtype).requires_grad_(False)
    return model


@contextlib.contextmanager
def modules_without_init(classes=(nn.Linear, nn.Embedding, nn.LayerNorm)):
    """torch's layers fill their weights with random numbers when built. On the meta device
    there is nothing to fill, yet torch's meta random fills import torch._dynamo the first
    time (seconds, and ~70 MB that a memory measurement of loading would count): skip them."""
    saved = {cls: cls.reset_parameters for cls in classes}
    try:
        for cls in classes:
            cls.reset_parameters = lambda self: None
        yield
    finally:
        for cls, reset in saved.items():
            cls.reset_parameters = reset


def build_model(cfg: ModelConfig, dtype=torch.float32, device="cpu"):
    """A model of `cfg`'s shape with random weights (Hugging Face's initialization)."""
    model = empty_model(cfg, dtype).to_empty(device=device)
    return model.apply(init_weights)  # (on real storage: no meta fills)
