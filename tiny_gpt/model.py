"""A tiny GPT: the base model that every lesson adapts.

It is a standard decoder-only transformer (GPT-2 shape, pre-LayerNorm), kept small enough to
pretrain on a laptop CPU in a couple of minutes. The attention projections are four separate
``nn.Linear`` layers -- ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` -- rather than one fused
``c_attn``, because LoRA is placed on individual projections (Q and V in the LoRA paper, Sec. 4.2)
and a fused matrix would hide which one is being adapted.

    x -> x + Attn(LN(x)) -> x + MLP(LN(x))        (one block, repeated n_layer times)
    logits = LN(x) @ E^T                          (LM head tied to the token embedding E)
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .memory.checkpointing import IMPLS as CHECKPOINT_IMPLS, run_checkpointed
from .util.checks import is_number, is_whole_number
from .util.torch_compat import is_compiling


@dataclass
class GPTConfig:
    vocab_size: int = 96      # tokens: printable ASCII + newline (see tiny_gpt.data)
    block_size: int = 256     # longest context the position table covers
    n_layer: int = 4          # transformer blocks
    n_head: int = 4           # attention heads per block
    n_embd: int = 128         # width of the residual stream; must divide by n_head
    mlp_ratio: int = 4        # hidden width of the MLP = mlp_ratio * n_embd
    dropout: float = 0.0      # dropout p on the embeddings (tok + pos), the attention weights
                              # and each block's attention and MLP outputs before the residual add
    gradient_checkpointing: bool = False  # recompute each block in backward instead of storing
    checkpoint_impl: str = "torch"  # "torch" (non-reentrant), "torch_reentrant", "manual" (ours)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            value = getattr(self, name)
            if not is_whole_number(value, 1):
                raise ValueError(f"GPTConfig.{name} must be a whole number >= 1, got {value!r}")
        if not (is_number(self.dropout) and 0 <= self.dropout < 1):
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.checkpoint_impl not in CHECKPOINT_IMPLS:
            raise ValueError(f"checkpoint_impl={self.checkpoint_impl!r}; use one of "
                             f"{CHECKPOINT_IMPLS}")


def check_token_ids(idx, vocab_size):
    """Token ids must be integers in 0 .. vocab_size - 1 (else the embedding's own IndexError).

    The range is read on CPU only: reading it from a GPU tensor would make the host wait for
    the device on every forward, and there the embedding's own device-side check reports a bad
    id anyway; nor under torch.compile, where reading a value breaks the graph."""
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"token ids must be an integer tensor, got {idx.dtype}")
    if idx.device.type != "cpu" or is_compiling():
        return
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in 0..{vocab_size - 1}; got values from "
                         f"{int(idx.min())} to {int(idx.max())}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def split_heads(self, x):
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x, prefix_kv=None, cache=None):
        """x: (B, T, C). ``prefix_kv``: optional (k, v), each (B, nh, P, hs), prepended to the
        keys and values (prefix tuning); the prefix is visible from every position.
        ``cache``: a KVCache (decoding), which keeps this layer's keys and values between
        calls and says which of them each new position may see."""
        B, T, C = x.shape
        q = self.split_heads(self.q_proj(x))  # (B, nh, T, hs)
        k = self.split_heads(self.k_proj(x))
        v = self.split_heads(self.v_proj(x))
        drop = self.dropout if self.training else 0.0
        if cache is not None:
            k, v, mask = cache.attend(self, k, v)  # (B, nh, S, hs) x 2, (B, 1, T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif prefix_kv is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:
            pk, pv = prefix_kv
            P = pk.shape[2]
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, nh, P+T, hs)
            mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd)
        self.down_proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, prefix_kv=None, cache=None):
        x = x + self.drop(self.attn(self.ln1(x), prefix_kv, cache=cache))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.apply(self._init_weights)
        # GPT-2 scales the residual-branch outputs by 1/sqrt(2 * n_layer) so the stream's
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, 0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, loss_mask=None, prefix_kv=None, cache=None,
                positions=None):
        """idx: (B, T) token ids. targets: (B, T) next-token ids or None. loss_mask: (B, T), 1
        where a target counts (e.g. answer tokens only); the loss is the mean over counted
        tokens. prefix_kv: optional list with one (k, v) pair per block (prefix tuning).
        cache, positions: decoding with a KVCache (tiny_gpt/kv_cache.py): idx holds only the
        new tokens, at `positions` (B, T) (default 0 .. T-1).
        Returns (logits (B, T, V), loss or None)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if cache is not None and prefix_kv is not None:
            raise ValueError("a KV cache and prefix_kv cannot be combined")
        if positions is not None and positions.shape != idx.shape:
            raise ValueError(f"positions must have idx's shape {tuple(idx.shape)}, got "
                             f"{tuple(positions.shape)}")
        check_token_ids(idx, self.config.vocab_size)
        pos = torch.arange(T, device=idx.device) if positions is None else positions
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            kv = None if prefix_kv is None else prefix_kv[i]
            if cache is not None:  # decoding: nothing to recompute, whatever the config says
                x = block(x, cache=cache)
            elif self.config.gradient_checkpointing and torch.is_grad_enabled():
                x = run_checkpointed(block, x, kv, impl=self.config.checkpoint_impl)
            else:
                x = block(x, kv)
        logits = F.linear(self.ln_f(x), self.tok_emb.weight)  # (B, T, V), tied head
        loss = None if targets is None else masked_cross_entropy(logits, targets, loss_mask)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, generator=None):
        """Extend idx (B, T) by max_new_tokens. temperature 0 is greedy decoding; otherwise
        sample from softmax(logits / temperature), optionally restricted to the top_k tokens."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :]  # (B, V)
            if temperature == 0.0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits.float(), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def masked_cross_entropy(logits, targets, loss_mask=None, reduction="mean"):
    """Cross-entropy over the tokens where loss_mask is 1.

    reduction="mean" divides by the number of counted tokens; "sum" returns the plain sum, which
    gradient accumulation needs (it divides once by the total over all micro-batches)."""
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    if loss_mask is None:
        loss_mask = torch.ones_like(targets)
    mask = loss_mask.flatten().to(per_token.dtype)
    total = (per_token * mask).sum()
    if reduction == "sum":
        return total
    return total / mask.sum().clamp(min=1)
