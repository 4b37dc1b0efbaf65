"""A linear layer whose weight lives in 4 bits: the frozen base layer of QLoRA (Sec. 3).

QLoRA's forward pass is  Y = X dequant(W_nf4)^T (+ b)  computed in a 16/32-bit compute dtype,
and only the LoRA adapters (elsewhere) get gradients. The base weight is never stored in
float: it is dequantized on the fly in forward, and again in backward, and thrown away.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tiny_gpt.util.modules import dense, replace_module, select_paths

from .kernels import decode_table
from .double_quant import DYNAMIC_MAP, DoubleQuantScales
from .nf4 import normal_float_levels, quantize_nf4
from .qtensor import Quantized4bit, quantize_4bit

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class DequantMatmul(torch.autograd.Function):
    """y = x W^T + b, with W given as a Quantized4bit and dequantized to x's dtype.

    Shapes: x (..., in), W (out, in), b (out,) or None, y (..., out).

    Backward. Per output, y_k = sum_j x_j W_kj + b_k, so with g = dL/dy:
        dL/dx_j = sum_k g_k W_kj      ->  grad_x = g @ W    (..., out) @ (out, in) = (..., in)
        dL/db_k = g_k summed over every leading (batch, token) position   ->  (out,)
        dL/dW   = none: the weight is frozen 4-bit codes, not a differentiable tensor.
    Only the Quantized4bit is kept for backward (about 0.5 byte per weight); W is rebuilt by a
    second dequantize instead of being saved, trading one cheap pass for a full-size tensor.
    """

    @staticmethod
    def forward(ctx, x, qweight: Quantized4bit, bias: Optional[torch.Tensor]):
        ctx.qweight = qweight
        return F.linear(x, dense(qweight, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dense(ctx.qweight, grad_out.dtype)  # (..., in), decoded again
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # (out,)
        return grad_x, None, grad_bias


def check_compute_dtype(dtype):
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {dtype}")


class Linear4bit(nn.Module):
    """nn.Linear replacement that stores its weight as NF4 (packed codes + small scales).

    Buffers hold the Quantized4bit's tensors (uint8 codes, the 16-level code book, the
    scales); `bias` is an ordinary float parameter or None. `.weight` returns the Quantized4bit,
    never a float tensor; `dequantized_weight()` gives the float weight for checks.
    Inputs are cast to `compute_dtype` and outputs back to the input's dtype.
    """

    def __init__(self, qweight: Quantized4bit, bias=None, compute_dtype=torch.float32):
        super().__init__()
        check_compute_dtype(compute_dtype)
        if len(qweight.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D (out, in) weight, got {tuple(qweight.shape)}")
        self.out_features, self.in_features = qweight.shape
        self.compute_dtype = compute_dtype
        state = qweight.to_state_dict()
        for key in ("shape", "blocksize", "dtype"):  # kept as Python values, not tensors:
            state.pop(key)                           # reading them back would sync the host
        self._shape, self._blocksize, self._dtype = qweight.shape, qweight.blocksize, qweight.dtype
        state["code"] = state["code"].clone()  # our own: a load_state_dict must touch no other
        for name, tensor in state.items():
            self.register_buffer(name, tensor)
        # Tables derived from the code books, built once here and moved with the module by
        # .to(device); not saved, since they follow from what is.
        self.register_buffer("pair_levels", decode_table(self.code), persistent=False)
        if qweight.double_quant:
            self.register_buffer("scale_levels", DYNAMIC_MAP.to(self.code.device, copy=True),
                                 persistent=False)  # beside the codes it decodes
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=bias.requires_grad)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize=64, double_quant=True,
                    compute_dtype=torch.float32, bits=4):
        """Quantize `linear.weight` to NF4 (bits=4), or to the NormalFloat code book of 2 or 3
        bits, held in the same 4-bit nibbles; the bias (if any) is copied in its own dtype."""
        if bits == 4:
            qweight = quantize_nf4(linear.weight, blocksize, double_quant)
        else:
            qweight = quantize_4bit(linear.weight, normal_float_levels(check_bits(bits)),
                                    blocksize, double_quant, who="Linear4bit.from_linear")
        return cls(qweight, linear.bias, compute_dtype)

    @property
    def weight(self) -> Quantized4bit:
        """The 4-bit weight, rebuilt around this module's buffers (no copy, no host sync)."""
        scales8 = None
        if hasattr(self, "scale_codes"):
            n_blocks = -(-self._shape.numel() // self._blocksize)  # ceil division
            scales8 = DoubleQuantScales(self.scale_codes, self.scale_absmax, self.scale_offset,
                                        n_blocks, self.scale_levels)
        return Quantized4bit(self.packed_codes(), self.code, self._shape, self._dtype,
                             self._blocksize, getattr(self, "absmax", None), scales8,
                             self.pair_levels)

    def packed_codes(self) -> torch.Tensor:
        """The packed codes as uint8 bytes (quant/sharding.py may hold them in a float view)."""
        return self.codes if self.codes.dtype == torch.uint8 else self.codes.view(torch.uint8)

    def dequantized_weight(self, dtype=None):
        """(out, in) float weight in `dtype` (default: compute dtype), as forward uses it."""
        return self.weight.dequantize(dtype or self.compute_dtype)

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear4bit expects inputs of width in_features = "
                             f"{self.in_features}, got shape {tuple(x.shape)}")
        if self.compute_dtype == torch.float16 and x.device.type != "cuda":
            raise RuntimeError("Linear4bit: float16 compute is only supported on CUDA; "
                               "use torch.bfloat16 or torch.float32 on CPU")
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = DequantMatmul.apply(x.to(self.compute_dtype), self.weight, bias)
        return y.to(x.dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        """Load the saved buffers, then rebuild the pair table from the code book just loaded:
        a table derived from the old one would dequantize with the wrong levels."""
        super()._load_from_state_dict(*args, **kwargs)
        with torch.no_grad():
            self.pair_levels.copy_(decode_table(self.code))

    def _apply(self, fn, recurse=True):
        """Let .to(device) move the 4-bit storage, but never let .to(dtype) / .half() round
        the float32 scales or the code book: the weight's precision is fixed at quantization.
        (The codes may be a frozen Parameter in a float view: quant/sharding.py.)"""
        stored = {name: t.detach() for name, t in self.named_buffers(recurse=False)}
        stored["codes"] = self.codes.detach()
        super()._apply(fn, recurse)
        for name, old in stored.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                moved = old.to(new.device)
                setattr(self, name, nn.Parameter(moved, requires_grad=False)
                        if isinstance(new, nn.Parameter) else moved)
        return self

    def extra_repr(self):
        q = self.weight
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={q.blocksize}, "
                f"double_quant={q.double_quant}, compute_dtype={self.compute_dtype}, "
                f"bits_per_param={q.bits_per_param:.3f}")


