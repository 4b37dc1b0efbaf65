"""The measures of lesson 11 (lora/many/measure.py): a mixed batch against each row alone, in
logits and in gradients; the bytes of one adapter; the rates of the ways of serving."""
import pytest
import torch

import lora.many.measure as measure
from lora import add_adapter, apply_lora
from lora.many.measure import (adapter_bytes, forward_rates, generation_rates,
                               mixed_gradient_gap, mixed_row_gap, summed_answer_loss)

TOL = 1e-5  # float32 sums in another order, relative to the largest value


def two_adapters(small_model):
    """The shared small GPT with adapters "t0" and "t1" whose B is not zero (they change the
    output)."""
    torch.manual_seed(0)
    model = apply_lora(small_model, r=2, alpha=4)
    for name in ("t0", "t1"):
        add_adapter(model, name, r=2, alpha=4)
    for name, p in model.named_parameters():
        p.requires_grad_(".adapters." in name)
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    return model


def batch(rows=4, T=10):
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 90, (rows, T), generator=gen) for _ in range(2))
    mask = (torch.arange(T)[None, :] < torch.tensor([[T], [3], [7], [1]])[:rows]).float()
    return x, y, mask


def test_a_mixed_batch_is_each_row_alone_and_a_wrong_row_order_is_seen(monkeypatch, small_model):
    model, (x, _, _) = two_adapters(small_model).eval(), batch()
    rows = ["t0", None, "t1", "t0"]
    assert mixed_row_gap(model, x, rows) <= TOL
    served = measure.serve_logits

    def rows_swapped(model, idx, names, way):  # a mixed way that mixes up rows 0 and 1
        logits = served(model, idx, names, way)
        return logits[[1, 0, 2, 3]] if way == "mixed" else logits
    monkeypatch.setattr(measure, "serve_logits", rows_swapped)
    assert mixed_row_gap(model, x, rows) > 1e-2


def test_summed_answer_losses_of_parts_add_up_to_the_whole():
    logits, (_, y, mask) = torch.randn(4, 10, 96), batch()
    parts = (summed_answer_loss(logits[:1], y[:1], mask[:1])
             + summed_answer_loss(logits[1:], y[1:], mask[1:]))
    assert parts.item() == pytest.approx(summed_answer_loss(logits, y, mask).item(), rel=1e-6)


def test_mixed_gradients_equal_the_separate_runs_summed(small_model):
    model = two_adapters(small_model)
    assert mixed_gradient_gap(model, *batch(), ["t0", "t1", "t1", "t0"]) <= TOL


def test_adapter_bytes_count_one_adapter_and_the_base_apart(small_model):
    model = two_adapters(small_model)
    add_adapter(model, "t00", r=3, alpha=4)  # a name that starts like another one
    per_layer = 2 * (32 + 32) * 4  # r = 2, A (2, 32) and B (32, 2), float32
    assert adapter_bytes(model, "t0") == 2 * 2 * per_layer  # Q and V of 2 blocks
    everything = sum(p.numel() * p.element_size() for p in model.parameters())
    adapters = sum(adapter_bytes(model, n) for n in ("default", "t0", "t1", "t00"))
    assert adapter_bytes(model, None) == everything - adapters


def test_rates_have_every_k_and_way_and_the_ways_agree_on_answers(small_model):
    model = two_adapters(small_model).eval()
    x, _, _ = batch()
    rows_by_k = {1: ["t0"] * 4, 2: ["t0", "t1"] * 2}
    ways = ("merged", "sub_batches", "mixed")
    rates = forward_rates(model, x, rows_by_k, ways, repeats=1)
    assert set(rates) == {(k, w) for k in rows_by_k for w in ways + ("base",)}
    assert all(r > 0 for r in rates.values())
    gen, agree = generation_rates(model, ["ab", "cd", "ef", "gh"], rows_by_k, ways, max_new=3,
                                  repeats=1)
    assert agree and set(gen) == {(k, w) for k in rows_by_k for w in ways}
