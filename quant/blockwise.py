"""Block-wise absmax quantization, the reference: what every 4-bit format here shares.

A weight is flattened and cut into blocks of `blocksize` consecutive values (QLoRA Sec. 2,
"Block-wise k-bit Quantization"). Each block b keeps one float scale, its absolute maximum
m_b = max_i |x_i|, and every value is stored as the index of the nearest level of a small code
book c (sorted, inside [-1, 1]):

    q_i = argmin_j |x_i / m_b - c_j|,        x_i ~= c[q_i] * m_b.

Nearest level = count of midpoints (c_j + c_{j+1}) / 2 strictly below x_i / m_b, so a value
exactly on a midpoint goes to the lower level, as the reference CUDA decision tree does
(it tests `x > midpoint`). A 4-bit code fits in a nibble: element 2i goes in the high nibble
of byte i and element 2i+1 in the low one.

This file is the definition, written to be read. quant/tuned.py computes the same codes and
values faster (a cell lookup instead of a search, a table gather that decodes both nibbles of
a byte at once, work in cache-sized steps); quant/kernels.py picks which one runs, and the
tests hold the two equal. The file is format-agnostic: NF4, int4 and FP4 differ only in code.
"""
import torch


def check_blocksize(blocksize):
    """Blocks must hold whole bytes of packed codes, so the size is a positive even int."""
    if not isinstance(blocksize, int) or blocksize <= 0 or blocksize % 2:
        raise ValueError(f"blocksize must be a positive even integer, got {blocksize!r}")


def unravel(flat_index: int, shape) -> tuple:
    """The index tuple of element `flat_index` of a row-major tensor of `shape`."""
    where = []
    for size in reversed(tuple(shape)):
        flat_index, i = divmod(flat_index, size)
        where.append(i)
    return tuple(reversed(where))


def check_finite(w, who):
    """Raise a ValueError naming how many values of `w` are nan/inf -- or too large for
    float32, in which blocks are quantized -- and where the first one is."""
    bad = ~torch.isfinite(w.detach().float())  # a finite 1e39 in float64 is inf here
    n_bad = int(bad.sum())
    if n_bad:
        flat_index = int(bad.reshape(-1).nonzero()[0])
        value = w.reshape(-1)[flat_index].item()
        raise ValueError(f"{who}: weight has {n_bad} non-finite value(s) in float32 (nan, inf, "
                         f"or beyond float32's range |w| > 3.4e38); the first is {value} at "
                         f"index {unravel(flat_index, w.shape)}")


def to_blocks(w, blocksize):
    """Flatten `w` to float32 and zero-pad it to whole blocks -> (n_blocks, blocksize).

    Zero padding never changes a block's absmax, so the last, partial block is quantized
    exactly as if it were alone.
    """
    flat = w.detach().reshape(-1).float()
    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize)  # (n_blocks, blocksize)


def block_absmax(blocks):
    """m_b = max_i |x_i| per block, (n_blocks, blocksize) -> (n_blocks,) float32."""
    return blocks.abs().amax(dim=1)


def reciprocal_scales(absmax):
    """1 / absmax, with 0 for all-zero blocks (their values are 0 and must stay 0).

    The reference multiplies by the reciprocal rather than dividing, and so do we, so that a
    value lands on the same side of a midpoint as it would there.
    """
    return torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))


def midpoints(code):
    """Decision boundaries between adjacent levels of a sorted code book, (L,) -> (L-1,)."""
    return (code[:-1] + code[1:]) / 2


def nearest_level(x, code):
    """q = #{j : x > (c_j + c_{j+1}) / 2}, the number of midpoints strictly below x, for every
    value of x (int32, same shape): the index of the nearest level, a tie going to the lower.

    torch.bucketize with right=False returns exactly that count (the i with
    mids[i-1] < x <= mids[i]), by binary search over the midpoints."""
    return torch.bucketize(x, midpoints(code), right=False, out_int32=True)


def worst_case_error(code):
    """Largest |t - nearest level| over t in [-1, 1]: half the widest gap, or an end gap.

    Multiplied by a block's absmax, it bounds every element's quantization error.
    """
    half_gaps = (code[1:] - code[:-1]) / 2
    ends = torch.stack([code[0] + 1, 1 - code[-1]])
    return float(torch.cat([half_gaps, ends]).max())


def pack_nibbles(codes):
    """Two 4-bit codes per byte: element 2i -> high nibble, element 2i+1 -> low nibble."""
    pairs = codes.to(torch.uint8).view(-1, 2)  # (n_bytes, 2)
    return pairs[:, 0] * 16 + pairs[:, 1]  # uint8 arithmetic: no wider temporaries


def unpack_nibbles(packed):
    """Inverse of pack_nibbles: (n_bytes,) uint8 -> (2 * n_bytes,) uint8 codes."""
    return torch.stack([packed >> 4, packed & 15], dim=1).view(-1)  # (n_bytes, 2) -> flat


def quantize_blocks(blocks, scales, code):
    """Packed 4-bit codes of (n_blocks, blocksize) values, `scales` = their absmax (n_blocks,):
    q = nearest level of x / m_b, two codes a byte -> (n_blocks * blocksize / 2,) uint8."""
    scaled = blocks * reciprocal_scales(scales).unsqueeze(1)  # (n_blocks, blocksize) in [-1, 1]
    return pack_nibbles(nearest_level(scaled, code))


def dequantize_blocks(packed, scales, code, blocksize, dtype=torch.float32, table=None):
    """x ~= c[q] * m_b: packed codes and per-block scales -> (n_blocks, blocksize) in `dtype`.

    The product is formed in float32 and rounded to `dtype` once. `table` is for the tuned
    decoder (quant/tuned.py), which takes the same arguments; the definition needs none."""
    levels = code[unpack_nibbles(packed).long()]                 # (n_blocks * blocksize,)
    values = levels.view(-1, blocksize) * scales.unsqueeze(1)   # (n_blocks, blocksize)
    return values.to(dtype)
