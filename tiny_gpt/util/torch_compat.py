"""The torch calls that differ between torch 2.1 and today's torch, in one place.

The package asks for torch>=2.1 so that a user's own install (CPU, CUDA or MPS build) is kept.
torch 2.4 added ``torch.is_autocast_enabled(device_type)`` and ``torch.get_autocast_dtype``;
2.3 added ``torch.amp.GradScaler(device)``. Before, the same things were spelled per device.
Autocast itself knew only "cpu" and "cuda" (and a few others) until MPS joined in torch 2.5:
before, ``torch.autocast("mps", enabled=False)`` raises, although turning off what does not
exist should do nothing. torch.compile traces the backward of our autograd.Functions into its
graph from torch 2.4 on (dynamo_traces_function_backward). Only the newest spellings run in this
project's CI (torch 2.13); the older branches are the documented torch 2.1 API, and the test
suite was also run on torch 2.1.2. Everything else that the project calls exists
unchanged since torch 2.1.
"""
import contextlib

import torch

_NEW_AUTOCAST_API = hasattr(torch, "get_autocast_dtype")  # torch >= 2.4


def autocast_available(device_type: str) -> bool:
    """Does this torch have autocast for the device type ("cpu", "cuda", "mps", ...)?
    Every torch since 2.1 has it for "cpu" and "cuda", so those are answered without asking
    torch: torch.compile before 2.5 breaks the graph at torch's own answer."""
    if device_type in ("cpu", "cuda"):
        return True
    if hasattr(torch.amp, "is_autocast_available"):  # torch >= 2.4
        return torch.amp.is_autocast_available(device_type)
    return device_type in ("xpu", "hpu")


def autocast(device_type: str, dtype=None, enabled: bool = True):
    """torch.autocast, except that turning autocast *off* for a device type that this torch
    has no autocast for is a no-op (nothing is on to turn off), not an error."""
    if not enabled and not autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def autocast_enabled(device_type: str) -> bool:
    """Is autocast on for this device type ("cpu", "cuda", ...) right now?"""
    if not autocast_available(device_type):
        return False
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


def dynamo_traces_function_backward() -> bool:
    """Can torch.compile trace the backward of our hand-written autograd.Functions (LoRA, DoRA,
    the 4-bit matmul) into its graph? They read ctx.needs_input_grad, which dynamo learned to
    trace in torch 2.4 (pytorch PR 123700). Before, every such Function breaks the graph: 17
    breaks in a 2-block GPT with LoRA on Q and V under torch 2.1.2. The model still compiles
    and runs, in pieces, so only the "no graph break" claims depend on this."""
    return torch.__version__ >= (2, 4)


def cuda_grad_scaler(**kwargs):
    """torch's dynamic loss scaler for CUDA fp16 (tiny_gpt/loss_scaling.py writes it out)."""
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler("cuda", **kwargs)
    return torch.cuda.amp.GradScaler(**kwargs)


def fully_shard_function(device_type: str = "cpu"):
    """FSDP2's fully_shard for modules on `device_type`, or None where this torch has none that
    runs there. Public as torch.distributed.fsdp.fully_shard since torch 2.6, CPU included (run
    here on torch 2.13). In 2.4 and 2.5 it was torch.distributed._composable.fsdp.fully_shard,
    for CUDA only: on CPU, torch 2.4.1's made a CUDA stream at the first forward and failed
    (seen when the suite ran on it). torch 2.1 has only FSDP1, FullyShardedDataParallel."""
    try:
        from torch.distributed.fsdp import fully_shard
        return fully_shard
    except ImportError:
        pass
    if device_type != "cuda":
        return None
    try:
        from torch.distributed._composable.fsdp import fully_shard
        return fully_shard
    except ImportError:
        return None


def is_compiling() -> bool:
    """Is torch.compile tracing this code right now? (torch.compiler.is_compiling arrived in
    torch 2.3; torch 2.1 and 2.2 spell it torch._dynamo.is_compiling.)"""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()


def no_buffer_sync() -> dict:
    """DistributedDataParallel's option for "do not re-send the buffers before every forward":
    ``forward_sync_buffers=False`` in the newest torch (2.13), which warns at the old name
    ``broadcast_buffers=False``. They differ at wrapping: the new option still broadcasts the
    buffers once from rank 0, the old one leaves them out of that broadcast too, so under an
    older torch each rank keeps the buffers it built. (For a 4-bit base every rank quantizes
    the same weights to the same codes, so nothing differs; lesson 13's count of the bytes
    broadcast at wrapping then shows the parameters only.)"""
    import inspect
    from torch.nn.parallel import DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}