def check_bits(bits):
    if not (isinstance(bits, int) and not isinstance(bits, bool) and 2 <= bits <= 4):
        raise ValueError(f"bits must be 2, 3 or 4 (NormalFloat code books held in 4-bit "
                         f"nibbles), got {bits!r}")
    return bits


def quantize_model(model, targets=None, blocksize=64, double_quant=True,
                   compute_dtype=torch.float32, exclude=(), bits=4):
    """Swap nn.Linear modules of `model` for Linear4bit, in place; returns `model`.

    targets: names matched by full path or by suffix, e.g. ("q_proj", "v_proj"); None = every
        nn.Linear. blocksize, double_quant: as in quantize_nf4. compute_dtype: see Linear4bit.
    exclude: names (same matching) to leave in float. bits: 4 (NF4), or 3 or 2 (the
        NormalFloat code book with 2^bits levels, stored in 4-bit nibbles: the error of k bits,
        the storage of 4).
    A target or exclude name that matches no nn.Linear raises a ValueError listing the
    available nn.Linear paths. Modules that are not nn.Linear (e.g. a tied LM head that reuses
    the embedding matrix) are never touched.
    """
    check_compute_dtype(compute_dtype)
    check_bits(bits)
    names = [name for name, m in model.named_modules() if name and isinstance(m, nn.Linear)]
    chosen = names if targets is None else select_paths(names, targets, "nn.Linear")
    excluded = set(select_paths(names, exclude, "nn.Linear", "exclude")) if exclude else set()
    # quantize every layer before swapping any: a weight that cannot be quantized (nan, inf)
    # then leaves the whole model as it was
    quantized = {name: Linear4bit.from_linear(model.get_submodule(name), blocksize,
                                              double_quant, compute_dtype, bits)
                 for name in sorted(set(chosen) - excluded)}
    for name, layer in quantized.items():
        replace_module(model, name, layer)
    return model
