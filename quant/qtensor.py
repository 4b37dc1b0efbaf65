"""A 4-bit block-quantized weight: packed codes, per-block scales, and the code book they index.

`quantize_4bit(w, code, ...)` works for any sorted code book of at most 16 levels in [-1, 1];
NF4 (nf4.py), int4 and FP4 (baselines.py) are thin wrappers that pass their own.

Storage (what `nbytes` counts, `storage_bytes` computes), for n values in k = ceil(n / B)
blocks of B, and the k scales in g = ceil(k / 256) groups of 256:
    packed codes                      k B / 2 bytes                ~ 4 bits / param
    scales, plain float32 absmax      4 k bytes                    ~ 32 / B bits / param
    scales, double-quantized          256 g + 4 g + 4 bytes        ~ 8 / B + 32 / (256 B)
The approximations hold for large weights. The last block is stored zero-padded, and so are the
8-bit scale codes, to a whole group of 256: a 32 x 32 weight has 16 blocks but stores 256 scale
codes, 6.06 bits per parameter, not 4.13. The 16-entry code book is a shared constant of the
format and is not counted.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from .blockwise import check_blocksize, check_finite, to_blocks
from .kernels import block_absmax, dequantize_blocks, quantize_blocks
from .double_quant import SCALE_BLOCKSIZE, DoubleQuantScales, quantize_scales


def storage_bytes(numel, blocksize=64, double_quant=True):
    """The bytes a weight of `numel` values is stored in (the module docstring's table),
    padding included: what Quantized4bit.nbytes counts on the stored tensors."""
    blocks = -(-numel // blocksize)                        # k = ceil(n / B)
    codes = blocks * blocksize // 2                        # k B / 2: two codes a byte
    if not double_quant:
        return codes + 4 * blocks                          # one float32 absmax a block
    groups = -(-blocks // SCALE_BLOCKSIZE)                 # g = ceil(k / 256)
    return codes + SCALE_BLOCKSIZE * groups + 4 * groups + 4  # codes, absmax, offset


@dataclass
class Quantized4bit:
    """A weight of `shape` stored as 4-bit indices into `code`, one scale per block."""
    codes: torch.Tensor                 # (n_blocks * blocksize // 2,) uint8, two codes a byte
    code: torch.Tensor                  # (<= 16,) float32 code book, sorted, in [-1, 1]
    shape: torch.Size                   # original shape
    dtype: torch.dtype                  # original dtype (the default for dequantize)
    blocksize: int                      # values per scale
    absmax: Optional[torch.Tensor] = None           # (n_blocks,) float32, plain scales
    scales8: Optional[DoubleQuantScales] = None     # or: the scales in 8 bits
    table: Optional[torch.Tensor] = None            # pair_table(code), if the owner keeps one

    @property
    def numel(self):
        return self.shape.numel()

    @property
    def device(self):
        return self.codes.device

    @property
    def double_quant(self):
        return self.scales8 is not None

    @property
    def nbytes(self):
        """Bytes of storage: packed codes + scales (+ second-level scales and offset)."""
        scale_bytes = self.scales8.nbytes if self.double_quant else 4 * self.absmax.numel()
        return self.codes.numel() + scale_bytes

    @property
    def bits_per_param(self):
        return 8 * self.nbytes / self.numel

    def block_scales(self):
        """-> (n_blocks,) float32 scales, decoded from 8 bits when double-quantized."""
        return self.scales8.dequantize() if self.double_quant else self.absmax

    def dequantize(self, dtype=None):
        """-> tensor of `shape` in `dtype` (default: the original dtype)."""
        if not (dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point)):
            raise ValueError(f"dequantize: dtype must be None (the original, {self.dtype}) or a "
                             f"floating-point torch.dtype such as torch.float32 or "
                             f"torch.bfloat16, got {dtype!r}")
        blocks = dequantize_blocks(self.codes, self.block_scales(), self.code, self.blocksize,
                                   dtype or self.dtype, self.table)  # (n_blocks, blocksize)
        if blocks.numel() == self.numel:  # no padded last block to cut off
            return blocks.view(self.shape)
        return blocks.view(-1)[: self.numel].view(self.shape)

    def to_state_dict(self):
        """Plain tensors, ints and a dtype name: ready for a safetensors-style writer."""
        state = {"codes": self.codes, "code": self.code, "blocksize": self.blocksize,
                 "shape": torch.tensor(list(self.shape), dtype=torch.int64),
                 "dtype": str(self.dtype).removeprefix("torch.")}
        if self.double_quant:
            state.update(scale_codes=self.scales8.codes, scale_absmax=self.scales8.absmax,
                         scale_offset=self.scales8.offset)
        else:
            state["absmax"] = self.absmax
        return state

    @classmethod
    def from_state_dict(cls, state):
        """Inverse of to_state_dict."""
        shape = torch.Size([int(s) for s in state["shape"]])
        blocksize = int(state["blocksize"])
        scales8 = None
        if "scale_codes" in state:
            n_blocks = -(-shape.numel() // blocksize)  # ceil division
            scales8 = DoubleQuantScales(state["scale_codes"], state["scale_absmax"],
                                        state["scale_offset"], n_blocks)
        return cls(state["codes"], state["code"], shape, getattr(torch, state["dtype"]),
                   blocksize, state.get("absmax"), scales8)

    def __repr__(self):
        return (f"Quantized4bit(shape={tuple(self.shape)}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, bits_per_param={self.bits_per_param:.3f})")


def quantize_4bit(w, code, blocksize=64, double_quant=True, who="quantize_4bit"):
    """Block-wise absmax quantization of `w` (any shape) to the levels of `code`.

    The 4-bit codes always use the exact float32 absmax; double quantization only changes how
    the scales are stored, never which level a value picked.
    """
    if not (isinstance(w, torch.Tensor) and w.is_floating_point()):
        what = (f"a {w.dtype} tensor" if isinstance(w, torch.Tensor)
                else f"an object of type {type(w).__name__}")
        raise TypeError(f"{who}: w must be a floating-point torch.Tensor, got {what}; "
                        "convert it first, e.g. torch.tensor(w, dtype=torch.float32)")
    check_blocksize(blocksize)
    if w.numel() == 0:
        raise ValueError(f"{who}: cannot quantize an empty tensor of shape {tuple(w.shape)}")
    blocks = to_blocks(w, blocksize)  # (n_blocks, blocksize) float32
    absmax = block_absmax(blocks)
    if not torch.isfinite(absmax).all():  # nan/inf anywhere makes its block's absmax non-finite
        check_finite(w, who)
    own_code = code.to(blocks.device, copy=True)  # never the shared NF4_CODE itself
    packed = quantize_blocks(blocks, absmax, own_code)
    scales8 = quantize_scales(absmax) if double_quant else None
    return Quantized4bit(packed, own_code, w.shape, w.dtype, blocksize,
                         None if double_quant else absmax, scales8)
