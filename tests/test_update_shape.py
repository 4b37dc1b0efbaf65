"""Lesson 04's part 4 (lessons/update_shape.py) puts the right matrices into each table: the
A rows from the A factors, the dW rows from the dW factors, the second seed where the table says
"2 seeds", and the amplification of block LAYER over every seed."""
import torch

from lessons import update_shape
from lora.analysis import amplification_norms, phi_corners

RS, RL, N = 2, 4, 16


def fake_factors(r, seed):
    """{layer path: (A (r, N), dW (N, N), W0 (N, N))}, a different draw per (r, seed)."""
    g = torch.Generator().manual_seed(100 * seed + r)
    out = {}
    for block in (0, update_shape.LAYER):
        for proj in update_shape.QV:
            a, b = torch.randn(r, N, generator=g), torch.randn(N, r, generator=g)
            out[f"blocks.{block}.attn.{proj}"] = (a, b @ a, torch.randn(N, N, generator=g))
    return out


def test_similarity_rows_read_a_then_dw_of_small_large_and_second_seed(capsys):
    rows, grids = update_shape.similarity_table(fake_factors, (RS, RL), (0, 1), steps=3)
    small, large, seed = fake_factors(RS, 0), fake_factors(RL, 0), fake_factors(RS, 1)
    for row, path in zip(rows, small):
        _, on_a = phi_corners(small[path][0], large[path][0], seed[path][0], RS, RL)
        _, on_dw = phi_corners(small[path][1], large[path][1], seed[path][1], RS, RL)
        assert row == [path.removeprefix("blocks."), *on_a, *on_dw]
        assert len(grids[path]) == 4 and grids[path][0].shape == (RS, RL)
    assert "4a. Subspace similarity" in capsys.readouterr().out


def test_amplification_is_block_layers_over_every_seed(capsys):
    amps = update_shape.amplification_table(fake_factors, (RS, RL), [0, 1, 2], "budget")
    assert set(amps) == {(p, r) for p in update_shape.QV for r in (RS, RL)}
    path = f"blocks.{update_shape.LAYER}.attn.v_proj"
    expected = [amplification_norms(*fake_factors(RL, s)[path][1:], RL)["amp"] for s in (0, 1, 2)]
    assert amps["v_proj", RL].values == tuple(expected)
    assert "4b. What dW amplifies" in capsys.readouterr().out
