"""A checkpoint loaded straight into 4-bit: the QLoRA base, without its float model ever in memory.

QLoRA's point (Dettmers et al. 2023, Sec. 3) is that the frozen base fits in about 4 bits a
weight. Loading it in float first and quantizing afterwards (prepare_qlora on a float model)
needs the whole float model at once: 4 bytes a weight, eight times the 4-bit model. Here every
linear layer is quantized the moment its weight has been read from the file, through the
loader's hook (tiny_gpt/pretrained/loader.py), so the process holds the 4-bit layers so far
plus one layer's float weight:

    peak  ~  (4-bit model) + (float embeddings and norms) + (one linear weight in float)

with the embedding in bfloat16 when embedding_dtype asks (tiny_gpt/pretrained/upcast_head.py).

The codes are the ones quantize_model gives the float-loaded model (a test holds them equal):
the same weights, converted to the same dtype, quantized by the same function. LoRA goes on
top as on any 4-bit model: prepare_qlora(model, ...) finds nothing left to quantize and adds
the adapters, or apply_lora(model, ...).
"""
import torch
import torch.nn as nn

from tiny_gpt.pretrained import load_pretrained, read_config
from tiny_gpt.pretrained.build import empty_model
from tiny_gpt.util.modules import path_matches, select_paths

from .linear4bit import Linear4bit, check_compute_dtype
from .nf4 import quantize_nf4


def load_pretrained_4bit(folder, blocksize=64, double_quant=True, compute_dtype=torch.float32,
                         exclude=(), dtype=None, embedding_dtype=None):
    """A Hugging Face folder -> its model with every nn.Linear stored as NF4 (Linear4bit).

    blocksize, double_quant: as in quantize_nf4. compute_dtype: see Linear4bit. exclude:
    linear layers left in float (names matched as quantize_model's, e.g. ("lm_head",)); a
    name that matches none is refused before anything is read. dtype: the float dtype of
    everything not quantized, and of each weight before quantization (default float32).
    embedding_dtype: the frozen token embedding's storage, when smaller than dtype's --
    torch.bfloat16 halves the largest float tensor left, as the QLoRA paper keeps it."""
    check_compute_dtype(compute_dtype)
    if exclude:
        linears = [p for p, m in empty_model(read_config(folder)).named_modules()
                   if isinstance(m, nn.Linear)]
        select_paths(linears, exclude, "nn.Linear", "exclude")

    def quantize_as_read(path, weight, bias):
        if any(path_matches(path, name) for name in exclude):
            return None  # the loader fills this layer in float
        bias = None if bias is None else nn.Parameter(bias)
        return Linear4bit(quantize_nf4(weight, blocksize, double_quant), bias, compute_dtype)

    return load_pretrained(folder, dtype=dtype, linear_hook=quantize_as_read,
                           embedding_dtype=embedding_dtype)
