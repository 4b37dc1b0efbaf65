"""NF4: the derived levels, block-wise quantization, packing, double quantization, bad input."""
import pytest
import torch

from quant import NF4_CODE, Quantized4bit, dequantize_nf4, quantize_nf4
from quant.blockwise import (midpoints, nearest_level, pack_nibbles, to_blocks,
                             unpack_nibbles, worst_case_error)
from quant.double_quant import DYNAMIC_MAP, SCALE_BLOCKSIZE, quantize_scales

# The NF4 table published in the QLoRA paper's appendix (Dettmers et al. 2023), identical to
# the list in bitsandbytes' `get_4bit_type("nf4")`.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# Quantization reconstructs x as level * scale in float32, with a product, a reciprocal and
# (double quant) a sum behind it: allow a few float32 ulps (~1e-6 relative) on top of a bound.
FP32_SLACK = 1e-6


def count_midpoints_below(x, mids):
    """sum_j [x > mids_j] for every value of x: the definition of the nearest level, counted
    one midpoint at a time (the oracle every faster form is held against)."""
    index = torch.zeros(x.shape, dtype=torch.uint8)
    for boundary in mids.tolist():  # float32 values: the comparison stays exact
        index += x > boundary
    return index


def block_absmax_per_element(w, blocksize):
    """Each element's block absmax, shaped like w (the scale its error is measured against)."""
    blocks = to_blocks(w, blocksize)
    per_block = blocks.abs().amax(dim=1, keepdim=True).expand_as(blocks)  # (n_blocks, blocksize)
    return per_block.reshape(-1)[: w.numel()].view(w.shape)


def test_levels_match_published_table():
    # 1e-6: the table is float32 quantiles; a different ndtri could move the last ulp (~6e-8).
    torch.testing.assert_close(NF4_CODE, torch.tensor(PUBLISHED_NF4), atol=1e-6, rtol=0)


def test_level_properties():
    assert NF4_CODE.dtype == torch.float32 and NF4_CODE.numel() == 16
    assert (NF4_CODE[1:] > NF4_CODE[:-1]).all()
    assert (NF4_CODE == 0).sum() == 1
    assert NF4_CODE.min() == -1 and NF4_CODE.max() == 1
    assert (NF4_CODE < 0).sum() == 7 and (NF4_CODE > 0).sum() == 8


def test_pack_unpack_round_trip_and_nibble_order():
    codes = torch.randint(0, 16, (1000,), generator=torch.Generator().manual_seed(0))
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 500
    assert torch.equal(unpack_nibbles(packed), codes.to(torch.uint8))
    assert pack_nibbles(torch.tensor([1, 2, 15, 0])).tolist() == [0x12, 0xF0]  # first = high


@pytest.mark.parametrize("absmax", [1.0, 0.37, 3e-3, 12.5])
def test_every_level_quantizes_to_itself(absmax):
    w = (NF4_CODE * absmax).repeat(3, 1)  # each row is one block holding every level
    q = quantize_nf4(w, blocksize=16, double_quant=False)
    assert torch.equal(unpack_nibbles(q.codes), torch.arange(16, dtype=torch.uint8).repeat(3))
    assert torch.equal(dequantize_nf4(q), w)  # same float32 product: exact


def test_binary_search_equals_counting_midpoints():
    # the reference nearest_level bisects; a tie must count as "not below", as counting does
    x = torch.cat([torch.rand(10_000) * 2 - 1, midpoints(NF4_CODE), NF4_CODE])
    assert torch.equal(nearest_level(x, NF4_CODE), count_midpoints_below(x, midpoints(NF4_CODE))
                       .int())


def awkward_values(code):
    """Values where a lookup goes wrong first: on every midpoint and one float32 step to each
    side of it, on and beside every cell edge of every grid tried, the ends, beyond the ends,
    signed zeros and the tiniest floats; plus a fine sweep of [-1, 1]."""
    mids = midpoints(code)
    edges = torch.cat([torch.arange(-h, h + 1) / h for h in (32, 64, 128, 4096)]).float()
    spots = torch.cat([mids, edges, torch.tensor([-1.0, 1.0, 0.0, -0.0, 1e-45, -1e-45])])
    up, down = torch.tensor(3.0), torch.tensor(-3.0)
    return torch.cat([spots, spots.nextafter(up), spots.nextafter(down),
                      torch.tensor([1.5, -1.5, 1e30, -1e30]), torch.linspace(-1, 1, 100_003)])


