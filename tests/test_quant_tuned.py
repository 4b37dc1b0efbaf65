"""The tuned block-wise loops (quant/tuned.py) compute what the reference (quant/blockwise.py)
defines, bit for bit, and quant/kernels.py switches between them in one place."""
import pytest
import torch

import quant.kernels as kernels
from quant import NF4_CODE, quantize_nf4
from quant import blockwise, tuned
from quant.baselines import FP4_CODE, INT4_CODE
from quant.nf4 import normal_float_levels

CODE_BOOKS = {"nf4": NF4_CODE, "int4": INT4_CODE, "fp4": FP4_CODE,
              "nf3": normal_float_levels(3), "nf2": normal_float_levels(2)}


def weight_with_ties(code, n_blocks=9, blocksize=64, seed=0):
    """Blocks of random values plus, in every block, values exactly on each midpoint times the
    block's absmax (where a wrong tie rule shows), and an all-zero block."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn(n_blocks, blocksize, generator=g) * torch.rand(n_blocks, 1, generator=g)
    mids = blockwise.midpoints(code)
    blocks[:, : mids.numel()] = mids * blocks.abs().amax(1, keepdim=True)
    blocks[:, -1] = blocks.abs().amax(1) * 1.01  # the absmax itself sits at +1
    blocks[-1] = 0.0
    return blocks


@pytest.mark.parametrize("name", sorted(CODE_BOOKS))
def test_tuned_quantize_gives_the_reference_codes(name):
    code = CODE_BOOKS[name]
    blocks = weight_with_ties(code)
    scales = blockwise.block_absmax(blocks)
    assert torch.equal(tuned.block_absmax(blocks), scales)
    assert torch.equal(tuned.quantize_blocks(blocks, scales, code),
                       blockwise.quantize_blocks(blocks, scales, code))


def test_tuned_quantize_in_chunks_gives_the_reference_codes(monkeypatch):
    # a chunk of 3 blocks: every chunk must use its own blocks' scales (a chunk that reused
    # the first chunk's scales would give other codes in every later chunk)
    monkeypatch.setattr(tuned, "CHUNK_ELEMENTS", 3 * 64)
    blocks = weight_with_ties(NF4_CODE, n_blocks=20) * torch.logspace(-3, 2, 20).unsqueeze(1)
    scales = blockwise.block_absmax(blocks)
    assert torch.equal(tuned.quantize_blocks(blocks, scales, NF4_CODE),
                       blockwise.quantize_blocks(blocks, scales, NF4_CODE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decode_bytes", [1 << 18, 32 * 5])  # one step; many, the last partial
def test_tuned_dequantize_gives_the_reference_values(dtype, decode_bytes, monkeypatch):
    monkeypatch.setattr(tuned, "DECODE_BYTES", decode_bytes)
    blocks = weight_with_ties(NF4_CODE, n_blocks=37)
    scales = blockwise.block_absmax(blocks)
    packed = blockwise.quantize_blocks(blocks, scales, NF4_CODE)
    reference = blockwise.dequantize_blocks(packed, scales, NF4_CODE, 64, dtype)
    assert reference.dtype == dtype
    assert torch.equal(tuned.dequantize_blocks(packed, scales, NF4_CODE, 64, dtype), reference)
    table = tuned.pair_table(NF4_CODE)
    assert torch.equal(tuned.dequantize_blocks(packed, scales, NF4_CODE, 64, dtype, table),
                       reference)


def test_kernels_switch_runs_the_reference_when_told(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the tuned loop ran")
    w = torch.randn(48, 40)
    expected_codes = quantize_nf4(w).codes
    expected = quantize_nf4(w).dequantize()
    for name in ("block_absmax", "quantize_blocks", "dequantize_blocks"):
        monkeypatch.setattr(tuned, name, refuse)
    monkeypatch.setattr(kernels, "TUNED", False)
    q = quantize_nf4(w)  # would raise if any tuned loop ran
    assert torch.equal(q.codes, expected_codes) and torch.equal(q.dequantize(), expected)
    monkeypatch.setattr(kernels, "TUNED", True)
    with pytest.raises(AssertionError, match="tuned loop ran"):
        quantize_nf4(w)


def test_reference_dequantize_is_level_times_scale():
    # the definition written out: x = c[q] * m_b for each element of each block
    w = torch.randn(4, 64)
    q = quantize_nf4(w, blocksize=64, double_quant=False)
    levels = NF4_CODE[blockwise.unpack_nibbles(q.codes).long()].view(4, 64)
    assert torch.equal(blockwise.dequantize_blocks(q.codes, q.absmax, q.code, 64),
                       levels * q.absmax.unsqueeze(1))
