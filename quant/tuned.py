"""Block-wise quantization, tuned: the same codes and values as quant/blockwise.py, faster.

Each function here has a reference of the same name in blockwise.py that defines what it
computes; the tests hold every one equal to it, bit for bit, ties included. quant/kernels.py
selects this module (or the reference) in one place. What each trick buys is measured by
`python -m lessons.speed` (quantize and dequantize, reference vs tuned, taking turns).

    block_absmax       one aminmax pass instead of abs() then amax()
    nearest_level      a cell lookup, about 8 passes over x instead of a binary search
    quantize_blocks    in chunks of CHUNK_ELEMENTS, so the temporaries stay in cache
    dequantize_blocks  one gather through a 256-entry table of byte -> both levels, in steps
                       of DECODE_BYTES that reuse their buffers
"""
import torch

from .blockwise import midpoints, nearest_level as nearest_level_reference, pack_nibbles
from .blockwise import reciprocal_scales

# Elements quantized per step: enough to amortise the per-op cost (Python, thread start-up),
# few enough that the temporaries (1 MB of scaled floats, 1 MB of cell indices) stay in the
# CPU cache and never cost a full-weight copy. 2^18 quantized a 4096 x 4096 weight 1.7x
# faster than 2^21 did, and 2^19 or 2^16 were no faster (measured, 2-core AMD EPYC).
CHUNK_ELEMENTS = 1 << 18

# Packed bytes decoded per step of dequantize_blocks: 2^18 bytes -> 2^19 values. Its temporaries
# (1 MiB of int32 indices, 2 MiB of float32 pairs) stay in cache and are reused from step to
# step, and a 4096 x 4096 weight takes 32 steps, so the fixed cost of each op is paid rarely.
DECODE_BYTES = 1 << 18


def block_absmax(blocks):
    """max(-min, max) per block: the absmax in one pass, (n_blocks, blocksize) -> (n_blocks,)."""
    lo, hi = blocks.aminmax(dim=1)
    return torch.maximum(-lo, hi)


def level_cells(code, max_half=1 << 12):
    """Lookup tables that give the nearest level of `code` in one step instead of a search.

    Cut the line into cells of width 1/h (h a power of two). For y = h x, cell c = floor(y) + h
    holds x in [(c - h) / h, (c - h + 1) / h), and if no cell holds two midpoints,

        number of midpoints below x = below[c] + (y > inside[c]),

    with below[c] the midpoints strictly below the cell's lower edge, and inside[c] = h times
    the one midpoint in the cell, or +inf. Multiplying by a power of two and floor are exact
    in float32, and so is h * midpoint, so the answer equals the count, ties included: a
    midpoint on an edge lands inside its cell and counts only for x above it. Cells are
    clamped to [0, 2h], so any finite x works: x < -1 gets 0, x >= 1 gets every midpoint.

    h starts at 32 (cells of 1/32; NF4's midpoints are at least 0.08 apart) and doubles up to
    `max_half` until each cell holds at most one midpoint.
    -> (h, below (2h + 1,) uint8, inside (2h + 1,) float32), or None if no such grid exists.
    """
    mids = midpoints(code).to(torch.float32)
    if mids.numel() == 0 or mids.numel() > 255 or mids.abs().max() > 1:
        return None
    h = 32
    while h <= max_half:
        scaled = mids * h                                  # exact: h is a power of two
        cell = torch.floor(scaled).long() + h              # (n_mids,) in [0, 2h]
        if cell.unique().numel() == cell.numel():          # at most one midpoint a cell
            edges = torch.arange(-h, h + 1, dtype=torch.float32, device=code.device)  # h x edge
            below = (scaled[None, :] < edges[:, None]).sum(1).to(torch.uint8)       # (2h + 1,)
            inside = torch.full((2 * h + 1,), float("inf"), device=code.device)
            inside[cell] = scaled
            return h, below, inside
        h *= 2
    return None


def nearest_level_by_cells(x, cells):
    """nearest_level through level_cells' tables: 8 passes over x, two of them gathers."""
    h, below, inside = cells
    y = x * h                                                          # exact
    cell = torch.floor(y).add_(h).clamp_(0, 2 * h).to(torch.int32).view(-1)
    count = torch.index_select(below, 0, cell).view(x.shape)           # uint8
    return count.add_(y > torch.index_select(inside, 0, cell).view(x.shape))