@pytest.mark.parametrize("name", ["nf4", "int4", "fp4", "nf3", "nf2"])
def test_cell_lookup_equals_counting_midpoints(name):
    from quant.baselines import FP4_CODE, INT4_CODE
    from quant.tuned import level_cells, nearest_level_by_cells
    from quant.nf4 import normal_float_levels
    code = {"nf4": NF4_CODE, "int4": INT4_CODE, "fp4": FP4_CODE,
            "nf3": normal_float_levels(3), "nf2": normal_float_levels(2)}[name]
    cells = level_cells(code)
    assert cells is not None and cells[0] == 32  # every code book here fits the first grid
    x = awkward_values(code)
    assert torch.equal(nearest_level_by_cells(x, cells), count_midpoints_below(x, midpoints(code)))


def test_cell_lookup_refines_the_grid_or_falls_back_to_counting():
    from quant.tuned import level_cells, nearest_level_by_cells
    close = torch.tensor([-1.0, 0.0, 0.01, 0.0101, 1.0])  # midpoints 0.005 and 0.01005 apart
    cells = level_cells(close)
    assert cells[0] == 128  # cells of 1/32 and 1/64 hold both midpoints, 1/128 parts them
    x = awkward_values(close)
    assert torch.equal(nearest_level_by_cells(x, cells),
                       count_midpoints_below(x, midpoints(close)))
    too_close = torch.tensor([-1.0, 0.0, 1e-6, 2e-6, 1.0])
    assert level_cells(too_close) is None  # the tuned quantizer then bisects (next test)


def test_midpoint_goes_to_lower_level_and_just_above_to_upper():
    mids = midpoints(NF4_CODE)
    above = torch.nextafter(mids, torch.tensor(2.0))
    w = torch.stack([torch.cat([mids, torch.ones(1)]),  # the 1.0 makes the block absmax 1
                     torch.cat([above, torch.ones(1)])])
    codes = unpack_nibbles(quantize_nf4(w, blocksize=16).codes).view(2, 16).long()
    assert codes[0, :15].tolist() == list(range(15))
    assert codes[1, :15].tolist() == list(range(1, 16))


@pytest.mark.parametrize("shape", [(257, 129), (3, 37), (1000,), (5,)])
def test_error_bound_without_double_quant(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    error = (dequantize_nf4(quantize_nf4(w, double_quant=False)) - w).abs()
    bound = worst_case_error(NF4_CODE) * block_absmax_per_element(w, 64)
    assert (error <= bound * (1 + FP32_SLACK)).all()


def test_error_bound_with_double_quant():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(2))
    plain, dq = quantize_nf4(w, double_quant=False), quantize_nf4(w, double_quant=True)
    assert torch.equal(plain.codes, dq.codes)  # double quant only changes the stored scales
    scale_error = (dq.block_scales() - plain.absmax).abs()  # (n_blocks,)
    per_element = scale_error[:, None].expand(-1, 64).reshape(-1)[: w.numel()].view(w.shape)
    absmax = block_absmax_per_element(w, 64)
    # |level * s_hat - x| <= |level * s - x| + |level| * |s_hat - s|, and |level| <= 1
    bound = worst_case_error(NF4_CODE) * absmax + per_element
    assert ((dequantize_nf4(dq) - w).abs() <= bound + FP32_SLACK * absmax).all()


def test_double_quant_scale_error_is_small_and_bounded():
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(3))
    scales = quantize_nf4(w, double_quant=False).absmax
    q = quantize_nf4(w, double_quant=True)
    centred = to_blocks(scales - scales.mean(), SCALE_BLOCKSIZE)  # (n_groups, 256)
    group_absmax = centred.abs().amax(dim=1).repeat_interleave(SCALE_BLOCKSIZE)[: scales.numel()]
    error = (q.block_scales() - scales).abs()
    assert (error <= worst_case_error(DYNAMIC_MAP) * group_absmax + FP32_SLACK * scales).all()
    relative = error / scales
    assert relative.mean() < 0.003 and relative.max() < 0.01  # measured ~0.0016 and ~0.008


