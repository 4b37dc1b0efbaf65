"""Real pretrained checkpoints: the Llama family and GPT-2 written by hand, and a loader for
Hugging Face folders (config.json + safetensors). Nothing is downloaded: a folder the reader
already has is read, or a shipped config gives the shape with random weights.

    config.py      ModelConfig, read from config.json and checked; the shipped configs
    causal_lm.py   what the families share: forward (logits, loss) and greedy generation
    llama.py       Llama 2 / 3.x, TinyLlama, SmolLM2, Qwen2 / 2.5: RMSNorm, RoPE, GQA, SwiGLU
    gpt2.py        GPT-2: LayerNorm, learned positions, tanh GELU; c_attn split into q, k, v
    build.py       build_model: a config's shape with random weights (meta device first)
    loader_maps.py each family's file names and layouts against this package's modules
    loader.py      load_pretrained: checked, one tensor at a time from a memory map;
                   save_pretrained: a model written back as such a folder
    tokenizer.py   load_tokenizer: tokenizer.json's byte-level BPE, by hand (bpe.py)

The 4-bit entry (each linear weight quantized as it is read) lives in quant/load_4bit.py:
tiny_gpt imports neither lora nor quant, so load_pretrained takes a hook for it.
"""
from .build import build_model
from .config import ModelConfig, read_config, shipped_config
from .loader import load_pretrained, save_pretrained
from .tokenizer import load_tokenizer

__all__ = ["ModelConfig", "read_config", "shipped_config", "build_model", "load_pretrained",
           "save_pretrained", "load_tokenizer"]
