"""What fine-tuning a real checkpoint costs: the recipes of lesson 16 built on a model of a
real shape, and the measurements that must each run in a fresh process.

A recipe (tiny_gpt/memory/predict.py's RECIPES) is what is trained and in which bytes:

    full FT fp32         every weight trained, float32
    LoRA                 the base frozen in float32, adapters r = 8 on q_proj, v_proj
    LoRA + bf16 weights  the whole model in bfloat16, adapters too (they take the base's dtype)
    LoRA + ckpt          LoRA with every block checkpointed (recomputed in backward)
    QLoRA                every linear layer of the base in NF4, the frozen embedding in
                         bfloat16 (as the QLoRA paper), hidden states and adapters float32
    QLoRA + ckpt         QLoRA with every block checkpointed

`build(cfg, recipe)` makes such a model with random weights. A 4-bit one is never float as a
whole: it is built on the meta device and filled one tensor at a time by the loader's own
`fill` (tiny_gpt/pretrained/loader.py), each linear weight drawn and quantized at once -- the
same path as loading a checkpoint straight into 4 bits (quant/load_4bit.py), with random
numbers for a file. So a process that trains QLoRA never holds the float model, and its peak
resident memory says what QLoRA needs.

The functions at the end are run by tiny_gpt.memory.peak_memory.measure_peak in a new
interpreter each, and return plain numbers (json): the peak of one process is one measurement.
"""
import dataclasses
import time

import torch
import torch.nn as nn

from quant import Linear4bit, load_pretrained_4bit, quantize_nf4
from tiny_gpt.memory.ledger import measure_step, weight_ledger
from tiny_gpt.memory.predict import RECIPES
from tiny_gpt.memory.step_time import idle_adamw
from tiny_gpt.pretrained import build_model, load_pretrained, read_config, shipped_config
from tiny_gpt.pretrained.build import empty_model
from tiny_gpt.pretrained.loader import fill

from .inject import apply_lora

INIT_STD = 0.02  # Hugging Face's initializer_range for these families
DTYPE_OF_BYTES = {4: torch.float32, 2: torch.bfloat16}


def check_recipe(name):
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; use one of {list(RECIPES)}")
    return RECIPES[name]


def random_tensor(name, shape, dtype, generator):
    """Random values for parameter `name`, as Hugging Face initializes them: N(0, 0.02) for
    matrices, ones for a norm's weight, zeros for biases."""
    if len(shape) == 2:
        return torch.empty(shape, dtype=dtype).normal_(0.0, INIT_STD, generator=generator)
    make = torch.ones if name.endswith("norm.weight") else torch.zeros
    return make(shape, dtype=dtype)


def quantize_linear(path, weight, bias):
    """The 4-bit loader's hook: an nn.Linear's weight, as it arrives, becomes a Linear4bit."""
    return Linear4bit(quantize_nf4(weight), None if bias is None else nn.Parameter(bias))


def random_4bit_model(cfg, seed=0, embedding_dtype=torch.bfloat16):
    """A model of cfg's shape with random weights and every nn.Linear in NF4, its float
    weights drawn one layer at a time (see the module docstring)."""
    model = empty_model(cfg, embedding_dtype=embedding_dtype)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    fill(model, lambda name, dtype: random_tensor(name, shapes[name], dtype, generator),
         quantize_linear)
    return model


def build(cfg, recipe, seed=0):
    """A model for `recipe` (a Recipe or its name): random weights of cfg's shape, adapters
    on the recipe's targets (alpha = 2 r), checkpointing as it says."""
    recipe = check_recipe(recipe) if isinstance(recipe, str) else recipe
    cfg = dataclasses.replace(cfg, gradient_checkpointing=recipe.checkpointing)
    torch.manual_seed(seed)
    if recipe.base == "nf4":
        model = random_4bit_model(cfg, seed, DTYPE_OF_BYTES[recipe.embedding_bytes])
    else:
        model = build_model(cfg, torch.bfloat16 if recipe.base == "bf16" else torch.float32)
    if not recipe.full:
        apply_lora(model, targets=recipe.lora_targets, r=recipe.r, alpha=2 * recipe.r)
    return model.train()


def random_batch(cfg, batch, seq_len, seed=0):
    """[(x, y, None)]: random token ids and next-token targets, (batch, seq_len) each."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(cfg.vocab_size, (batch, seq_len + 1), generator=generator)
    return [(ids[:, :-1], ids[:, 1:], None)]


def config_of(model_config):
    """A shipped config's name ("smollm2-135m") or a folder / config.json path."""
    try:
        return shipped_config(model_config)
    except ValueError:
        return read_config(model_config)


# --- run in a fresh interpreter by measure_peak: each returns json-ready numbers ----------

def train_step(model_config, recipe, batch, seq_len, seed=0):
    """Build `recipe`'s model of that shape and run one AdamW step measured by the ledger.
    -> {"ledger": {field: bytes}, "build_s", "step_s"}."""
    cfg = config_of(model_config)
    start = time.perf_counter()
    model = build(cfg, recipe, seed)
    built = time.perf_counter()
    ledger = measure_step(model, random_batch(cfg, batch, seq_len, seed), idle_adamw(model))
    fields = ("frozen", "trainable", "grads", "optimizer", "activations")
    return {"ledger": {f: getattr(ledger, f) for f in fields}, "build_s": built - start,
            "step_s": time.perf_counter() - built}


def load_float(folder):
    """load_pretrained(folder) in float32 -> {"model_bytes"}."""
    return {"model_bytes": weight_ledger(load_pretrained(folder)).weights}


def load_4bit(folder):
    """load_pretrained_4bit(folder), the embedding in bfloat16 as QLoRA keeps it ->
    {"model_bytes", "largest_linear_bytes"}: the 4-bit model's bytes, and the largest linear
    weight's in float32 (the one float weight the loader holds at a time)."""
    model = load_pretrained_4bit(folder, embedding_dtype=torch.bfloat16)
    largest = max(m.in_features * m.out_features for m in model.modules()
                  if isinstance(m, Linear4bit))
    return {"model_bytes": weight_ledger(model).weights, "largest_linear_bytes": 4 * largest}
