"""Measuring many adapters served at once (lesson 11): is a mixed batch the same as each row
alone -- in its logits, and in its gradients -- what the adapters weigh, and how many tokens
per second each way of serving (serving.py) gives.

Rates are timed with the ways taking turns (tiny_gpt.util.timing.round_robin_medians), so a
slow spell of a shared machine lands on all of them.
"""
import torch
import torch.nn.functional as F

from tiny_gpt.util.timing import round_robin_medians

from ..inject import disable_adapters
from .mixed import mixed_adapters
from .multi import set_active_adapters
from .serving import serve_answers, serve_logits


@torch.no_grad()
def mixed_row_gap(model, idx, rows) -> float:
    """How far one mixed batch is from each row run alone:

        max |mixed logits - logits of row b alone with adapter rows[b]|  /  max |mixed logits|

    idx (N, T); rows[b] an adapter name, or None for the base model."""
    mixed = serve_logits(model, idx, rows, "mixed")                        # (N, T, V)
    alone = [serve_logits(model, idx[b:b + 1], [name], "sub_batches")      # N x (1, T, V)
             for b, name in enumerate(rows)]
    return ((mixed - torch.cat(alone)).abs().max() / mixed.abs().max()).item()


def summed_answer_loss(logits, y, mask):
    """sum over rows and positions of mask * cross-entropy: a sum, not a mean, so the losses
    of separate runs over parts of the batch add up to the loss of the whole batch.
    logits (N, T, V), y and mask (N, T)."""
    ce = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")     # (N, T)
    return (ce * mask).sum()


def mixed_gradient_gap(model, x, y, mask, rows) -> float:
    """How far the gradients of one mixed batch are from those of separate runs:

        g_mixed = d/dtheta L(all rows, row b with adapter rows[b])
        g_apart = sum over adapters a of d/dtheta L(the rows asking for a, a active)
        gap     = max |g_mixed - g_apart|  /  max |g_apart|

    over every trainable parameter (an adapter no row uses counts as a zero gradient).
    The loss is summed (summed_answer_loss), so the two are equal but for float rounding."""
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(loss):
        found = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, found)]
    with mixed_adapters(model, rows):
        together = grads(summed_answer_loss(model(x)[0], y, mask))
    apart = [torch.zeros_like(p) for p in params]
    for name in dict.fromkeys(rows):
        picked = [b for b, r in enumerate(rows) if r == name]
        set_active_adapters(model, name)
        for total, g in zip(apart, grads(summed_answer_loss(model(x[picked])[0], y[picked],
                                                            mask[picked]))):
            total += g
    largest = max(g.abs().max().item() for g in apart)
    return max((a - b).abs().max().item() for a, b in zip(together, apart)) / largest


def adapter_bytes(model, name) -> int:
    """Bytes of adapter `name`'s parameters in the model; name None: of everything else (the
    base). An adapter's parameters are those named ``*.adapters.<name>.*``."""
    def wanted(param_name):
        if name is None:
            return ".adapters." not in param_name
        return f".adapters.{name}." in param_name
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if wanted(n))


@torch.no_grad()
def _base_logits(model, idx):
    with disable_adapters(model):
        return model(idx)[0]


def forward_rates(model, idx, rows_by_k: dict, ways, repeats: int) -> dict:
    """{(k, way): tokens per second of one forward pass of idx (n, T)}, n * T / the median
    seconds, with rows_by_k[k] the rows' adapter names; way "base" (the base model alone) is
    timed in the same rounds as the others."""
    n, T = idx.shape
    rates = {}
    for k, rows in rows_by_k.items():
        fns = {way: (lambda w=way: serve_logits(model, idx, rows, w)) for way in ways}
        fns["base"] = lambda: _base_logits(model, idx)
        seconds = round_robin_medians(fns, repeats, warmup=1)
        rates.update({(k, way): n * T / s for way, s in seconds.items()})
    return rates


def generation_rates(model, prompts, rows_by_k: dict, ways, max_new: int, repeats: int,
                     device="cpu"):
    """{(k, way): generated tokens per second} of greedy answers of `max_new` tokens to every
    prompt (len(prompts) * max_new / the median seconds), and whether every way gave the same
    answers for every k."""
    rates, agree = {}, True
    for k, rows in rows_by_k.items():
        answers = {}

        def run(way):
            answers[way] = serve_answers(model, prompts, rows, way, max_new, device)
        seconds = round_robin_medians({w: (lambda w=w: run(w)) for w in ways}, repeats,
                                      warmup=0)
        agree &= len({tuple(a) for a in answers.values()}) == 1
        rates.update({(k, w): len(prompts) * max_new / seconds[w] for w in ways})
    return rates, agree
