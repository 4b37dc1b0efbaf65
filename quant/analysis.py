"""Measuring a 4-bit code on a weight: which codes it uses, how much it loses, where it fails.

The quantities lesson 05 prints, each a plain function of a weight and a quantizer
(``quantize_nf4``, ``quantize_fp4``, ``quantize_int4``: ``quantize(w, blocksize, double_quant)``):

- ``codes_of`` / ``occupancy`` / ``entropy_bits``: how evenly the 16 codes are used;
- ``normalised_mse``: the error relative to the weight's own energy;
- ``block_kurtosis``: how heavy-tailed the blocks are (what decides int4 vs FP4);
- ``per_block_mse`` / ``row_group_errors``: where the error sits (one outlier's block, rows
  whose scales are far smaller than their neighbours' under double quantization).
"""
import torch

from .blockwise import nearest_level, to_blocks, unpack_nibbles
from .nf4 import NF4_CODE

NF4_ZERO = int((NF4_CODE == 0).nonzero())  # 7: the index of NF4's exact 0


def linear_weights(model):
    """name -> the (out, in) weight of each ``*_proj`` linear layer of a model, on the CPU: the
    weights a 4-bit model stores in NF4."""
    return {n.removesuffix(".weight"): p.detach().cpu() for n, p in model.named_parameters()
            if n.endswith("_proj.weight")}


def codes_of(w, quantize, blocksize=64):
    """The 4-bit index of every element of w -> (numel,) long, in w's element order."""
    q = quantize(w, blocksize=blocksize, double_quant=False)
    return unpack_nibbles(q.codes)[: w.numel()].long()


def codes_changed(pairs):
    """Share of 4-bit codes that differ between the layers of each pair -> float in [0, 1].

    ``pairs``: [(a, b), ...] of 4-bit layers or tensors holding packed ``codes`` of the same
    shape (a Linear4bit, a Quantized4bit): sum_k #{a_k != b_k} / sum_k #codes_k."""
    unpacked = [(unpack_nibbles(a.codes.cpu()), unpack_nibbles(b.codes.cpu())) for a, b in pairs]
    return sum((a != b).sum().item() for a, b in unpacked) / sum(a.numel() for a, _ in unpacked)


def entropy_bits(frac):
    """Entropy of a distribution over codes, in bits: H = -sum_i f_i log2 f_i over f_i > 0.

    4 when all 16 codes are equally used, 0 when one code holds everything."""
    frac = frac[frac > 0]
    return -(frac * frac.log2()).sum().item()


def code_shares(codes):
    """f_i = (number of elements stored as code i) / (number of elements) -> (16,) float64."""
    codes = codes.reshape(-1).long()
    return torch.bincount(codes, minlength=16).double() / codes.numel()


def occupancy(weights, quantize):
    """Share of the elements stored as each of the 16 codes, pooled over one weight or a list
    of weights -> ((16,) float64, entropy of those shares in bits)."""
    weights = [weights] if torch.is_tensor(weights) else list(weights)
    frac = code_shares(torch.cat([codes_of(w, quantize) for w in weights]))
    return frac, entropy_bits(frac)


def occupancy_at_scale(x, sigma, levels):
    """Shares of the levels when x / sigma (clamped to [-1, 1]) goes to its nearest level, with
    no blocks: the occupancy a code gets at the one scale it was designed for -> (16,)."""
    return code_shares(nearest_level((x / sigma).clamp(-1, 1), levels))


def normalised_mse(w, quantize, blocksize=64, double_quant=False):
    """NMSE = mean((deq(q(w)) - w)^2) / mean(w^2): 0 is perfect, 1 is 'all zeros'."""
    err = quantize(w, blocksize=blocksize, double_quant=double_quant).dequantize() - w
    return (err.pow(2).mean() / w.pow(2).mean()).item()


def weighted_nmse(weights, quantize, blocksize=64, double_quant=False):
    """sum_k n_k NMSE_k / sum_k n_k over weights k of n_k elements: each weight's NMSE counted
    in proportion to its size."""
    total = sum(w.numel() for w in weights)
    return sum(normalised_mse(w, quantize, blocksize, double_quant) * w.numel()
               for w in weights) / total


def format_errors(weights, formats, blocksize=64):
    """NMSE of every format on every weight, plain absmax scales -> {name: {format: NMSE}}.

    ``weights`` is {name: tensor}, ``formats`` is {format: quantize}."""
    return {name: {f: normalised_mse(w, q, blocksize) for f, q in formats.items()}
            for name, w in weights.items()}


def count_orders(table, order):
    """How many rows of a ``format_errors`` table -> (order[0] strictly the lowest of all,
    the formats' errors strictly increasing in the given order)."""
    lowest = sum(e[order[0]] < min(e[f] for f in order[1:]) for e in table.values())
    ordered = sum(all(e[a] < e[b] for a, b in zip(order, order[1:])) for e in table.values())
    return lowest, ordered