@pytest.mark.parametrize("shape", [(300, 200), (32, 32), (129, 128)])
def test_each_block_gets_its_own_scale_back_when_the_last_group_is_padded(shape):
    """938, 16 and 258 blocks: the scale codes are padded to whole groups of 256, and the
    decoded scales must be the first `count` ones, each within the 8-bit bound of ITS block's
    true absmax (a decoder that cut the padding off in the wrong place shifts every scale by
    one block and fails here; the 512 x 512 weight above fills whole groups and cannot tell)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    scales = quantize_nf4(w, double_quant=False).absmax
    assert scales.numel() % SCALE_BLOCKSIZE != 0
    decoded = quantize_nf4(w, double_quant=True).block_scales()
    centred = to_blocks(scales - scales.mean(), SCALE_BLOCKSIZE)  # (n_groups, 256)
    group_absmax = centred.abs().amax(dim=1).repeat_interleave(SCALE_BLOCKSIZE)[: scales.numel()]
    assert decoded.shape == scales.shape
    bound = worst_case_error(DYNAMIC_MAP) * group_absmax + FP32_SLACK * scales
    assert ((decoded - scales).abs() <= bound).all()


def test_dynamic_map():
    assert DYNAMIC_MAP.numel() == 256 and (DYNAMIC_MAP[1:] > DYNAMIC_MAP[:-1]).all()
    assert DYNAMIC_MAP.max() == 1 and (DYNAMIC_MAP == 0).any()
    assert worst_case_error(DYNAMIC_MAP) == pytest.approx(0.9 / 128, rel=1e-4)  # top-decade gap


def test_bits_per_param():
    w = torch.randn(512, 512)
    assert quantize_nf4(w, double_quant=False).bits_per_param == 4.5  # 4 + 32 / 64
    assert quantize_nf4(w, double_quant=True).bits_per_param <= 4.13  # 4 + 8/64 + 32/16384 + ..


@pytest.mark.parametrize("shape", [(32, 32), (512, 512), (3, 37), (300, 200), (129, 128)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_the_storage_formula_counts_the_bytes_actually_stored(shape, double_quant):
    """storage_bytes (the formula, padding of the last block and of the last group of 256
    scale codes included) equals the bytes of the stored tensors, for weights of one block,
    one group, a partial group (32 x 32: 16 blocks, 256 codes kept) and just over a group."""
    from quant.qtensor import storage_bytes
    q = quantize_nf4(torch.randn(shape), double_quant=double_quant)
    stored = q.codes.numel() * q.codes.element_size()
    if double_quant:
        stored += sum(t.numel() * t.element_size() for t in (q.scales8.codes, q.scales8.absmax,
                                                              q.scales8.offset))
    else:
        stored += q.absmax.numel() * q.absmax.element_size()
    n = torch.Size(shape).numel()
    assert storage_bytes(n, 64, double_quant) == stored == q.nbytes
    assert q.bits_per_param == 8 * stored / n
    if shape == (32, 32) and double_quant:
        assert q.bits_per_param == 8 * (512 + 256 + 4 + 4) / 1024  # 6.06, not ~4.13


@pytest.mark.parametrize("shape", [(3, 37), (1000,), (2, 3, 50)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_partial_blocks_shapes_and_dtypes(shape, dtype):
    w = torch.randn(shape).to(dtype)
    q = quantize_nf4(w)
    n_blocks = -(-w.numel() // 64)
    assert q.codes.numel() == n_blocks * 32 and q.block_scales().numel() == n_blocks
    out = dequantize_nf4(q)
    assert out.shape == w.shape and out.dtype == dtype
    assert dequantize_nf4(q, torch.float64).dtype == torch.float64


def test_all_zero_block_stays_zero():
    w = torch.zeros(2, 64)
    w[1] = torch.randn(64)
    assert torch.equal(dequantize_nf4(quantize_nf4(w))[0], torch.zeros(64))


def test_non_finite_input_is_refused_with_count_and_position():
    w = torch.randn(8, 8)
    w[1, 2], w[5, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"2 non-finite .* nan at index \(1, 2\)"):
        quantize_nf4(w)


@pytest.mark.parametrize("blocksize", [0, -64, 63, 64.0])
def test_bad_blocksize_is_refused(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(128), blocksize=blocksize)


def test_empty_input_is_refused():
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.randn(0, 4))


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip(double_quant):
    w = torch.randn(33, 70)
    q = quantize_nf4(w, double_quant=double_quant)
    state = q.to_state_dict()
    assert all(isinstance(v, (torch.Tensor, int, str)) for v in state.values())
    restored = Quantized4bit.from_state_dict(state)
    assert torch.equal(dequantize_nf4(restored), dequantize_nf4(q))
    assert restored.nbytes == q.nbytes and restored.dtype == q.dtype


# The reference's own decision thresholds: bitsandbytes quantizes a scaled value x (x = w *
# (1 / absmax), float32) with a hard-coded binary tree, `dQuantizeNF4` in csrc/kernels.cu,
# branching on `x > t` for these 15 constants. Our midpoints are computed from our levels, so
# this holds both the levels and the tie rule against the reference implementation's code.
BNB_NF4_THRESHOLDS = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
]


def reference_nf4_code(x: float) -> int:
    """The reference's tree, walked as a binary search: 4 comparisons `x > t` from the middle
    threshold down, each taken branch setting the next bit (0b1000, 0b0100, ...)."""
    thresholds = torch.tensor(BNB_NF4_THRESHOLDS, dtype=torch.float32).tolist()
    x = torch.tensor(x, dtype=torch.float32).item()
    lo, code = 0, 0
    for bit in (8, 4, 2, 1):
        t = thresholds[lo + bit - 1]
        if x > t:
            code |= bit
            lo += bit
    return code


def test_codes_equal_the_reference_decision_tree():
    torch.manual_seed(0)
    w = torch.randn(37, 29)  # 1,073 values: 16 full blocks of 64 and a partial one
    w.view(-1)[:64] = torch.linspace(-1, 1, 64)  # block 0: absmax 1, so x = w exactly
    w.view(-1)[64:128] = torch.rand(64) * 1.8 - 0.9  # block 1: values inside (-1, 1), then
    w.view(-1)[64:79] = torch.tensor(BNB_NF4_THRESHOLDS)  # exactly the thresholds,
    w.view(-1)[79] = 1.0  # and absmax 1, so these are quantized as they are
    q = quantize_nf4(w, blocksize=64, double_quant=False)
    ours = unpack_nibbles(q.codes)[: w.numel()]
    flat = torch.cat([w.view(-1), torch.zeros(-w.numel() % 64)])  # (n_blocks * 64,)
    blocks = flat.view(-1, 64)
    scaled = blocks * (1.0 / blocks.abs().amax(dim=1, keepdim=True))  # as the reference does
    expected = [reference_nf4_code(v) for v in scaled.view(-1)[: w.numel()].tolist()]
    assert ours.tolist() == expected


def test_a_value_exactly_on_a_reference_threshold_takes_the_lower_code():
    for k, t in enumerate(BNB_NF4_THRESHOLDS):
        assert reference_nf4_code(t) == k  # the reference: `x > t` is false on the threshold
        x = torch.tensor([t, 1.0], dtype=torch.float32)  # absmax 1: x is quantized as it is
        assert unpack_nibbles(quantize_nf4(x, blocksize=2, double_quant=False).codes)[0] == k


def test_a_finite_float64_value_beyond_float32_range_is_refused():
    """Blocks are quantized in float32, where 1e39 is inf: it must not pass as 'finite'."""
    w = torch.zeros(4, 8, dtype=torch.float64)
    w[2, 3] = 1e39
    with pytest.raises(ValueError, match=r"1 non-finite .* at index \(2, 3\)"):
        quantize_nf4(w)


def test_unravel_gives_the_row_major_index():
    from quant.blockwise import unravel
    t = torch.arange(60).view(3, 4, 5)
    for flat in (0, 7, 33, 59):
        assert t[unravel(flat, t.shape)] == flat


def test_each_quantized_weight_owns_its_code_book():
    q1, q2 = quantize_nf4(torch.randn(64)), quantize_nf4(torch.randn(64))
    assert q1.code.data_ptr() != NF4_CODE.data_ptr() != q2.code.data_ptr()
    assert torch.equal(q1.code, NF4_CODE)


def allocations_during(fn):
    """Bytes of every allocation that torch's profiler sees while fn() runs, largest first."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sorted((e.self_cpu_memory_usage for e in prof.events()
                   if e.name != "[memory]" and e.self_cpu_memory_usage > 0), reverse=True)


