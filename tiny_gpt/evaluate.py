"""Scoring a model, in one place: exact match of greedy answers on a task, the answer-token
loss, the language-modelling loss on held-out text, and drift away from the base.

    exact_match     fraction of held-out prompts whose greedy completion is the answer exactly
    task_loss       mean cross-entropy over the answer tokens of a task's examples
    validation_loss mean next-token loss on fixed random windows of a text
    measure_drift   KL(base || tuned) and both models' loss on the base's pretraining text

Drift. Fine-tuning is meant to teach a task, not to rewrite the language model underneath. Two
numbers say how much of the rest moved, both taken on windows of the pretraining validation text:

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
from typing import Callable, List

import torch
import torch.nn.functional as F

from .data import decode, encode, get_batch
from .kv_cache import KVCache
from .model import GPT, masked_cross_entropy
from .tasks import Example, make_batch
from .util.checks import is_whole_number


# --- tasks: exact match of greedy answers, answer loss ------------------------------------
@torch.no_grad()
def greedy_answers(model, prompts: List[str], max_new_tokens: int, device="cpu") -> List[str]:
    """Greedy completions, cut at the first newline, all prompts in one batch.

    Prompts of different lengths share one right-padded buffer (B, T): row i holds its prompt
    in positions 0 .. L_i - 1, padding after. Attention is causal, so the logits at position
    L_i - 1 see nothing to their right: the padding changes no row's prediction, and no
    position moves (left padding would shift the learned position embeddings). A GPT then
    decodes with a KV cache (tiny_gpt/kv_cache.py): the prompts run once, and each step runs
    only the new tokens, row i's at its own position L_i + t. Any other model (a wrapper, such
    as prefix tuning's) runs the whole buffer again at each step, writing row i's token at L_i.
    Decoding stops early once every row has produced its newline.
    """
    if not is_whole_number(max_new_tokens, 1):
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    lengths = torch.tensor([len(p) for p in prompts], device=device)            # (B,)
    width = int(lengths.max()) + max_new_tokens
    if width > model.config.block_size:
        raise ValueError(f"a prompt of {int(lengths.max())} characters plus {max_new_tokens} new "
                         f"tokens exceeds the model's block size {model.config.block_size}")
    buffer = torch.zeros((len(prompts), width), dtype=torch.long, device=device)  # (B, T)
    for row, prompt in enumerate(prompts):
        buffer[row, :len(prompt)] = torch.tensor(encode(prompt))
    steps = cached_steps if isinstance(model, GPT) else recomputed_steps
    new = steps(model, buffer[:, :int(lengths.max())], lengths, max_new_tokens)  # (B, n)
    return [decode(row.tolist()).split("\n")[0] for row in new]


NEWLINE = encode("\n")[0]


def cached_steps(model, prompts, lengths, max_new_tokens):
    """(B, W) right-padded prompts -> (B, max_new_tokens) greedy tokens, with a KV cache."""
    cache = KVCache(lengths, prompts.shape[1])
    rows = torch.arange(len(lengths), device=prompts.device)
    logits, _ = model(prompts, cache=cache)                                      # (B, W, V)
    token = logits[rows, lengths - 1].argmax(dim=-1)                             # (B,)
    new = [token]
    for t in range(1, max_new_tokens):
        if (torch.stack(new, 1) == NEWLINE).any(1).all():
            break
        logits, _ = model(token[:, None], cache=cache, positions=(lengths + t - 1)[:, None])
        token = logits[:, -1].argmax(dim=-1)
        new.append(token)
    return torch.stack(new, 1)


def recomputed_steps(model, prompts, lengths, max_new_tokens):
    """The same without a cache: the whole buffer again at every step."""
    buffer = torch.cat([prompts, prompts.new_zeros(len(lengths), max_new_tokens)], dim=1)
    rows, start = torch.arange(len(lengths), device=prompts.device), lengths.clone()
    for _ in range(max_new_tokens):
        logits, _ = model(buffer[:, :int(lengths.max())])                         # (B, T, V)
        buffer[rows, lengths] = logits[rows, lengths - 1].argmax(dim=-1)
        lengths = lengths + 1
    return torch.stack([buffer[row, s:s + max_new_tokens] for row, s in enumerate(start)])


def exact_match(model, examples: List[Example], device="cpu") -> float:
    """Fraction of examples whose greedy completion equals the answer exactly."""
    was_training = model.training
    model.eval()
    max_new = max(len(a) for _, a in examples) + 1
    got = greedy_answers(model, [p for p, _ in examples], max_new, device)
    model.train(was_training)
    hits = sum(g == a.rstrip("\n") for g, (_, a) in zip(got, examples))
    return hits / len(examples)


@torch.no_grad()
def task_loss(model, examples, batch_size=256) -> float:
    """Mean cross-entropy over the answer tokens of all examples."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        x, y, mask = make_batch(examples[i:i + batch_size])
        logits, _ = model(x.to(device))
        total += masked_cross_entropy(logits, y.to(device), mask.to(device), "sum").item()
        count += int(mask.sum())
    return total / count


# --- text: next-token loss on held-out windows ----------------------------------------------
@torch.no_grad()
def validation_loss(model, val_ids, seq_len, n_batches=8, batch_size=32, seed=1234) -> float:
    """Mean next-token loss on fixed random windows of the validation text."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    losses = []
    for _ in range(n_batches):
        x, y = get_batch(val_ids, batch_size, seq_len, gen)
        losses.append(model(x.to(device), y.to(device))[1].item())
    return sum(losses) / len(losses)


# --- drift from the base ---------------------------------------------------------------------
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
