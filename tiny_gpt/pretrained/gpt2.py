"""GPT-2 by hand (Radford et al. 2019): the tiny GPT's architecture at OpenAI's sizes.

    x_0 = E[idx] + P[positions]                                  learned positions
    h = x + o_proj(Attn(q_proj(n), k_proj(n), v_proj(n))),       n = LayerNorm(x)
    y = h + c_proj(gelu_tanh(c_fc(m))),                          m = LayerNorm(h)
    gelu_tanh(u) = u/2 * (1 + tanh(sqrt(2/pi) * (u + 0.044715 u^3)))
    logits = LayerNorm(x_L) @ E^T                                head tied to the embedding

The attention is the tiny GPT's own (tiny_gpt/model.py, CausalSelfAttention): four separate
projections with biases. The checkpoints store q, k and v fused in one `c_attn` and every
weight transposed (their Conv1D keeps (in, out)); the loader splits and transposes them
(loader_maps.py), so that LoRA can adapt Q and V apart, as the LoRA paper does. Other module
paths follow the files: transformer.wte, transformer.h.N.ln_1, .mlp.c_fc, ... Dropout is left
out (LoRA fine-tuning here runs without it; the files' attn_pdrop is not read).
"""
import torch.nn as nn
import torch.nn.functional as F

from ..model import CausalSelfAttention, GPTConfig
from .causal_lm import CausalLM
from .config import ModelConfig


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(GPTConfig(n_embd=cfg.hidden_size,
                                                  n_head=cfg.num_attention_heads))
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache=cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    """The stack without its head; named `transformer` inside the causal LM, as in the files."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


class GPT2LMHeadModel(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = GPT2Model(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def blocks(self):
        return self.transformer.h

    @property
    def tok_emb(self):
        return self.transformer.wte

    @property
    def final_norm(self):
        return self.transformer.ln_f

    def embed(self, idx, positions):
        x = self.transformer.wte(idx).to(self.hidden_dtype) + self.transformer.wpe(positions)
        return x, ()  # x (B, T, C)
