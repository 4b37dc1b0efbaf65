"""quant.analysis: the quantities lesson 05 prints, each checked on a case worked by hand."""
import math

import pytest
import torch

from quant import NF4_CODE, quantize_int4, quantize_nf4
from quant.analysis import (NF4_ZERO, block_kurtosis, block_normalised, blocksize_costs,
                            codes_changed, codes_of, count_orders, entropy_bits, format_errors,
                            linear_weights, normalised_mse, occupancy, occupancy_at_scale,
                            outlier_errors, row_split_errors, scale_errors, shrunk_rows_errors,
                            weighted_nmse)


def test_entropy_is_4_bits_for_uniform_use_and_0_for_one_code():
    assert entropy_bits(torch.full((16,), 1 / 16, dtype=torch.float64)) == pytest.approx(4.0)
    one = torch.zeros(16, dtype=torch.float64)
    one[3] = 1.0
    assert entropy_bits(one) == 0.0
    # two codes at 1/4 and 3/4: H = -(1/4 log2 1/4 + 3/4 log2 3/4) = 0.8113
    two = torch.zeros(16, dtype=torch.float64)
    two[0], two[1] = 0.25, 0.75
    assert entropy_bits(two) == pytest.approx(0.811278, abs=1e-6)


def test_codes_and_occupancy_follow_the_levels_element_by_element():
    # blocks of 64 whose absmax is 1: each value sits exactly on a level, so its code is known
    levels = NF4_CODE.repeat(8)                   # (128,) each level 8 times, both blocks hold +-1
    assert torch.equal(codes_of(levels, quantize_nf4), torch.arange(16).repeat(8))
    frac, h = occupancy(levels, quantize_nf4)
    assert torch.allclose(frac, torch.full((16,), 1 / 16, dtype=torch.float64))
    assert h == pytest.approx(4.0)
    # pooled over two weights: counts add, they are not averaged per weight
    zeros_and_one = torch.cat([torch.zeros(63), torch.ones(1)])  # 63 x code 7, 1 x code 15
    pooled, _ = occupancy([levels, zeros_and_one], quantize_nf4)
    assert pooled[NF4_ZERO].item() == pytest.approx((8 + 63) / 192)
    assert NF4_CODE[NF4_ZERO] == 0


def test_occupancy_at_scale_divides_by_sigma_and_clamps():
    x = torch.tensor([0.0, 2.0, -10.0, 0.5])  # / 2 -> 0, 1, -5 -> -1 (clamped), 0.25
    frac = occupancy_at_scale(x, 2.0, NF4_CODE)
    assert frac[7] == frac[15] == frac[0] == 0.25
    assert frac[int((NF4_CODE - 0.25).abs().argmin())] == 0.25


def test_nmse_is_zero_on_levels_and_one_for_all_zeros():
    exact = NF4_CODE.repeat(4)
    assert normalised_mse(exact, quantize_nf4) == pytest.approx(0.0, abs=1e-12)
    # one huge value per block: everything else rounds to 0, error ~ their whole energy
    w = torch.full((64,), 1e-4)
    w[0] = 1.0
    assert normalised_mse(w, quantize_nf4) == pytest.approx(63e-8 / (1 + 63e-8), rel=1e-3)
    # weighted: sizes count, 64 elements with NMSE a and 128 with NMSE b -> (a + 2b) / 3
    g = torch.randn(128, generator=torch.Generator().manual_seed(0))
    want = (normalised_mse(w, quantize_nf4) + 2 * normalised_mse(g, quantize_nf4)) / 3
    assert weighted_nmse([w, g], quantize_nf4) == pytest.approx(want)


def test_block_kurtosis_of_known_blocks():
    # +-1 in equal numbers: E[x^4] / E[x^2]^2 = 1; one spike in a block of zeros: by the formula
    flat = torch.tensor([1.0, -1.0]).repeat(32)
    assert block_kurtosis(flat) == pytest.approx(1.0)
    spike = torch.zeros(64)
    spike[0] = 1.0
    c = spike - 1 / 64
    assert block_kurtosis(spike) == pytest.approx((c ** 4).mean() / (c ** 2).mean() ** 2)
    normal = torch.randn(64 * 4000, generator=torch.Generator().manual_seed(0))
    assert 2.7 < block_kurtosis(normal) < 3.0  # ~2.9 for 64 normal values: 3 less a bias


