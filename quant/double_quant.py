"""Double quantization: store the per-block scales themselves in 8 bits (QLoRA Sec. 3).

With blocks of 64, one float32 absmax per block costs 32 / 64 = 0.5 bits per parameter. QLoRA
quantizes those scales a second time: subtract their mean (they are all positive, so centring
them uses the signed code book fully), then quantize the centred scales block-wise in blocks
of 256 to 8 bits. The cost becomes 8 / 64 + 32 / (64 * 256) ~= 0.127 bits per parameter for a
weight of many groups; the codes are padded to a whole group of 256, so a small weight pays more
(quant/qtensor.py, storage_bytes).

The 8-bit code book. The paper says "8-bit floats"; the reference implementation uses its
signed "dynamic tree" map, and so do we, derived below (`dynamic_map`): one sign, and for each
of 7 decades 10^-6 .. 10^0 a set of linearly spaced fractions, 2^k of them in the k-th decade,
so small values keep relative precision and large ones get the most levels.
Its widest gap is in the top decade, 0.9 / 64, and its negative end is -0.99297, so the
rounding error of a centred scale is at most 0.00703 x the absmax of its group of 256
(`worst_case_error(DYNAMIC_MAP)`). A linear int8 code (k / 127) would bound it by 0.0039 x that
absmax instead; we keep the reference's map so that stored scale codes mean the same as there.
For N(0, 1) weights with blocks of 64 the centred scales are small next to the scales, and a
dequantized scale is off by about 0.2% on average and under 1% at worst (tests check this).
"""
from dataclasses import dataclass
from typing import Optional

import torch

from .blockwise import block_absmax, nearest_level, reciprocal_scales, to_blocks

SCALE_BLOCKSIZE = 256  # scales per second-level block (QLoRA Sec. 3)


def dynamic_map(exponent_bits=7):
    """The signed 8-bit dynamic-tree code book of the reference implementation: (256,) sorted.

    Decade k (k = 0 .. exponent_bits-1) covers [0.1, 1] x 10^(k - exponent_bits + 1) with the
    midpoints of 2^k + 1 linearly spaced boundaries; both signs; plus exactly 0 and 1.
    """
    values = [0.0, 1.0]
    for k in range(exponent_bits):
        bounds = torch.linspace(0.1, 1.0, 2 ** k + 1, dtype=torch.float64)
        fractions = (bounds[:-1] + bounds[1:]) / 2
        magnitude = 10.0 ** (k - exponent_bits + 1)
        values += (magnitude * fractions).tolist() + (-magnitude * fractions).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_MAP = dynamic_map()  # (256,) float32


@dataclass
class DoubleQuantScales:
    """Per-block scales stored in 8 bits.

    scale ~= DYNAMIC_MAP[codes] * absmax[group] + offset, group = block index // 256.
    """
    codes: torch.Tensor   # (n_groups * 256,) uint8, zero-padded to whole groups
    absmax: torch.Tensor  # (n_groups,) float32, absmax of the centred scales per group
    offset: torch.Tensor  # () float32, the mean that was subtracted
    count: int            # number of real scales (the rest of `codes` is padding)
    levels: Optional[torch.Tensor] = None  # DYNAMIC_MAP on the codes' device, if kept there

    @property
    def nbytes(self):
        return self.codes.numel() + 4 * self.absmax.numel() + 4

    def dequantize(self):
        """-> (count,) float32 scales. Pass `levels` (DYNAMIC_MAP already on the device) to
        avoid a host-to-device copy of the map on every call on a GPU."""
        levels = self.levels if self.levels is not None else DYNAMIC_MAP.to(self.absmax.device)
        # index_select takes int32 indices (a quarter of int64's bytes); multiply and add in
        # place on the one new tensor
        scales = torch.index_select(levels, 0, self.codes.int()).view(-1, SCALE_BLOCKSIZE)
        scales = scales.mul_(self.absmax.unsqueeze(1)).add_(self.offset).view(-1)
        return scales if scales.numel() == self.count else scales[: self.count]


def quantize_scales(scales):
    """(n_blocks,) float32 absmax values -> DoubleQuantScales (QLoRA Sec. 3)."""
    offset = scales.mean()
    groups = to_blocks(scales - offset, SCALE_BLOCKSIZE)  # (n_groups, 256)
    absmax = block_absmax(groups)
    normalised = groups * reciprocal_scales(absmax)[:, None]  # in [-1, 1]
    codes = nearest_level(normalised, DYNAMIC_MAP.to(scales.device))
    return DoubleQuantScales(codes.to(torch.uint8).view(-1), absmax, offset, scales.numel())
