"""lora.analysis: subspace similarity phi, the amplification factor, parameter budgets, the
first step's size."""
import copy

import pytest
import torch

from lora import apply_lora, count_parameters, lora_layers
from lora.analysis import (adapter_factors, amplification_factor, amplification_norms,
                           first_step_norm, lora_param_count, phi_corners, phi_grid,
                           projected_norm, random_orthonormal, random_phi,
                           random_projected_norm, rank_for_budget, subspace_similarity)
from tiny_gpt.model import GPT, GPTConfig, masked_cross_entropy

F64_TOL = 1e-10  # float64 SVDs of matrices of size <= 64: rounding of order 1e-14
F32_TOL = 1e-5   # a float32 weight read back through float64 arithmetic


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=32))


# --- phi -----------------------------------------------------------------------------------
def test_phi_of_a_matrix_with_itself_is_one():
    a = randn(8, 40)
    for i in range(1, 9):
        assert subspace_similarity(a, a, i, i) == pytest.approx(1.0, abs=F64_TOL)


def test_phi_does_not_depend_on_the_basis_of_the_row_space():
    """A and any invertible mix of its rows (G A) span the same input subspace: phi = 1 at full
    rank. (This is why phi compares subspaces, not the factors themselves.)"""
    a = randn(6, 30)
    mixed = randn(6, 6, seed=1) @ a
    assert subspace_similarity(a, mixed, 6, 6) == pytest.approx(1.0, abs=F64_TOL)


def test_phi_of_orthogonal_subspaces_is_zero():
    a1 = torch.zeros(4, 20, dtype=torch.float64)
    a2 = torch.zeros(8, 20, dtype=torch.float64)
    a1[:, :4] = randn(4, 4)       # rows inside span(e0..e3)
    a2[:, 4:12] = randn(8, 8)     # rows inside span(e4..e11)
    assert phi_grid(a1, a2).abs().max().item() < F64_TOL


def test_phi_is_in_unit_interval_and_symmetric():
    a1, a2 = randn(8, 50, seed=2), randn(16, 50, seed=3)
    grid = phi_grid(a1, a2)
    assert grid.shape == (8, 16)
    assert grid.min().item() >= 0.0 and grid.max().item() <= 1.0 + F64_TOL
    # the paper's definition is symmetric: phi(A1, A2, i, j) = phi(A2, A1, j, i)
    assert torch.allclose(phi_grid(a2, a1).T, grid, atol=F64_TOL, rtol=0)


def test_phi_grid_matches_the_definition_entry_by_entry():
    a1, a2 = randn(5, 12, seed=4), randn(7, 12, seed=5)
    _, _, vh1 = torch.linalg.svd(a1)
    _, _, vh2 = torch.linalg.svd(a2)
    for i in range(1, 6):
        for j in range(1, 8):
            direct = torch.linalg.matrix_norm(vh1[:i] @ vh2[:j].T).item() ** 2 / min(i, j)
            assert subspace_similarity(a1, a2, i, j) == pytest.approx(direct, abs=F64_TOL)


def test_phi_of_updates_uses_their_top_r_input_directions():
    """dW (out, n) of rank r: phi_grid(dW1, dW2, r1, r2) compares the top r1 / r2 right-singular
    vectors. dW = B A with B of full column rank has A's row space, so phi at full rank is 1."""
    a, b = randn(4, 16, seed=11), randn(10, 4, seed=12)
    grid = phi_grid(b @ a, a, 4, 4)
    assert grid.shape == (4, 4)
    assert grid[-1, -1].item() == pytest.approx(1.0, abs=F64_TOL)
    assert torch.allclose(grid, phi_grid(b @ a, a)[:4, :4], atol=F64_TOL, rtol=0)


def test_random_subspaces_average_max_i_j_over_n():
    n, i, j, trials = 64, 4, 16, 60
    gen = torch.Generator().manual_seed(6)
    phis = [subspace_similarity(torch.randn(i, n, generator=gen),
                                torch.randn(j, n, generator=gen), i, j) for _ in range(trials)]
    mean = sum(phis) / trials
    # phi here has a standard deviation of about 0.037, so the mean of 60 trials one of 0.005:
    # the tolerance is 4 of those
    assert mean == pytest.approx(random_phi(n, i, j), abs=0.02)


