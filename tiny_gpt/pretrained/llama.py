"""The Llama family by hand: Llama 2 / 3.x, TinyLlama, SmolLM / SmolLM2, Qwen2 / Qwen2.5.

One block, pre-norm, repeated num_hidden_layers times (Touvron et al. 2023, Sec. 2.2):

    h = x + o_proj(Attn(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n))),   n = RMSNorm(x)
    y = h + down_proj(silu(gate_proj(m)) * up_proj(m)),                   m = RMSNorm(h)

RMSNorm (Zhang & Sennrich 2019): y = w * x / sqrt(mean_i(x_i^2) + eps), the mean taken in
float32 whatever x's dtype, the result cast back to x's dtype before the multiplication by w.

Rotary embeddings (Su et al. 2021, RoFormer), in the "rotate-half" layout the Hugging Face files
use: the head's channels i and i + d/2 form a pair rotated by the angle p * f_i at position p,

    f_i = theta^(-2i / d),   i = 0 .. d/2 - 1
    RoPE(x) = x * cos(p f) + rotate_half(x) * sin(p f),   rotate_half([x1, x2]) = [-x2, x1]

(the original paper pairs neighbouring channels 2i, 2i+1 instead; the checkpoints' q_proj and
k_proj rows are permuted to suit this layout). Llama 3.1+ rescales f for long context
("llama3" rope_scaling): long wavelengths 2 pi / f above L / low_freq_factor are divided by
`factor`, short ones below L / high_freq_factor kept, those between blended linearly in
L / wavelength (L: original_max_position_embeddings).

Grouped-query attention (Ainslie et al. 2023): num_key_value_heads < num_attention_heads; each
key/value head serves a group of heads / kv_heads consecutive query heads, so the keys and
values are expanded with repeat_interleave before the usual causal attention.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .causal_lm import CausalLM
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x):
        x32 = x.float()
        # y = w * x / sqrt(mean(x^2) + eps), the mean in float32
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_frequencies(cfg: ModelConfig, device=None):
    """(head_dim / 2,) float32: f_i = theta^(-2i / d), llama3-scaled when the config says."""
    d = cfg.head_dim
    # f_i = theta^(-2i / d)
    freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d)
    return freq if cfg.rope_scaling is None else llama3_scaled(freq, cfg.rope_scaling)


def llama3_scaled(freq, scaling):
    """Llama 3.1's frequency scaling (module docstring): divide the low frequencies by
    `factor`, keep the high ones, blend those in between."""
    factor, low, high = (scaling["factor"], scaling["low_freq_factor"],
                         scaling["high_freq_factor"])
    old_len = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / freq
    scaled = torch.where(wavelength > old_len / low, freq / factor, freq)
    # blend = (L / wavelength - low) / (high - low), 0 at the long end, 1 at the short end
    blend = (old_len / wavelength - low) / (high - low)
    blended = (1 - blend) * scaled / factor + blend * scaled
    between = (wavelength >= old_len / high) & (wavelength <= old_len / low)
    return torch.where(between, blended, scaled)


def rotary_angles(freq, positions, dtype):
    """positions (B, T) -> cos, sin, each (B, T, head_dim) in `dtype`: the angle p * f_i,
    repeated for both halves of the head (rotate-half layout); computed in float32."""
    angles = positions.float()[..., None] * freq  # (B, T, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, d)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] along the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x, cos, sin):
    """x (B, nh, T, d); cos, sin (B, T, d). RoPE(x) = x * cos + rotate_half(x) * sin."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, d): the same angles for every head
    return x * cos + rotate_half(x) * sin


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = (cfg.num_attention_heads,
                                                 cfg.num_key_value_heads, cfg.head_dim)
        C, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C,
                                bias=bias and not cfg.qkv_bias_only)

    def split_heads(self, x, heads):
        B, T, _ = x.shape
        return x.view(B, T, heads, self.head_dim).transpose(1, 2)  # (B, heads, T, d)

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        q = apply_rotary(self.split_heads(self.q_proj(x), self.n_head), cos, sin)
        k = apply_rotary(self.split_heads(self.k_proj(x), self.n_kv), cos, sin)
        v = self.split_heads(self.v_proj(x), self.n_kv)  # (B, n_kv, T, d)
        mask = None
        if cache is not None:  # the cache keeps the n_kv heads, before expansion
            k, v, mask = cache.attend(self, k, v)  # (B, n_kv, S, d) x 2, (B, 1, T, S)
        groups = self.n_head // self.n_kv
        k = k.repeat_interleave(groups, dim=1)  # (B, nh, S, d): kv head j serves query heads
        v = v.repeat_interleave(groups, dim=1)  # j * groups .. (j + 1) * groups - 1
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh * d)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, H, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(C, H, bias=bias)
        self.up_proj = nn.Linear(C, H, bias=bias)
        self.down_proj = nn.Linear(H, C, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache=cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The stack without its head; named `model` inside the causal LM, as in the files."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class LlamaForCausalLM(CausalLM):
    """Module paths as in Hugging Face's files (model.layers.N.self_attn.q_proj, ...), so a
    checkpoint's tensors and PEFT's adapter keys need no renaming."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def blocks(self):
        return self.model.layers

    @property
    def tok_emb(self):
        return self.model.embed_tokens

    @property
    def final_norm(self):
        return self.model.norm

    def embed(self, idx, positions):
        x = self.model.embed_tokens(idx).to(self.hidden_dtype)  # (B, T, C)
        # the frequencies are a few numbers: recomputed here rather than kept as a buffer,
        # so a model built on the meta device (the loader) needs nothing filled in for them
        cos, sin = rotary_angles(rope_frequencies(self.config, idx.device), positions,
                                 x.dtype)
        return x, (cos, sin)