@pytest.mark.skipif(torch.__version__ < (2, 4), reason="torch 2.1.2's profiler listed the same "
                    "call with and without its 1 MB index buffer, from run to run (2026-12-03)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_allocates_its_output_and_one_step_of_buffers_only(dtype):
    from quant.tuned import DECODE_BYTES
    w = torch.randn(8 * 2 * DECODE_BYTES // 1024, 1024)  # 8 decoding steps
    q = quantize_nf4(w)
    out_bytes = w.numel() * torch.empty((), dtype=dtype).element_size()
    sizes = allocations_during(lambda: q.dequantize(dtype))
    # the output once, at full size; the int32 indices and the float64 pairs once each, one
    # step's worth (4 and 8 bytes per packed byte), reused by every step; two decode the 8-bit
    # scales (4 bytes per block of 64 values); the rest are a few bytes. A decoder that
    # allocated per step, or made a whole-weight temporary, has more or larger allocations.
    large = [size for size in sizes if size >= 64 * 1024]
    assert large == [out_bytes, 8 * DECODE_BYTES, 4 * DECODE_BYTES] + 2 * [4 * w.numel() // 64]
    assert sum(sizes) - sum(large) <= 16 * 1024, sizes
    # and the values are those of the float32 path, rounded once
    assert torch.equal(q.dequantize(dtype), q.dequantize(torch.float32).to(dtype))


def test_dequantize_in_one_step_equals_dequantize_in_many(monkeypatch):
    """The small-weight shortcut (one step, no buffers) and the stepped loop give the same
    values, also when the last step is partial and the last block padded."""
    import quant.tuned as tuned
    q = quantize_nf4(torch.randn(301, 77))  # 23,177 values: 363 blocks, the last padded
    whole = q.dequantize(torch.float32)
    monkeypatch.setattr(tuned, "DECODE_BYTES", 32 * 5)  # 5 blocks a step: 73 steps
    assert torch.equal(q.dequantize(torch.float32), whole)


def test_quantizing_with_a_code_book_no_grid_fits_counts_the_midpoints():
    from quant.blockwise import block_absmax, reciprocal_scales
    from quant.tuned import level_cells
    from quant.qtensor import quantize_4bit
    too_close = torch.tensor([-1.0, 0.0, 1e-6, 2e-6, 1.0])
    assert level_cells(too_close) is None
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(3)) * 1e-5
    blocks = to_blocks(w, 64)
    scaled = blocks * reciprocal_scales(block_absmax(blocks))[:, None]
    expected = count_midpoints_below(scaled, midpoints(too_close)).reshape(-1)
    assert torch.equal(unpack_nibbles(quantize_4bit(w, too_close, 64, False).codes), expected)


def test_an_8bit_scale_exactly_on_a_midpoint_takes_the_lower_code_and_just_above_the_upper():
    """The tie rule of the 256-level map of the scales (double quantization) is the 4-bit
    codes' rule: a value on the midpoint of levels k and k + 1 gets k, one float32 step above
    gets k + 1. Its own test: the 8-bit codes take another path (a binary search) than the
    4-bit ones, and a search with the other tie side agrees everywhere but on the 255 ties."""
    mids = midpoints(DYNAMIC_MAP)                                   # (255,)
    above = torch.nextafter(mids, torch.tensor(2.0))
    assert nearest_level(mids, DYNAMIC_MAP).tolist() == list(range(255))
    assert nearest_level(above, DYNAMIC_MAP).tolist() == list(range(1, 256))



def test_quantize_scales_puts_a_centred_scale_on_a_midpoint_on_the_lower_code():
    """The same tie rule through quantize_scales itself, the path the stored scale codes take
    (a double quantization that ran its own search with ties going up would pass the test
    above). Scales [1, -1, t, -t] have mean exactly 0 and group absmax 1, so t reaches the
    code book unrounded: t on the midpoint of levels k and k + 1 must get code k, and t one
    float32 step above it code k + 1."""
    mids = midpoints(DYNAMIC_MAP)                                   # (255,)
    for k, mid in enumerate(mids.tolist()):
        for t, code in ((mid, k), (torch.nextafter(mids[k], torch.tensor(2.0)).item(), k + 1)):
            scales = torch.tensor([1.0, -1.0, t, -t])
            stored = quantize_scales(scales)
            assert stored.offset == 0 and torch.equal(stored.absmax, torch.ones(1))
            assert int(stored.codes[2]) == code, (k, t)

def test_a_large_weight_with_other_scales_in_every_region_stays_within_the_nf4_bound():
    """Quantization works chunk by chunk over a large weight (2^20 values here: several
    chunks); every chunk must use its own blocks' scales. Rows grow from 1e-3 to 1e2 in size,
    so a chunk quantized with another chunk's scales lands far outside the bound. Compared with
    the WEIGHT, not with another dequantization: |w - dequant| <= worst_case_error(NF4) * the
    block's absmax, plus (double quantization) the error of the block's stored scale."""
    gen = torch.Generator().manual_seed(4)
    rows = torch.logspace(-3, 2, 2048)[:, None]                     # (2048, 1)
    w = torch.randn(2048, 512, generator=gen) * rows                # 2^20 values
    absmax = block_absmax_per_element(w, 64)
    plain = quantize_nf4(w, double_quant=False)
    error = (dequantize_nf4(plain) - w).abs()
    assert (error <= worst_case_error(NF4_CODE) * absmax * (1 + FP32_SLACK)).all()
    dq = quantize_nf4(w, double_quant=True)
    scale_error = (dq.block_scales() - plain.absmax).abs()          # (n_blocks,)
    per_element = scale_error[:, None].expand(-1, 64).reshape(w.shape)
    bound = worst_case_error(NF4_CODE) * absmax + per_element
    assert ((dequantize_nf4(dq) - w).abs() <= bound + FP32_SLACK * absmax).all()
