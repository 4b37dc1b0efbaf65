"""The one place that chooses which implementation of the block-wise loops runs.

quant/blockwise.py holds the reference (the definitions, written to be read); quant/tuned.py
computes the same codes and values faster. Everything else in `quant` calls the functions
below, so a reader can follow the reference, and a test or a benchmark can switch:

    quant.kernels.TUNED = False        # or LORA_REFERENCE=1 in the environment, which
                                       # also runs lora's reference Function (lora/tuned)

The tuned functions stay only where they buy at least 10% on the operation they serve;
`python -m lessons.speed` measures each against its reference, taking turns.
"""
import os

from . import blockwise, tuned

TUNED = os.environ.get("LORA_REFERENCE", "") != "1"


def block_absmax(blocks):
    """(n_blocks, blocksize) -> (n_blocks,) absmax: blockwise.block_absmax."""
    return (tuned if TUNED else blockwise).block_absmax(blocks)


def quantize_blocks(blocks, scales, code):
    """Packed 4-bit codes: blockwise.quantize_blocks."""
    return (tuned if TUNED else blockwise).quantize_blocks(blocks, scales, code)


def dequantize_blocks(packed, scales, code, blocksize, dtype, table=None):
    """(n_blocks, blocksize) values in `dtype`: blockwise.dequantize_blocks."""
    return (tuned if TUNED else blockwise).dequantize_blocks(packed, scales, code, blocksize,
                                                             dtype, table)


def decode_table(code):
    """The table the tuned decoder gathers through (a layer keeps one per device)."""
    return tuned.pair_table(code)
