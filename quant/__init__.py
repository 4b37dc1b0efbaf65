"""4-bit quantization from scratch: the NF4 code book, block-wise absmax quantization, double
quantization of the scales, and a 4-bit linear layer for QLoRA.

    nf4.py           NF4_CODE derived from normal quantiles (normal_float_levels(bits) for
                     2^bits levels); quantize_nf4 / dequantize_nf4
    blockwise.py     shared machinery: blocks, absmax, nearest level, nibble packing, lookup
    double_quant.py  the per-block scales stored in 8 bits (QLoRA Sec. 3)
    qtensor.py       Quantized4bit, the stored weight, and the generic quantize_4bit
    baselines.py     int4 and FP4 (E2M1) with the same interface, for comparison
    linear4bit.py    DequantMatmul (autograd Function), Linear4bit, quantize_model
    load_4bit.py     load_pretrained_4bit: a Hugging Face folder quantized as it is read
    bench.py         benchmark_nf4: quantize / dequantize throughput, dequant-matmul overhead
    analysis.py      measuring a code on a weight (lesson 05); codes_changed, the share of codes
                     two 4-bit layers disagree on, is public
"""
from .analysis import codes_changed
from .baselines import FP4_CODE, INT4_CODE, quantize_fp4, quantize_int4
from .linear4bit import DequantMatmul, Linear4bit, quantize_model
from .load_4bit import load_pretrained_4bit
from .nf4 import NF4_CODE, dequantize_nf4, normal_float_levels, quantize_nf4
from .qtensor import Quantized4bit, quantize_4bit

__all__ = ["NF4_CODE", "normal_float_levels", "quantize_nf4", "dequantize_nf4", "Quantized4bit",
           "quantize_4bit",
           "INT4_CODE", "FP4_CODE", "quantize_int4", "quantize_fp4",
           "DequantMatmul", "Linear4bit", "quantize_model", "load_pretrained_4bit", "codes_changed"]
