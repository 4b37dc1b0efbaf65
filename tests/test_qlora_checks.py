"""lora.qlora_checks: the measurements lesson 06 prints, on a small GPT and hand-made layers."""
import copy

import pytest
import torch
import torch.nn as nn

from lora import dequantized_float_model, lora_layers, prepare_qlora, save_adapter
from lora.qlora_checks import (base_bytes, dequant_matmul_parity,
                               forward_backward_medians, logits, merge_findings, nf4_lm_losses,
                               rel_distance,
                               linear_bytes, reload_gap, shipped_models, shipping_errors,
                               weight_of)
from quant import Linear4bit, quantize_model
from quant.analysis import codes_changed


def tokens(batch=3, length=12, seed=1):
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def trained_qlora(model, seed=2, scale=0.05):
    """A QLoRA model whose adapters have a non-zero B, as after some training."""
    qlora = prepare_qlora(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(qlora):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * scale)
    return qlora


def test_dequant_matmul_matches_the_dense_path_in_float64():
    linear = nn.Linear(32, 4)
    ok, diffs, dense_dw = dequant_matmul_parity(linear, seed=0, shape=(1, 2))
    assert ok and len(diffs) == 3 and max(diffs) <= 1e-12  # the same float64 products
    assert dense_dw == 32 * 4


def test_rel_distance_is_the_frobenius_ratio_over_all_layers():
    ref = [torch.ones(2, 2), torch.zeros(1, 3)]
    moved = [torch.ones(2, 2), torch.tensor([[3.0, 4.0, 0.0]])]
    # |diff|^2 = 25 over |ref|^2 = 4 -> sqrt(25 / 4) = 2.5 (the zero layer counts in the sum)
    assert rel_distance(moved, ref) == pytest.approx(2.5)
    assert rel_distance(ref, ref) == 0.0


def test_weight_of_reads_every_kind_of_layer():
    linear = nn.Linear(64, 8)
    assert torch.equal(weight_of(linear), linear.weight.detach())
    q = Linear4bit.from_linear(linear)
    assert torch.equal(weight_of(q), q.dequantized_weight(torch.float32))
    assert (weight_of(q) - linear.weight).abs().max() > 0  # it is the 4-bit weight, not W0


def test_base_bytes_counts_4_bit_linear_weights(small_model):
    nf4 = quantize_model(copy.deepcopy(small_model))
    lin, whole, tables, counts = base_bytes(small_model, nf4)
    n_lin = sum(m.weight.numel() for m in small_model.modules() if isinstance(m, nn.Linear))
    assert counts["linear"] == n_lin  # and six layers a block: q, k, v, o, up, down
    assert counts["layers"] == 6 * len(small_model.blocks)
    assert counts["all"] == sum(p.numel() for p in small_model.parameters())
    assert lin["fp32"] == 4 * n_lin and lin["bf16"] == 2 * n_lin
    assert 4.0 < 8 * lin["NF4"] / n_lin < 5.5  # codes + scales (+ a code book per layer)
    assert whole["NF4"] < whole["bf16"] < whole["fp32"] and tables > 0


def test_codes_changed_counts_only_what_requantizing_moves(small_model):
    qlora = prepare_qlora(copy.deepcopy(small_model))  # B = 0: W_deq + sBA = W_deq
    def pairs(requant):
        return [(requant.get_submodule(p), layer.base) for p, layer in lora_layers(qlora)]

    same = quantize_model(dequantized_float_model(qlora))  # re-quantized to the same codes
    assert codes_changed(pairs(same)) == 0.0
    moved = quantize_model(dequantized_float_model(trained_qlora(small_model, scale=1.0)))
    assert 0 < codes_changed(pairs(moved)) < 1


def test_shipping_errors_and_reload_on_a_trained_qlora_model(small_model, tmp_path):
    base = copy.deepcopy(small_model)
    qlora = trained_qlora(small_model)
    directory = save_adapter(qlora, tmp_path / "adapter")
    assert reload_gap(qlora, base, directory, tokens()) == (True, 0.0)
    shipped = shipped_models(base, qlora, directory)
    test = [('upper "ab" -> "', 'AB"\n'), ('upper "c" -> "', 'C"\n')]  # short: block size 32
    found = shipping_errors(qlora, shipped, tokens(), test, "cpu")
    assert list(found) == ["trained", "float", "requant", "fp32", "disabled"]
    assert found["trained"]["diff"] == 0.0 and found["trained"]["dist"] == 0.0
    assert found["float"]["dist"] < 1e-6 and found["float"]["diff"] < 1e-4  # exact merge
    # re-quantizing and merging into W0 both move the weights by an NF4-sized error
    assert found["requant"]["dist"] > 100 * found["float"]["dist"]
    assert found["fp32"]["dist"] > 100 * found["float"]["dist"]
    # disabled: W_deq, at sBA's distance from W_deq + sBA, and other logits
    assert found["disabled"]["dist"] > found["float"]["dist"] and found["disabled"]["diff"] > 0
    assert all(0 <= r["acc"] <= 1 for r in found.values())
    assert torch.equal(logits(qlora, tokens()), logits(qlora, tokens()))  # adapters back on


def test_nf4_lm_losses_and_step_times(small_model):
    ids = torch.randint(0, 96, (2000,), generator=torch.Generator().manual_seed(0))
    losses, nf4 = nf4_lm_losses(small_model, ids, 16, 2, 4)
    assert list(losses) == ["fp32", "NF4", "NF4 + double quant"]
    assert losses["NF4"] != losses["fp32"]
    assert sum(isinstance(m, Linear4bit) for m in nf4.modules()) > 0
    x = tokens()
    batch = (x, x, None)
    step = forward_backward_medians({"a": small_model}, batch, repeats=1)
    assert step["a"] > 0 and all(p.grad is None for p in small_model.parameters())


def test_linear_bytes_stored_and_held():
    model = nn.Sequential(nn.Linear(64, 8), nn.LayerNorm(8))
    stored, held = linear_bytes(model)
    assert stored == held == 4 * (64 * 8 + 8)  # float32 weight and bias; the norm not counted
    q = nn.Sequential(Linear4bit.from_linear(model[0]))
    stored4, held4 = linear_bytes(q)
    assert stored4 == sum(t.numel() * t.element_size() for t in q[0].state_dict().values())
    assert held4 > stored4  # look-up tables held beside what is stored


def test_merge_findings_reads_the_float_merge_codes_and_error_ratio(small_model):
    """rel is the float merge's max |logit diff| over the QLoRA model's largest |logit|; with
    B = 0 re-quantizing W_deq gives back the same codes; err_ratio is requant over fp32."""
    qlora = prepare_qlora(copy.deepcopy(small_model))  # B = 0
    shipped = {"requant": quantize_model(dequantized_float_model(qlora))}
    found = {"float": {"diff": 2.0}, "requant": {"dist": 0.3}, "fp32": {"dist": 0.1}}
    rel, changed, err_ratio = merge_findings(qlora, shipped, found, tokens())
    assert rel == pytest.approx(2.0 / logits(qlora, tokens()).abs().max().item(), rel=1e-12)
    assert changed == 0.0 and err_ratio == pytest.approx(3.0)
