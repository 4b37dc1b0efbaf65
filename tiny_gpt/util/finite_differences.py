"""The plainest gradient check there is: nudge one number, see how the loss moves.

    dL/dt_i ~ (L(t + eps e_i) - L(t - eps e_i)) / (2 eps)

The central difference has truncation error O(eps^2) and rounding error ~ machine eps / eps;
in float64 (machine eps 2e-16) eps = 1e-6 makes both ~1e-12 to 1e-10, so a hand-derived
backward that agrees to ~1e-8 is right. In float32 nothing this tight is possible: use float64.
It costs two loss evaluations per entry, so it is for small tensors in tests and lessons only.
"""
import torch


@torch.no_grad()
def central_differences(loss, tensor: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """dL/d(tensor) by central differences. loss() -> scalar tensor reads `tensor` (changed in
    place, one entry at a time, and restored exactly). Returns a tensor shaped like `tensor`."""
    flat = tensor.detach().view(-1)  # shares storage with tensor: writes reach loss()
    grad = torch.zeros_like(flat)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + eps
        up = loss().item()
        flat[i] = old - eps
        down = loss().item()
        flat[i] = old
        grad[i] = (up - down) / (2 * eps)
    return grad.view_as(tensor)
