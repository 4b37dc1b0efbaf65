"""The finite-difference helper itself, on functions whose gradient is known in closed form."""
import torch

from tiny_gpt.util.finite_differences import central_differences


def test_matches_the_closed_form_gradient_and_restores_the_tensor():
    t = torch.tensor([[0.5, -1.0, 2.0], [3.0, 0.1, -0.7]], dtype=torch.float64)
    before = t.clone()
    numeric = central_differences(lambda: (t.sin() * t ** 2).sum(), t)
    exact = t.cos() * t ** 2 + 2 * t * t.sin()  # d/dt [t^2 sin t]
    assert (numeric - exact).abs().max() < 1e-8
    assert torch.equal(t, before)


def test_works_on_a_tensor_that_requires_grad():
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 4, dtype=torch.float64)
    (x @ w).square().sum().backward()
    numeric = central_differences(lambda: (x @ w).square().sum(), w)
    assert (numeric - w.grad).abs().max() < 1e-6