def test_phi_rejects_bad_indices_and_shapes():
    with pytest.raises(ValueError, match="1 <= i"):
        subspace_similarity(randn(4, 10), randn(4, 10), 5, 1)
    with pytest.raises(ValueError, match="different input sizes"):
        phi_grid(randn(4, 10), randn(4, 11))


# --- amplification factor ------------------------------------------------------------------
def test_amplification_factor_by_hand():
    """dW = 3 e0 e1^T + 2 e2 e3^T (rank 2): its top-2 subspaces are span(e0, e2) on the output
    side and span(e1, e3) on the input side, so U^T W V holds W[0,1], W[0,3], W[2,1], W[2,3],
    and the factor is sqrt(3^2 + 2^2) / sqrt(0.5^2 + 1^2 + 2^2 + 0^2) = sqrt(13 / 5.25)."""
    w = torch.arange(25, dtype=torch.float64).reshape(5, 5) / 10  # most entries are irrelevant
    w[0, 1], w[0, 3], w[2, 1], w[2, 3] = 0.5, 1.0, 2.0, 0.0
    dw = torch.zeros(5, 5, dtype=torch.float64)
    dw[0, 1], dw[2, 3] = 3.0, 2.0
    assert amplification_factor(dw, w, 2) == pytest.approx((13 / 5.25) ** 0.5, rel=F64_TOL)


def test_amplification_factor_is_rotation_invariant():
    """Rotating input and output spaces (W -> Q1 W Q2^T, dW likewise) changes no norm."""
    w, dw = randn(12, 9, seed=7), randn(12, 3, seed=8) @ randn(3, 9, seed=9)
    q1, q2 = random_orthonormal(12, 12), random_orthonormal(9, 9)
    assert amplification_factor(q1 @ dw @ q2.T, q1 @ w @ q2.T, 3) == pytest.approx(
        amplification_factor(dw, w, 3), rel=F64_TOL)


def test_an_update_along_w_top_directions_amplifies_little():
    """dW = c u1 v1^T along W's own top singular pair: ||U^T W V|| = sigma_1, factor c/sigma_1."""
    w = randn(10, 8, seed=10)
    u, s, vh = torch.linalg.svd(w)
    dw = 0.5 * torch.outer(u[:, 0], vh[0])
    assert projected_norm(w, u[:, :1], vh[:1].T) == pytest.approx(s[0].item(), rel=F64_TOL)
    assert amplification_factor(dw, w, 1) == pytest.approx(0.5 / s[0].item(), rel=F64_TOL)


def test_random_orthonormal_columns_and_baseline():
    q = random_orthonormal(20, 5, torch.Generator().manual_seed(0))
    assert torch.allclose(q.T @ q, torch.eye(5, dtype=torch.float64), atol=F64_TOL)
    # an identity W: ||U^T V||_F^2 averages r*r/n for random U, V; the mean norm is below sqrt
    w = torch.eye(20, dtype=torch.float64)
    assert 0 < random_projected_norm(w, 5, draws=10) <= (25 / 20) ** 0.5 + 0.1


# --- parameter budgets ---------------------------------------------------------------------
@pytest.mark.parametrize("targets, r", [(("q_proj",), 3), (("q_proj", "v_proj"), 8),
                                        (("q_proj", "k_proj", "v_proj", "o_proj"), 2),
                                        (("q_proj", "up_proj", "down_proj"), 5)])
def test_param_count_equals_trainable_after_apply_lora(targets, r):
    model = tiny_gpt()
    predicted = lora_param_count(model, targets, r)
    apply_lora(model, targets=targets, r=r, alpha=2 * r)
    assert count_parameters(model)[0] == predicted
    assert predicted == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_rank_for_budget_picks_the_closest_rank():
    model = tiny_gpt()  # width 32: q costs 64 r per block, up/down 160 r (32 -> 128 -> 32)
    all6 = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    assert lora_param_count(model, all6, 1) == 2 * (4 * 64 + 2 * 160)
    budget = lora_param_count(model, ("q_proj",), 16)             # 2048
    assert rank_for_budget(model, ("q_proj",), budget) == 16
    assert rank_for_budget(model, ("q_proj", "v_proj"), budget) == 8
    r = rank_for_budget(model, all6, budget)                      # 1152 r: 1 -> 1152, 2 -> 2304
    assert r == 2
    for other in (r - 1, r + 1):
        assert abs(lora_param_count(model, all6, other) - budget) >= abs(
            lora_param_count(model, all6, r) - budget)


