"""int4 and FP4 baselines: their code books, round trips, error bounds, and NF4 vs both."""
import pytest
import torch

from quant import FP4_CODE, INT4_CODE, NF4_CODE, quantize_fp4, quantize_int4, quantize_nf4
from quant.baselines import e2m1_magnitudes
from quant.blockwise import to_blocks, unpack_nibbles, worst_case_error

FORMATS = [(quantize_int4, INT4_CODE), (quantize_fp4, FP4_CODE)]
FP32_SLACK = 1e-6  # a few float32 ulps (relative) on top of the rounding bound


def test_code_books():
    assert e2m1_magnitudes().tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]  # OCP MX FP4 (E2M1)
    assert torch.equal(FP4_CODE * 6, torch.tensor([-6, -4, -3, -2, -1.5, -1, -0.5,
                                                   0, 0.5, 1, 1.5, 2, 3, 4, 6]))
    assert torch.equal(INT4_CODE * 7, torch.arange(-7.0, 8.0))
    for code in (INT4_CODE, FP4_CODE):
        assert code.numel() == 15 and (code[1:] > code[:-1]).all()


@pytest.mark.parametrize("quantize, code", FORMATS)
def test_every_level_quantizes_to_itself(quantize, code):
    w = code * 0.7  # one block (blocksize 16 >= 15 values), absmax 0.7
    q = quantize(w, blocksize=16)
    assert torch.equal(unpack_nibbles(q.codes)[:15], torch.arange(15, dtype=torch.uint8))
    assert torch.equal(q.dequantize(), w)


@pytest.mark.parametrize("quantize, code", FORMATS)
@pytest.mark.parametrize("shape", [(130, 70), (37,)])
def test_round_trip_within_own_bound(quantize, code, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    q = quantize(w)
    out = q.dequantize()
    assert out.shape == w.shape and q.bits_per_param <= 4.5 + 32 * 8 / w.numel()
    blocks = to_blocks(w, 64)
    absmax = blocks.abs().amax(1, keepdim=True).expand_as(blocks).reshape(-1)[: w.numel()]
    bound = worst_case_error(code) * absmax * (1 + FP32_SLACK)
    assert ((out - w).abs().reshape(-1) <= bound).all()


def test_worst_case_errors():
    assert worst_case_error(INT4_CODE) == pytest.approx(1 / 14)   # half of a 1/7 step
    assert worst_case_error(FP4_CODE) == pytest.approx(1 / 6)     # half of the 4 -> 6 gap, /6
    assert worst_case_error(NF4_CODE) == pytest.approx((1 - 0.6961928009986877) / 2)  # -1 -> -.70


def test_nf4_beats_fp4_beats_int4_on_normal_weights():
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    mse = {name: ((quantize(w, double_quant=False).dequantize() - w) ** 2).mean().item()
           for name, quantize in [("nf4", quantize_nf4), ("fp4", quantize_fp4),
                                  ("int4", quantize_int4)]}
    assert mse["nf4"] < mse["fp4"] < mse["int4"], mse
