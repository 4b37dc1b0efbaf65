"""Two 4-bit baselines that NF4 is compared against (QLoRA Sec. 3 compares all three).

Both use the same block-wise absmax machinery as NF4; only the code book differs, and both
happen to have 15 distinct levels (a sign bit gives +0 and -0 the same value), one fewer than
NF4's 16.

* int4, symmetric absmax: levels k / 7 for k = -7 .. 7, evenly spaced. We use the symmetric
  15-level variant rather than -8 .. 7 because absmax scaling maps values into [-1, 1], so a
  -8/7 level would never be the nearest one, and -8 .. 7 / 8 would waste precision at +1.
* FP4 E2M1 (1 sign, 2 exponent, 1 mantissa bit; the OCP microscaling FP4): magnitudes
  0, 0.5, 1, 1.5, 2, 3, 4, 6, divided by 6 so the range is [-1, 1]. Denser near zero than int4,
  but its top gap (4 -> 6, i.e. 0.67 -> 1) is wide.

Each level is a code; the nibble a value gets is its index in the sorted code book.
"""
import torch

from .qtensor import quantize_4bit

INT4_CODE = torch.arange(-7, 8, dtype=torch.float32) / 7  # (15,)


def e2m1_magnitudes():
    """The 8 non-negative E2M1 values, from their bit fields (exponent bias 1).

    Exponent field e = 1..3: (1 + m/2) * 2^(e-1); e = 0 (subnormal): m/2. -> 0, .5, 1, .., 6.
    """
    values = [m / 2 for m in range(2)]
    values += [(1 + m / 2) * 2.0 ** (e - 1) for e in range(1, 4) for m in range(2)]
    return torch.tensor(values)


def fp4_levels():
    """Both signs of the E2M1 magnitudes (one shared 0), divided by the largest: (15,)."""
    magnitudes = e2m1_magnitudes()
    return torch.cat([-magnitudes[1:].flip(0), magnitudes]) / magnitudes.max()


FP4_CODE = fp4_levels()  # (15,) float32


def quantize_int4(w, blocksize=64, double_quant=False):
    """Symmetric block-wise absmax int4 (levels k/7, k = -7..7) -> Quantized4bit."""
    return quantize_4bit(w, INT4_CODE, blocksize, double_quant, who="quantize_int4")


def quantize_fp4(w, blocksize=64, double_quant=False):
    """Block-wise absmax FP4 E2M1 (levels +-{0, .5, 1, 1.5, 2, 3, 4, 6} / 6) -> Quantized4bit."""
    return quantize_4bit(w, FP4_CODE, blocksize, double_quant, who="quantize_fp4")