def quantize_blocks(blocks, scales, code):
    """blockwise.quantize_blocks, chunk by chunk, the nearest level by cells where a grid fits
    the code book (the 4-bit ones) and by the reference's binary search where none does."""
    n_blocks, blocksize = blocks.shape
    inverse = reciprocal_scales(scales)
    cells = level_cells(code)  # built once, not per chunk
    packed = torch.empty(n_blocks * blocksize // 2, dtype=torch.uint8, device=blocks.device)
    step = max(1, CHUNK_ELEMENTS // blocksize)  # blocks per chunk
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        scaled = blocks[start:stop] * inverse[start:stop, None]  # (chunk, blocksize) in [-1, 1]
        levels = (nearest_level_by_cells(scaled, cells) if cells is not None
                  else nearest_level_reference(scaled, code))
        packed[start * blocksize // 2: stop * blocksize // 2] = pack_nibbles(levels)
    return packed


def pair_table(code):
    """(256, 2) float32 table: byte -> (level of its high nibble, level of its low nibble).

    With it one gather turns n packed bytes into 2n floats already in element order.
    Code books with fewer than 16 levels are padded with zeros (those codes never occur).
    """
    levels = torch.zeros(16, dtype=torch.float32, device=code.device)
    levels[: code.numel()] = code
    byte = torch.arange(256, device=code.device)
    return torch.stack([levels[byte >> 4], levels[byte & 15]], dim=1)  # (256, 2)


def dequantize_blocks(packed, scales, code, blocksize, dtype=torch.float32, table=None):
    """blockwise.dequantize_blocks, step by step over DECODE_BYTES bytes of whole blocks:
        1. copy the step's bytes into a reused int32 buffer: index_select takes int32 or
           int64 indices, never uint8 (which indexing would read as a mask);
        2. gather through the (256, 2) float32 pair table *viewed as a 1-D table of 256
           float64 values*: one 8-byte load per byte brings both of its levels, already in
           element order. index_select from a 1-D table is the fastest gather torch has on
           CPU for this: 2.4x faster than from the same table shaped (256, 1), which copies
           rows, and 2-4x faster than advanced indexing, take or gather (measured). It
           writes into a reused buffer;
        3. multiply by the block scales in float32 and write the products into the output in
           `dtype` -- so a bf16 weight is rounded once, from the exact float32 product, and
           never exists in float32 at full size.
    A weight that fits in one step (every weight of the tiny GPT) skips the buffers: gather,
    then scale in place -- the fewest ops, which matters more than bytes for small weights,
    decoded twice per layer per step. `table` is pair_table(code) when the caller keeps one
    (Linear4bit does, per device); otherwise it is built here.
    """
    if table is None:
        table = pair_table(code)
    pairs = table.view(torch.float64).view(-1)  # (256,): a byte's two levels in one value
    n_blocks, n_bytes = scales.numel(), packed.numel()
    bytes_per_block = blocksize // 2
    step = max(1, DECODE_BYTES // bytes_per_block) * bytes_per_block  # whole blocks
    if n_bytes <= step:
        levels = torch.index_select(pairs, 0, packed.int()).view(torch.float32)  # (2 n_bytes,)
        values = levels.view(n_blocks, blocksize).mul_(scales.unsqueeze(1))
        return values if dtype == torch.float32 else values.to(dtype)
    out = torch.empty((n_blocks, blocksize), dtype=dtype, device=packed.device)
    index = torch.empty(step, dtype=torch.int32, device=packed.device)
    values = torch.empty(step, dtype=torch.float64, device=packed.device)
    for start in range(0, n_bytes, step):
        stop = min(start + step, n_bytes)
        blocks = slice(start // bytes_per_block, stop // bytes_per_block)
        chunk_index, chunk_values = index[: stop - start], values[: stop - start]
        chunk_index.copy_(packed[start:stop])
        torch.index_select(pairs, 0, chunk_index, out=chunk_values)
        levels = chunk_values.view(torch.float32).view(-1, blocksize)  # (blocks, blocksize)
        if dtype == torch.float32:
            torch.mul(levels, scales[blocks, None], out=out[blocks])
        else:  # scale in place, then round while copying: a mixed-dtype mul would allocate
            out[blocks].copy_(levels.mul_(scales[blocks, None]))  # a float32 temporary
    return out
