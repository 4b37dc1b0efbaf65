"""Prefix tuning: learned keys and values that every attention layer sees before the real tokens.

Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", Sec. 4. The base
model is frozen. Each block i gets P "virtual tokens" that exist only as attention keys and values
(K_i, V_i), each (n_head, P, head_size), prepended to the ones the real tokens produce:

    attn_i(x) = softmax(q [K_i ; k(x)]^T / sqrt(d) + causal mask) [V_i ; v(x)]

The prefix is visible from every position (no causal mask on it, no position embedding), and
causality among the real tokens is unchanged. Trainable: P * n_layer * 2 * n_embd numbers.

Reparameterization (Sec. 4.3). The paper found that optimizing the prefix table directly is
unstable, and instead computes it through an MLP during training,

    [K_i ; V_i for all i] (P, n_layer * 2 * C)  =  MLP(P')       P' (P, C),  MLP: C -> hidden -> .

After training only the table is kept (``bake()``), so inference costs nothing extra and the
stored adapter is just the table. Both modes are here: ``reparam_hidden=None`` trains the table
directly; ``init_text`` (direct mode only) starts it from the keys and values the frozen model
computes for a real string, which the paper (Sec. 7.2) found much better than random.

Facts the tests check:
  * P = 0 is exactly the base model (no prefix is passed at all).
  * An all-zero prefix is *not* the base: a zero key scores q.0 = 0, so each virtual token still
    takes softmax weight exp(0) / Z, and with a zero value the attention output is the base one
    shrunk by the factor  Z_real / (Z_real + P)  (Z_real = sum over real keys of exp(score)).
  * Cost at inference: every attention layer attends over P + T keys instead of T -- it cannot
    be merged into the weights.
"""
from typing import Optional

import torch
import torch.nn as nn

from ..data import encode
from ..model import GPT


class PrefixTuning(nn.Module):
    """A frozen GPT plus trainable per-layer key/value prefixes. forward(idx, targets,
    loss_mask) and generate(...) behave like the GPT's, so the training loop and the task
    scoring use it unchanged."""

    def __init__(self, model: GPT, n_prefix: int = 10, reparam_hidden: Optional[int] = None,
                 init_text: Optional[str] = None, init_std: float = 0.5):
        super().__init__()
        if n_prefix < 0:
            raise ValueError(f"n_prefix must be >= 0, got {n_prefix}")
        if init_text is not None and (reparam_hidden or len(init_text) != n_prefix):
            raise ValueError("init_text needs reparam_hidden=None and len(init_text) == n_prefix")
        self.model = model.requires_grad_(False)
        self.config = model.config  # GPT.generate reads config.block_size
        self.n_prefix = n_prefix
        cfg = model.config
        self.shape = (cfg.n_layer, 2, cfg.n_head, n_prefix, cfg.n_embd // cfg.n_head)
        device = next(model.parameters()).device
        if reparam_hidden:
            # Sec. 4.3: P' (P, C) -> Linear -> tanh -> Linear -> (P, n_layer * 2 * C)
            self.prefix_input = nn.Parameter(torch.randn(n_prefix, cfg.n_embd, device=device))
            self.reparam = nn.Sequential(
                nn.Linear(cfg.n_embd, reparam_hidden), nn.Tanh(),
                nn.Linear(reparam_hidden, cfg.n_layer * 2 * cfg.n_embd)).to(device)
        elif init_text is not None:
            self.prefix = nn.Parameter(text_keys_values(model, init_text))
        else:
            self.prefix = nn.Parameter(init_std * torch.randn(self.shape, device=device))

    def prefix_table(self):
        """All keys and values: (n_layer, 2, n_head, P, head_size)."""
        if not hasattr(self, "reparam"):
            return self.prefix
        L, _, H, P, hs = self.shape
        flat = self.reparam(self.prefix_input)                  # (P, L * 2 * C)
        return flat.view(P, L, 2, H, hs).permute(1, 2, 3, 0, 4)  # (L, 2, H, P, hs)

    def prefix_kv(self, batch_size: int):
        """[(k, v)] per block, each (B, n_head, P, head_size), for GPT.forward(prefix_kv=...)."""
        table = self.prefix_table()
        return [(layer[0].expand(batch_size, -1, -1, -1), layer[1].expand(batch_size, -1, -1, -1))
                for layer in table]

    def forward(self, idx, targets=None, loss_mask=None):
        if self.n_prefix == 0:  # nothing to prepend: exactly the base model's computation
            return self.model(idx, targets, loss_mask)
        return self.model(idx, targets, loss_mask, prefix_kv=self.prefix_kv(idx.shape[0]))

    # The GPT's own decoding loop: it only calls self(idx) and reads self.config.block_size.
    generate = GPT.generate

    @torch.no_grad()
    def bake(self):
        """Replace the reparameterization MLP by the table it computes (end of training, Sec.
        4.3): same outputs, and only P * n_layer * 2 * C numbers remain. Returns self."""
        if hasattr(self, "reparam"):
            table = self.prefix_table().detach().clone()
            del self.reparam, self.prefix_input
            self.prefix = nn.Parameter(table)
        return self

    def prefix_parameters(self):
        """The trainable parameters (everything but the frozen base)."""
        return [p for name, p in self.named_parameters() if not name.startswith("model.")]


@torch.no_grad()
def text_keys_values(model: GPT, text: str):
    """The keys and values that the frozen model computes for ``text`` in every block:
    (n_layer, 2, n_head, len(text), head_size). Used to start a prefix from real words."""
    device = next(model.parameters()).device
    idx = torch.tensor([encode(text)], device=device)          # (1, P)
    pos = torch.arange(idx.shape[1], device=device)
    x = model.tok_emb(idx) + model.pos_emb(pos)                 # (1, P, C)
    table = []
    for block in model.blocks:
        h = block.ln1(x)
        k = block.attn.split_heads(block.attn.k_proj(h))[0]    # (n_head, P, hs)
        v = block.attn.split_heads(block.attn.v_proj(h))[0]
        table.append(torch.stack([k, v]))                      # (2, n_head, P, hs)
        x = block(x)
    return torch.stack(table)                                   # (L, 2, n_head, P, hs)