def blocksize_costs(w, weights, quantize, blocksize):
    """What a block size costs and buys -> (bits/param plain, bits/param double quant, NMSE of
    w, size-weighted NMSE of ``weights``), both NMSE with double quantization."""
    bits = [quantize(w, blocksize, dq).bits_per_param for dq in (False, True)]
    return (*bits, normalised_mse(w, quantize, blocksize, True),
            weighted_nmse(weights, quantize, blocksize, True))


def block_normalised(w, blocksize=64):
    """Every element of w divided by its block's absmax -> (numel,) in [-1, 1]: the values the
    code's levels are matched against."""
    blocks = to_blocks(w, blocksize)  # (n_blocks, blocksize)
    return (blocks / blocks.abs().amax(1, keepdim=True)).reshape(-1)[: w.numel()]


def block_kurtosis(w, blocksize=64):
    """Mean over blocks of E[(x - mean)^4] / E[(x - mean)^2]^2.

    ~2.9 for 64 normal values (3 in the limit), 1.8 for uniform ones: lower for flatter blocks,
    higher for heavy tails."""
    blocks = to_blocks(w, blocksize)
    centred = blocks - blocks.mean(1, keepdim=True)  # (n_blocks, blocksize)
    return (centred.pow(4).mean(1) / centred.pow(2).mean(1).pow(2)).mean().item()


def per_block_mse(w, quantize, quant_blocksize, view_blocksize=64):
    """Squared error of w quantized with blocks of ``quant_blocksize``, averaged over blocks of
    ``view_blocksize`` -> (numel / view_blocksize,): the same view for any quantization block, so
    one global absmax and blocks of 64 can be compared block by block."""
    err = (quantize(w, blocksize=quant_blocksize, double_quant=False).dequantize() - w).pow(2)
    return err.reshape(-1, view_blocksize).mean(1)


def outlier_errors(w, where, quantize, quant_blocksize, view_blocksize=64, zero_code=NF4_ZERO):
    """Where one outlier w[where] of a 1-D w costs: -> (per_block_mse, the MSE of the
    view block holding it, the mean MSE of the other view blocks, share of elements stored as
    ``zero_code``, the code of level 0). The last is what a large absmax does to its small
    neighbours: x / absmax rounds to 0."""
    mse = per_block_mse(w, quantize, quant_blocksize, view_blocksize)  # (n_view_blocks,)
    hit = where // view_blocksize
    others = torch.cat([mse[:hit], mse[hit + 1:]])
    zeroed = (codes_of(w, quantize, quant_blocksize) == zero_code).double().mean().item()
    return mse, mse[hit].item(), others.mean().item(), zeroed


def scale_errors(q, w, blocksize=64):
    """|stored scale_b - absmax_b| / absmax_b per block of w -> (n_blocks,): 0 for plain
    float32 scales, the 8-bit code's relative error under double quantization."""
    exact = to_blocks(w, blocksize).abs().amax(1)  # (n_blocks,) the true absmax
    return (q.block_scales() - exact).abs() / exact


def row_split_errors(w, small, quantize, double_quant, blocksize=64):
    """Errors of a 2-D weight w for the rows the boolean mask ``small`` (out,) selects and for
    the others -> {"bits": bits per param, "small": (max scale error, NMSE), "large": same}.

    The scale error of a block is |stored scale - absmax| / absmax (``scale_errors``), its
    maximum taken over the blocks of those rows; NMSE is the rows' mean squared error over their
    mean square. Blocks must not cross rows (the row length a multiple of ``blocksize``)."""
    if w.dim() != 2 or w.shape[1] % blocksize:
        raise ValueError(f"row_split_errors needs a 2-D weight whose rows are whole blocks of "
                         f"{blocksize}; got shape {tuple(w.shape)}")
    q = quantize(w, blocksize=blocksize, double_quant=double_quant)
    scale_err = scale_errors(q, w, blocksize)  # (n_blocks,)
    sq_err = (q.dequantize() - w).pow(2)       # (out, in)
    found = {"bits": q.bits_per_param}
    for kind, rows in (("small", small), ("large", ~small)):
        blocks = rows.repeat_interleave(w.shape[1] // blocksize)  # (n_blocks,), row-major
        nmse = (sq_err[rows].mean() / w[rows].pow(2).mean()).item()
        found[kind] = (scale_err[blocks].max().item(), nmse)
    return found


def shrunk_rows_errors(quantize, rows=512, cols=512, shrink=1e-3, seed=0):
    """Every other row of a N(0, 1) weight multiplied by ``shrink``: ``row_split_errors`` with
    and without double quantization -> {"double quant": ..., "plain float32 scales": ...}.

    The small rows' scales sit far below the step of the 8-bit code that the large rows'
    scales set, which is where double quantization fails."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    small = torch.arange(rows) % 2 == 1
    w[small] *= shrink
    return {label: row_split_errors(w, small, quantize, dq)
            for label, dq in (("double quant", True), ("plain float32 scales", False))}