def test_adapter_factors_read_a_trained_layer():
    model = apply_lora(tiny_gpt(), targets=("q_proj",), r=4, alpha=8)
    layer = model.blocks[0].attn.q_proj
    with torch.no_grad():
        layer.lora_B.normal_()
    a, dw, w0 = adapter_factors(model)["blocks.0.attn.q_proj"]
    assert a.shape == (4, 32) and dw.shape == w0.shape == (32, 32)
    assert torch.allclose(dw, 2.0 * layer.lora_B @ layer.lora_A, atol=F32_TOL)
    layer.merge()
    with pytest.raises(ValueError, match="unmerged"):
        adapter_factors(model)


# --- what lesson 04 reads from these ----------------------------------------------------------
def test_phi_corners_are_the_corners_of_the_two_grids():
    small, large, seed = randn(4, 40, seed=1), randn(12, 40, seed=2), randn(4, 40, seed=3)
    (g, g_seed), corners = phi_corners(small, large, seed, 4, 12)
    assert g.shape == (4, 12) and g_seed.shape == (4, 4)
    assert corners == pytest.approx([subspace_similarity(small, large, 1, 1),
                                     subspace_similarity(small, large, 4, 12),
                                     subspace_similarity(small, seed, 1, 1),
                                     subspace_similarity(small, seed, 4, 4)], abs=F64_TOL)
    # 4 directions inside a 12-dimensional subspace of R^40 that holds them: phi(4, 12) = 1
    assert phi_corners(small, torch.cat([small, large[:8]]), seed, 4, 12)[1][1] == \
        pytest.approx(1.0, abs=F64_TOL)


def test_amplification_norms_hold_the_factor_and_w_own_directions_give_the_most():
    w, dw, r = randn(24, 40, seed=4), randn(24, 3, seed=5) @ randn(3, 40, seed=6), 3
    got = amplification_norms(dw, w, r)
    assert got["amp"] == pytest.approx(amplification_factor(dw, w, r), rel=F64_TOL)
    top = torch.linalg.svdvals(w)[:r]  # max over orthonormal U, V of ||U^T W V||_F
    assert got["along_w"] == pytest.approx(top.square().sum().sqrt().item(), rel=F64_TOL)
    assert got["along_dw"] < got["along_w"] and got["along_rand"] < got["along_w"]
    assert got["vs_rand"] == pytest.approx(got["dw"] / got["along_rand"], rel=F64_TOL)
    assert got["dw"] == pytest.approx(dw.norm().item(), rel=F64_TOL)


def test_first_step_norm_is_s_times_the_signed_sum_of_a_rows():
    """From B = 0 one AdamW step moves B by -lr g / (|g| + eps) (~ -lr sign(G_B): Adam's first
    step, bias-corrected, with eps = 1e-8), and A not at all (dL/dA = 0; weight decay shrinks it
    by lr * 0.01 = 1e-5), so dW_1 / lr = -s (G_B / (|G_B| + eps)) A to 1e-5."""
    model = apply_lora(tiny_gpt(), r=4, alpha=8)
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 90, (4, 16), generator=gen) for _ in range(2))
    batch = (x, y, torch.ones(4, 16))
    reference = copy.deepcopy(model)
    masked_cross_entropy(reference(x)[0], y, batch[2]).backward()
    adam_step = [layer.lora_B.grad / (layer.lora_B.grad.abs() + 1e-8)  # (out, r)
                 for _, layer in lora_layers(reference)]
    expected = [(layer.scaling * step @ layer.lora_A).norm().item()
                for step, (_, layer) in zip(adam_step, lora_layers(reference))]
    lr = 1e-3
    got = first_step_norm(model, batch, lr)
    assert got == pytest.approx(sum(expected) / len(expected), rel=1e-4)
