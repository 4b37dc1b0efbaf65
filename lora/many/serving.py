"""Three ways to answer one batch whose rows ask for different adapters of one frozen base.

    merged       for each group of rows asking for one adapter: merge it into W0, run the
                 group, unmerge. Each group runs at the base model's speed, but the batch is cut
                 into k small batches, and every merge and unmerge rewrites W0 (in place, with
                 rounding: W0 + sBA - sBA is W0 only up to float rounding, and the error grows
                 with the number of swaps; `merge_drift` measures it).
    sub_batches  for each group: make its adapter the active one and run the group on the
                 unmerged model. No rewriting of W0, but still k small batches.
    mixed        one batch, each row gathering its own adapter in every LoRA layer
                 (lora/mixed.py); way="grouped" loops over the adapters inside each layer
                 instead, as PEFT's mixed batches do.

Each function takes the rows' adapter names (None: the base model) and gives its results in
row order, so all of them can be compared with each other row by row. The active adapters are
the same afterwards as before.
"""
from contextlib import contextmanager

import torch

from tiny_gpt.evaluate import greedy_answers

from ..inject import disable_adapters, merge_lora, unmerge_lora
from .mixed import check_row_names, mixed_adapters
from .multi import as_many, set_active_adapters

WAYS = ("merged", "sub_batches", "mixed", "grouped")


def row_groups(names):
    """{adapter name or None: [row indices]}, in the order the names first appear."""
    groups = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    return groups


@contextmanager
def _active_kept(model):
    """Put every layer's active adapters back as they were on leaving the block."""
    layers = [layer for _, layer in as_many(model)]
    before = [list(layer.active) for layer in layers]
    try:
        yield
    finally:
        for layer, active in zip(layers, before):
            layer.active = active


def per_group(model, names, run, merge=False):
    """run(rows) -> one result per row, for each group of rows with one adapter, that adapter
    active (merged into W0 when `merge`) or all adapters off for None. Returns a list in row
    order."""
    check_row_names(model, names)
    results = [None] * len(names)
    with _active_kept(model):
        for name, rows in row_groups(names).items():
            if name is None:
                with disable_adapters(model):
                    got = run(rows)
            else:
                set_active_adapters(model, name)
                if merge:
                    merge_lora(model)
                try:
                    got = run(rows)
                finally:
                    if merge:
                        unmerge_lora(model)
            for row, result in zip(rows, got):
                results[row] = result
    return results


@torch.no_grad()
def serve_logits(model, idx, names, way):
    """Logits (N, T, V) of idx (N, T), row b with adapter names[b], computed the `way` given."""
    if way not in WAYS:
        raise ValueError(f"way must be one of {WAYS}, got {way!r}")
    if way in ("mixed", "grouped"):
        with mixed_adapters(model, names, "gathered" if way == "mixed" else way):
            return model(idx)[0]
    rows_logits = per_group(model, names, lambda rows: model(idx[rows])[0], way == "merged")
    return torch.stack(rows_logits)


@torch.no_grad()
def serve_answers(model, prompts, names, way, max_new_tokens, device="cpu"):
    """Greedy answers (tiny_gpt.evaluate.greedy_answers) of the prompts, row b with adapter
    names[b], computed the `way` given; a list in row order."""
    if way not in WAYS:
        raise ValueError(f"way must be one of {WAYS}, got {way!r}")
    if len(prompts) != len(names):
        raise ValueError(f"{len(prompts)} prompts but {len(names)} names: give one per prompt")
    if way in ("mixed", "grouped"):
        with mixed_adapters(model, names, "gathered" if way == "mixed" else way):
            return greedy_answers(model, prompts, max_new_tokens, device)
    return per_group(model, names, lambda rows: greedy_answers(
        model, [prompts[r] for r in rows], max_new_tokens, device), way == "merged")


@torch.no_grad()
def merge_drift(model, name, swaps):
    """Largest |W0 after `swaps` merge + unmerge cycles of adapter `name` - W0 before|, over
    the model's LoRA layers: the rounding that way "merged" leaves in the base weights. The
    weights are put back exactly afterwards."""
    layers = [layer for _, layer in as_many(model) if name in layer.adapters]
    originals = [layer.base.weight.clone() for layer in layers]
    with _active_kept(model):
        set_active_adapters(model, name)
        for _ in range(swaps):
            merge_lora(model)
            unmerge_lora(model)
    drift = max((layer.base.weight - w).abs().max().item() for layer, w in zip(layers, originals))
    for layer, w in zip(layers, originals):
        layer.base.weight.copy_(w)
    return drift
