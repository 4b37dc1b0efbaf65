"""What every pretrained family shares: the forward pass around the blocks, and greedy decoding.

A family (llama.py, gpt2.py) says how tokens become the first hidden state -- and what else
each block needs, such as the rotary angles -- and which modules hold the blocks, the final
norm and the embedding. This class runs the rest the way the tiny GPT does
(tiny_gpt/model.py), with the same conventions, so that the training loop, LoRA, gradient
checkpointing and the KV cache treat a real checkpoint as they treat the tiny GPT:

    model(idx, targets=None, loss_mask=None, cache=None, positions=None) -> (logits, loss)
        logits (B, T, V); loss = mean cross-entropy of logits[b, t] against targets[b, t]
        over the positions where loss_mask is 1 (targets are already the next tokens)
    logits = final_norm(h_L) @ E^T      when the head is tied to the token embedding E,
             final_norm(h_L) @ W_head^T otherwise
"""
import torch
import torch.nn as nn

from ..kv_cache import KVCache
from ..memory.checkpointing import run_checkpointed
from ..model import check_token_ids, masked_cross_entropy
from ..util.checks import is_whole_number
from .upcast_head import tied_logits


class CausalLM(nn.Module):
    """Base class. A subclass sets self.config (a ModelConfig) and defines embed(idx, pos),
    and the properties blocks (nn.ModuleList), tok_emb (nn.Embedding) and final_norm."""

    def embed(self, idx, positions):
        """(B, T) ids and positions -> (x (B, T, C), extra): extra is a tuple of tensors that
        every block takes after x."""
        raise NotImplementedError

    @property
    def hidden_dtype(self):
        """The dtype the hidden states run in: the norms'. An embedding stored in fewer bits
        (a QLoRA base keeps it in bfloat16, upcast_head.py) is upcast as it is read."""
        return self.final_norm.weight.dtype

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, loss_mask=None, cache=None, positions=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings "
                             f"{self.config.block_size}")
        if positions is not None and positions.shape != idx.shape:
            raise ValueError(f"positions must have idx's shape {tuple(idx.shape)}, got "
                             f"{tuple(positions.shape)}")
        check_token_ids(idx, self.config.vocab_size)
        if positions is None:
            positions = torch.arange(T, device=idx.device).expand(B, T)  # (B, T)
        x, extra = self.embed(idx, positions)  # (B, T, C)
        for block in self.blocks:
            if cache is not None:  # decoding: nothing to recompute, whatever the config says
                x = block(x, *extra, cache=cache)
            elif self.config.gradient_checkpointing and torch.is_grad_enabled():
                x = run_checkpointed(block, x, *extra, impl=self.config.checkpoint_impl)
            else:
                x = block(x, *extra)
        h = self.final_norm(x)
        logits = self.lm_head(h) if not self.config.tie_word_embeddings \
            else tied_logits(h, self.tok_emb.weight)  # (B, T, V)
        loss = None if targets is None else masked_cross_entropy(logits, targets, loss_mask)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, eos_id=None, use_cache=True):
        """Greedy decoding: idx (B, T) -> (B, T + n) with n <= max_new_tokens new tokens.

        With use_cache (the default) the prompt runs once and every step runs only the new
        token (tiny_gpt/kv_cache.py); without, the whole sequence runs again at every step --
        the same tokens, more work. eos_id: an id or a list of ids; a row that has produced
        one is filled with it (the first id) from then on, and decoding stops when every row
        has. Refused before any work if T + max_new_tokens exceeds the context length."""
        if not is_whole_number(max_new_tokens, 1):
            raise ValueError(f"max_new_tokens must be a whole number >= 1, got "
                             f"{max_new_tokens!r}")
        B, T = idx.shape
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"{T} prompt tokens plus {max_new_tokens} new ones exceed "
                             f"max_position_embeddings {self.config.block_size}")
        stops = torch.tensor([] if eos_id is None else
                             [eos_id] if isinstance(eos_id, int) else list(eos_id),
                             dtype=torch.long, device=idx.device)
        cache = KVCache(torch.full((B,), T, device=idx.device), T) if use_cache else None
        logits, _ = self(idx, cache=cache)
        new, done = [], torch.zeros(B, dtype=torch.bool, device=idx.device)
        for t in range(max_new_tokens):
            token = logits[:, -1].argmax(dim=-1)  # (B,)
            if len(stops):
                token = torch.where(done, stops[0], token)
                done |= torch.isin(token, stops)
            new.append(token)
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            if use_cache:
                logits, _ = self(token[:, None], cache=cache,
                                 positions=torch.full((B, 1), T + t, device=idx.device))
            else:
                logits, _ = self(torch.cat([idx, torch.stack(new, 1)], dim=1))
        return torch.cat([idx, torch.stack(new, 1)], dim=1)


def init_weights(module):
    """Hugging Face's initialization for these families: N(0, 0.02) for linear and embedding
    weights, zero biases; norms reset themselves (weight 1, bias 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif hasattr(module, "reset_parameters"):
        module.reset_parameters()
