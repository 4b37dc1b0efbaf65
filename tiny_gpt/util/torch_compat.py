"""Three torch calls whose names changed between 2.1 and 2.4, in one place.

The package asks for torch>=2.1 so that a user's own install (CPU, CUDA or MPS build) is kept.
torch 2.4 added ``torch.is_autocast_enabled(device_type)`` and ``torch.get_autocast_dtype``;
2.3 added ``torch.amp.GradScaler(device)``. Before, the same things were spelled per device.
Only the torch 2.4+ spelling runs in this project's CI (torch 2.13); the older branches are
the documented torch 2.1 API.
"""
import torch

_NEW_AUTOCAST_API = hasattr(torch, "get_autocast_dtype")  # torch >= 2.4


def autocast_enabled(device_type: str) -> bool:
    """Is autocast on for this device type ("cpu", "cuda", ...) right now?"""
    if _NEW_AUTOCAST_API:
        return torch.is_autocast_enabled(device_type)
    if device_type == "cpu":
        return torch.is_autocast_cpu_enabled()
    return torch.is_autocast_enabled()  # torch < 2.4: this one means CUDA


def autocast_dtype(device_type: str) -> torch.dtype:
    """The dtype autocast computes in for this device type."""
    if _NEW_AUTOCAST_API:
        return torch.get_autocast_dtype(device_type)
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype()
    return torch.get_autocast_gpu_dtype()


def cuda_grad_scaler(**kwargs):
    """torch's dynamic loss scaler for CUDA fp16 (tiny_gpt/loss_scaling.py writes it out)."""
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler("cuda", **kwargs)
    return torch.cuda.amp.GradScaler(**kwargs)
