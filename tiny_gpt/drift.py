"""Drift: how far a fine-tuned model has moved away from its base on the base's own text.

Fine-tuning is meant to teach a task, not to rewrite the language model underneath. Two numbers
say how much of the rest moved, both taken on windows of the pretraining validation text:

    KL(base || tuned) = mean over positions t of  sum_v p_base(v | x_<t) [log p_base(v | x_<t)
                                                                        - log p_tuned(v | x_<t)]
    forgetting        = the tuned model's pretraining validation loss (vs the base's)

KL is zero exactly when the two next-token distributions agree at every position, and it weighs
the disagreement by what the base thought likely: it is the "KL-like drift metric" that the
usual checklists ask to monitor, in the direction that asks "does the tuned model still predict
what the base predicted?". Both are computed from log_softmax in at least float32: softmax
followed by log would underflow to log(0) = -inf for tokens a model finds very unlikely.

This module knows nothing of LoRA. The base and the tuned model are given as two callables
``idx (B, T) -> logits (B, T, V)``; `logits_of(model)` makes one from a GPT. For a LoRA model the
caller passes the same model twice, once with its adapters disabled (``lora.disable_adapters``).
"""
from typing import Callable

import torch
import torch.nn.functional as F

from .data import get_batch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def _log_probs(logits):
    """log_softmax over the vocabulary in float32 (float64 stays float64)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.log_softmax(logits.to(dtype), dim=-1)


def kl_divergence(base_logits, tuned_logits):
    """KL(p_base || p_tuned), summed over the vocabulary and averaged over every other axis.

    base_logits, tuned_logits: (..., V). Returns a 0-dim tensor (float32 or float64)."""
    log_p = _log_probs(base_logits)    # (..., V)
    log_q = _log_probs(tuned_logits)   # (..., V)
    per_position = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (...)
    return per_position.mean()


def next_token_loss(logits, targets):
    """Mean cross-entropy of (..., V) logits against (...) target ids, in float32 or wider."""
    log_q = _log_probs(logits).flatten(0, -2)  # (N, V)
    return F.nll_loss(log_q, targets.flatten())


def logits_of(model) -> LogitsFn:
    """A GPT as a logits callable: idx -> model(idx)[0]."""
    return lambda idx: model(idx)[0]


@torch.no_grad()
def measure_drift(base: LogitsFn, tuned: LogitsFn, val_ids, seq_len=128, n_batches=4,
                  batch_size=16, seed=1234, device="cpu") -> dict:
    """KL(base || tuned) and both models' next-token loss on the same fixed random windows of
    ``val_ids`` (the windows depend only on ``seed``, so repeated calls are comparable).

    Returns {"kl": float, "base_loss": float, "tuned_loss": float, "forgetting": tuned - base}.
    The callables are run as given: put the models in eval mode first (dropout off)."""
    gen = torch.Generator().manual_seed(seed)
    kl = base_loss = tuned_loss = 0.0
    for _ in range(n_batches):
        x, y = get_batch(val_ids, batch_size, seq_len, gen)  # (B, T) each
        x, y = x.to(device), y.to(device)
        base_logits, tuned_logits = base(x), tuned(x)        # (B, T, V) each
        kl += kl_divergence(base_logits, tuned_logits).item()
        base_loss += next_token_loss(base_logits, y).item()
        tuned_loss += next_token_loss(tuned_logits, y).item()
    out = {"kl": kl / n_batches, "base_loss": base_loss / n_batches,
           "tuned_loss": tuned_loss / n_batches}
    out["forgetting"] = out["tuned_loss"] - out["base_loss"]
    return out
