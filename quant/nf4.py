"""NF4, the 4-bit NormalFloat data type of QLoRA (Dettmers et al. 2023, Sec. 3 and appendix).

Pretrained weights are roughly zero-mean normal, and after dividing a block by its absmax they
lie in [-1, 1]. NF4 puts its 16 levels at quantiles of N(0, 1), so that each level is used
about equally often -- an (almost) information-theoretically optimal 4-bit code for such data.

The levels, as the paper's appendix and the reference implementation build them:
  * 8 positive levels: Phi^-1(p) for p = linspace(delta, 1/2, 9) without its last point (p=1/2);
  * 7 negative levels: -Phi^-1(p) for p = linspace(delta, 1/2, 8) without its last point;
  * an exact 0, so that zero (padding, pruned weights) is represented without error;
  * all divided by the largest, so the range is exactly [-1, 1].
Phi^-1 is the standard normal quantile function. Stopping at p = delta = 0.9677083 instead of 1
keeps the extreme quantile finite; numerically delta = ((1 - 1/30) + (1 - 1/32)) / 2, halfway
between the usual outermost quantile probabilities for 15 and for 16 bins. One more level on the
positive side than on the negative side is the price of having both an exact 0 and 2^4 levels.
"""
import torch

from .qtensor import Quantized4bit, quantize_4bit

NF4_OFFSET = 0.9677083  # delta above (bitsandbytes create_normal_map default)


def normal_float_levels(bits=4, offset=NF4_OFFSET):
    """The 2^bits NormalFloat levels (float32, sorted, in [-1, 1], with one exact 0).

    Precision follows the reference: float32 probabilities, float64 quantiles, rounded to
    float32 before the division by the max. That reproduces the published table bit for bit.
    """
    half = 2 ** (bits - 1)
    p_pos = torch.linspace(offset, 0.5, half + 1)[:-1].double()  # (half,)
    p_neg = torch.linspace(offset, 0.5, half)[:-1].double()      # (half - 1,)
    levels = torch.cat([torch.special.ndtri(p_pos),    # quantiles of N(0, 1)
                        torch.zeros(1, dtype=torch.float64),
                        -torch.special.ndtri(p_neg)]).float()
    levels = levels.sort().values
    return levels / levels.max()


NF4_CODE = normal_float_levels()  # (16,) float32


def quantize_nf4(w, blocksize=64, double_quant=True):
    """Quantize `w` (any shape, float) to NF4 with block-wise absmax -> Quantized4bit.

    Args:
        w: the weight; nan/inf raise a ValueError saying how many and where.
        blocksize: values per absmax scale (positive, even); QLoRA uses 64.
        double_quant: store the scales in 8 bits (QLoRA Sec. 3): ~4.127 instead of 4.5
            bits per parameter at blocksize 64, when the blocks fill whole groups of 256
            scales; the last group is stored padded (qtensor.storage_bytes).
    """
    return quantize_4bit(w, NF4_CODE, blocksize, double_quant, who="quantize_nf4")


def dequantize_nf4(q: Quantized4bit, dtype=None):
    """NF4_CODE[codes] * block scale -> tensor of the original shape, in `dtype` or the original."""
    return q.dequantize(dtype)