def test_outlier_costs_its_own_block_only_with_blockwise_scales():
    w = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    w[1000] = 20.0
    mse, hit, others, zeroed = outlier_errors(w, 1000, quantize_nf4, 64)
    assert mse.shape == (64,) and hit == mse[1000 // 64].item()
    assert hit > 10 * others
    _, hit_global, others_global, zeroed_global = outlier_errors(w, 1000, quantize_nf4, 4096)
    assert others_global > 10 * others and zeroed_global > 5 * zeroed  # 61% vs 11% here


def test_scale_errors_are_zero_for_plain_scales_and_small_for_double_quant():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    assert scale_errors(quantize_nf4(w, double_quant=False), w).max() == 0
    dq = scale_errors(quantize_nf4(w, double_quant=True), w)
    assert 0 < dq.max() < 0.02  # 8-bit code of scales near 2.6: a step ~1% of the value


def test_shrunk_rows_lose_their_scales_only_under_double_quant():
    found = shrunk_rows_errors(quantize_nf4, rows=64, cols=128)
    dq, plain = found["double quant"], found["plain float32 scales"]
    assert dq["small"][1] > 100 * plain["small"][1]   # small rows' NMSE blows up
    assert dq["large"][1] < 1.5 * plain["large"][1]   # large rows do not care
    assert plain["small"][0] == plain["large"][0] == 0
    assert plain["bits"] > dq["bits"]


def test_row_split_picks_the_rows_it_is_given():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    w[1] = NF4_CODE.repeat(4)  # exact levels, absmax 1: no error in row 1
    found = row_split_errors(w, torch.tensor([False, True, False, False]), quantize_nf4, False)
    assert found["small"][1] == pytest.approx(0.0, abs=1e-12) and found["large"][1] > 1e-3
    with pytest.raises(ValueError, match="whole blocks of 64"):
        row_split_errors(torch.zeros(2, 96), torch.tensor([True, False]), quantize_nf4, False)


def test_format_table_counts_and_blocksize_costs():
    table = {"a": {"NF4": 1, "FP4": 2, "int4": 3}, "b": {"NF4": 1, "FP4": 3, "int4": 2},
             "c": {"NF4": 2, "FP4": 1, "int4": 3}}
    assert count_orders(table, ("NF4", "FP4", "int4")) == (2, 1)
    g = torch.randn(256, generator=torch.Generator().manual_seed(0))
    errors = format_errors({"g": g}, {"NF4": quantize_nf4, "int4": quantize_int4})
    assert errors["g"]["int4"] == normalised_mse(g, quantize_int4)
    plain_bits, dq_bits, nmse, pooled = blocksize_costs(g, [g], quantize_nf4, 64)
    assert plain_bits == 4.5 and math.isclose(nmse, pooled)
    assert dq_bits == quantize_nf4(g, 64, True).bits_per_param


def test_block_normalised_puts_every_block_absmax_at_one():
    w = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * torch.tensor([[1.], [5.],
                                                                                        [0.1]])
    scaled = block_normalised(w).view(3, 64)
    assert torch.allclose(scaled.abs().amax(1), torch.ones(3))
    assert torch.allclose(scaled * w.abs().amax(1, keepdim=True), w)


def test_linear_weights_are_the_projections(small_model):
    found = linear_weights(small_model)
    assert len(found) == 6 * len(small_model.blocks)  # q, k, v, o, up, down
    assert "blocks.0.attn.q_proj" in found and "blocks.1.mlp.down_proj" in found
    assert all(not n.endswith("weight") and "emb" not in n for n in found)
    assert torch.equal(found["blocks.0.attn.q_proj"], small_model.blocks[0].attn.q_proj.weight)


def test_codes_changed_is_the_share_of_differing_nibbles():
    w = NF4_CODE.repeat(8)                          # (128,) every code 8 times
    a = quantize_nf4(w, double_quant=False)
    w2 = w.clone()
    w2[1], w2[2] = NF4_CODE[0], NF4_CODE[0]         # two codes differ, in two different bytes
    b = quantize_nf4(w2, double_quant=False)
    assert codes_changed([(a, b)]) == pytest.approx(2 / 128)
    assert codes_changed([(a, a), (a, b)]) == pytest.approx(2 / 256)  # pooled, not averaged
