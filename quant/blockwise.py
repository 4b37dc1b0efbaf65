"""Block-wise absmax quantization: the machinery every 4-bit format here shares.

A weight is flattened and cut into blocks of `blocksize` consecutive values (QLoRA Sec. 2,
"Block-wise k-bit Quantization"). Each block b keeps one float scale, its absolute maximum
m_b = max_i |x_i|, and every value is stored as the index of the nearest level of a small code
book c (sorted, inside [-1, 1]):

    q_i = argmin_j |x_i / m_b - c_j|,        x_i ~= c[q_i] * m_b.

Nearest level = count of midpoints (c_j + c_{j+1}) / 2 strictly below x_i / m_b, so a value
exactly on a midpoint goes to the lower level, as the reference CUDA decision tree does
(it tests `x > midpoint`). A 4-bit code fits in a nibble: element 2i goes in the high nibble
of byte i and element 2i+1 in the low one.

This file is format-agnostic: NF4, int4 and FP4 differ only in their code book.
"""
import torch

# Elements quantized per step: enough to amortise the per-op cost (Python, thread start-up),
# few enough that the temporaries (1 MB of scaled floats, 1 MB of cell indices) stay in the
# CPU cache and never cost a full-weight copy. 2^18 quantized a 4096 x 4096 weight 1.7x
# faster than 2^21 did, and 2^19 or 2^16 were no faster (measured, 2-core AMD EPYC).
CHUNK_ELEMENTS = 1 << 18


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
    """Per-block absolute maximum, (n_blocks, blocksize) -> (n_blocks,) float32."""
    lo, hi = blocks.aminmax(dim=1)  # one pass instead of abs() then amax()
    return torch.maximum(-lo, hi)


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
    """Index of the nearest level of `code` for every value of `x` (integer, same shape).

    The definition: the index is the number of midpoints strictly below x, so a tie (x exactly
    on a midpoint) picks the lower level. Counting it with one comparison per midpoint is
    exact but costs 15 passes over x for a 4-bit code book; so when level_cells finds a grid
    for the code book, one lookup does it in about 8 passes (nearest_level_by_cells). The
    counting stays as the fallback, and as the reference the tests check the lookup against.
    For the 256-level code book of the scales, the binary search (bucketize, right=False: the
    same tie rule) wins.
    """
    mids = midpoints(code)
    if mids.numel() > 15:
        return torch.bucketize(x, mids, right=False, out_int32=True)
    cells = level_cells(code)
    if cells is not None:
        return nearest_level_by_cells(x, cells)
    return count_midpoints_below(x, mids)


def count_midpoints_below(x, mids):
    """sum_j [x > mids_j] for every value of x, as uint8: the definition, one pass a midpoint."""
    index = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for boundary in mids.tolist():  # float32 values: the comparison stays exact
        index += x > boundary
    return index


def level_cells(code, max_half=1 << 12):
    """Lookup tables that give the nearest level of `code` in one step instead of 15.

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
    if mids.numel() == 0 or mids.abs().max() > 1:  # not a code book inside [-1, 1]
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
    """Packed 4-bit nearest-level codes of (n_blocks, blocksize) values; `scales` = absmax.

    Works chunk by chunk so that the temporaries stay small and in cache.
    """
    n_blocks, blocksize = blocks.shape
    inverse = reciprocal_scales(scales)
    cells, mids = level_cells(code), midpoints(code)  # built once, not per chunk
    packed = torch.empty(n_blocks * blocksize // 2, dtype=torch.uint8, device=blocks.device)
    step = max(1, CHUNK_ELEMENTS // blocksize)  # blocks per chunk
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        scaled = blocks[start:stop] * inverse[start:stop, None]  # (chunk, blocksize) in [-1, 1]
        levels = (nearest_level_by_cells(scaled, cells) if cells is not None
                  else count_midpoints_below(scaled, mids))  # a 4-bit code book: <= 15 mids
        byte_range = slice(start * blocksize // 2, stop * blocksize // 2)
        packed[byte_range] = pack_nibbles(levels)
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


# Packed bytes decoded per step of dequantize_blocks: 2^18 bytes -> 2^19 values. Its temporaries
# (1 MiB of int32 indices, 2 MiB of float32 pairs) stay in cache and are reused from step to
# step, and a 4096 x 4096 weight takes 32 steps, so the fixed cost of each op is paid rarely.
DECODE_BYTES = 1 << 18


def dequantize_blocks(packed, scales, code, blocksize, dtype=torch.float32, table=None):
    """Packed codes and per-block scales -> (n_blocks, blocksize) values in `dtype`.

    Step by step over DECODE_BYTES bytes of whole blocks, three ops each:
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
    The output is the one full-size tensor, written once. A weight that fits in one step
    (every weight of the tiny GPT) skips the buffers: gather, then scale in place -- the fewest
    ops, which matters more than bytes for small weights, decoded twice per layer per step.
    `scales` are float32 (n_blocks,); `table` is pair_table(code) when the caller keeps one
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
