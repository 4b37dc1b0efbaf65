"""Per-row adapters: MixedLoRAFunction's hand-derived backward (gradcheck, finite differences,
autograd), and mixed_adapters on a GPT, row for row equal to each row run alone, in the forward
and in the gradients, with bad input refused before anything changes."""
import copy

import pytest
import torch

from lora import (add_adapter, apply_lora, disable_adapters, merge_lora, mixed_adapters,
                  prepare_qlora, set_active_adapters, unmerge_lora)
from lora.many.mixed import stacked_factors
from lora.many.mixed_function import MixedLoRAFunction, mixed_delta_autograd
from tiny_gpt.util.finite_differences import central_differences
from conftest import small_gpt

FD_TOL = 1e-7   # float64 central differences, eps = 1e-6 (see test_lora_function.py)
ROW_TOL = 1e-5  # float32, relative to the largest |logit|: the bound for row equality


def factors(n=3, R=3, n_in=4, n_out=5, N=6, T=2, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, n_in, generator=gen, dtype=dtype, requires_grad=True)
    A = torch.randn(n, R, n_in, generator=gen, dtype=dtype, requires_grad=True)
    B = torch.randn(n, n_out, R, generator=gen, dtype=dtype, requires_grad=True)
    s = torch.tensor([0.5, 2.0, 1.5][:n], dtype=dtype)
    rows = torch.tensor([2, 0, 2, 1, 0, 2][:N])
    return x, A, B, s, rows


def mask_like(x, p=0.5, seed=1):
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)) >= p
    return keep.to(x.dtype) / (1 - p)


@pytest.mark.parametrize("dropout", [False, True])
def test_gradcheck(dropout):
    x, A, B, s, rows = factors()
    mask = mask_like(x) if dropout else None
    fn = lambda x, A, B: MixedLoRAFunction.apply(x, A, B, s, rows, mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, A, B), eps=1e-6, atol=FD_TOL)


def test_central_differences_by_hand():
    x, A, B, s, rows = factors()
    mask = mask_like(x)
    G = torch.randn(x.shape[0], x.shape[1], B.shape[1], dtype=torch.float64)
    loss = lambda: (G * MixedLoRAFunction.apply(x, A, B, s, rows, mask)).sum()  # noqa: E731
    loss().backward()
    for t in (x, A, B):
        assert torch.allclose(t.grad, central_differences(loss, t), atol=FD_TOL, rtol=0)


def test_equals_autograd_reference_and_unused_adapter_gets_zero():
    """Adapter 1 is used by no row here: its gradient must be exactly zero (own rows only)."""
    x, A, B, s, _ = factors()
    rows = torch.tensor([2, 0, 2, 0, 0, 2])
    G = torch.randn(6, 2, 5, dtype=torch.float64)
    (G * MixedLoRAFunction.apply(x, A, B, s, rows)).sum().backward()
    ours = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None
    (G * mixed_delta_autograd(x, A, B, s, rows)).sum().backward()
    for mine, ref in zip(ours, (x.grad, A.grad, B.grad)):
        assert torch.allclose(mine, ref, atol=1e-12, rtol=0)
    assert ours[1][1].abs().max() == 0 and ours[2][1].abs().max() == 0


def test_padded_rank_is_exact_and_its_padding_gets_no_gradient():
    """A rank-2 adapter padded to R = 4 gives the rank-2 product, and the padded rows of A /
    columns of B get zero gradient, so training never moves them off zero."""
    torch.manual_seed(0)
    model = apply_lora(small_gpt(), r=2, alpha=4)
    add_adapter(model, "wide", r=4, alpha=4)
    layer = model.blocks[0].attn.q_proj
    torch.nn.init.normal_(layer.adapters["default"].lora_B)
    A, B, s = stacked_factors([layer.adapters["default"], layer.adapters["wide"]])
    assert A.shape == (2, 4, layer.in_features) and B.shape == (2, layer.out_features, 4)
    assert torch.equal(s, torch.tensor([2.0, 1.0]))
    x = torch.randn(3, 5, layer.in_features)
    with mixed_adapters(model, ["default", "wide", "default"]):
        y = layer(x)
    expected = layer.base(x) + layer.adapters["default"](x)
    assert torch.allclose(y[[0, 2]], expected[[0, 2]], atol=1e-6)
    A, B, s = stacked_factors([layer.adapters["default"], layer.adapters["wide"]])
    A.retain_grad(), B.retain_grad()
    MixedLoRAFunction.apply(x, A, B, s, torch.tensor([0, 1, 0])).sum().backward()
    assert A.grad[0, 2:].abs().max() == 0 and B.grad[0, :, 2:].abs().max() == 0
    assert A.grad[0, :2].abs().max() > 0 and B.grad[0, :, :2].abs().max() > 0


RANKS = {"a": (2, 4.0), "b": (4, 2.0), "c": (8, 16.0), "d": (3, 3.0), "e": (1, 1.0),
         "f": (6, 12.0), "g": (5, 5.0), "h": (8, 4.0)}


def many_adapters(k, quantized=False, targets=("q_proj", "v_proj")):
    """A tiny GPT with k adapters of different ranks and alphas, all with nonzero B."""
    torch.manual_seed(0)
    model = small_gpt()
    if quantized:
        model = prepare_qlora(model, targets=targets, r=2, alpha=4)
    names = list(RANKS)[:k]
    for name in names:
        r, alpha = RANKS[name]
        add_adapter(model, name, targets=targets, r=r, alpha=alpha)
    for p_name, p in model.named_parameters():
        if "lora_B" in p_name:
            torch.nn.init.normal_(p, std=0.3)
    return model.eval(), names


def row_alone(model, row, name):
    if name is None:
        with disable_adapters(model):
            return model(row)[0]
    set_active_adapters(model, name)
    return model(row)[0]


def row_names(names, n_rows=10):
    """Each adapter at least once, and base rows among them."""
    return [None if b % 4 == 3 else names[b % len(names)] for b in range(n_rows)]


@pytest.mark.parametrize("k", [2, 5, 8])
@pytest.mark.parametrize("way", ["gathered", "grouped"])
def test_each_row_equals_that_row_run_alone(k, way):
    model, names = many_adapters(k)
    rows = row_names(names)
    idx = torch.randint(0, 96, (len(rows), 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with mixed_adapters(model, rows, way):
            mixed = model(idx)[0]
        alone = torch.cat([row_alone(model, idx[b:b + 1], n) for b, n in enumerate(rows)])
    rel = (mixed - alone).abs().max() / alone.abs().max()
    assert rel <= ROW_TOL
    assert (alone[0] - alone[1]).abs().max() > 1e-2  # the adapters really differ


def test_adapter_missing_on_a_layer_is_the_base_there():
    """An adapter on q_proj only: on v_proj its rows see the base layer, as with
    set_active_adapters."""
    model, names = many_adapters(2)
    add_adapter(model, "q_only", targets=("q_proj",), r=2, alpha=2)
    for p_name, p in model.named_parameters():
        if "q_only.lora_B" in p_name:
            torch.nn.init.normal_(p)
    rows = ["q_only", "a", None, "q_only"]
    idx = torch.randint(0, 96, (4, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), mixed_adapters(model, rows):
        mixed = model(idx)[0]
    with torch.no_grad():
        alone = torch.cat([row_alone(model, idx[b:b + 1], n) for b, n in enumerate(rows)])
    assert (mixed - alone).abs().max() / alone.abs().max() <= ROW_TOL


def test_4bit_base_rows_equal_alone():
    model, names = many_adapters(3, quantized=True)
    rows = row_names(names, 6)
    idx = torch.randint(0, 96, (6, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with mixed_adapters(model, rows):
            mixed = model(idx)[0]
        alone = torch.cat([row_alone(model, idx[b:b + 1], n) for b, n in enumerate(rows)])
    assert (mixed - alone).abs().max() / alone.abs().max() <= ROW_TOL


@pytest.mark.parametrize("way", ["gathered", "grouped"])
def test_gradients_equal_those_of_separate_runs(way):
    """L = sum over rows of each row's loss: each adapter's gradient from one mixed batch is
    the sum of its rows' gradients run alone, and an adapter no row uses gets none."""
    model, names = many_adapters(4)
    model.train()
    rows = ["a", "b", None, "a", "c", "b"]
    idx = torch.randint(0, 96, (6, 8), generator=torch.Generator().manual_seed(4))
    targets = torch.randint(0, 96, (6, 8), generator=torch.Generator().manual_seed(5))
    lora_params = {n: p for n, p in model.named_parameters() if ".adapters." in n}
    for p in lora_params.values():
        p.requires_grad_(True)

    def row_loss(logits, b):
        return torch.nn.functional.cross_entropy(logits[0], targets[b], reduction="sum")

    with mixed_adapters(model, rows, way):
        logits = model(idx)[0]
    sum(row_loss(logits[b:b + 1], b) for b in range(6)).backward()
    mixed = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for n, p in lora_params.items()}
    model.zero_grad(set_to_none=True)
    for b, name in enumerate(rows):
        if name is not None:  # a base row reaches no adapter: it has no gradient to give
            row_loss(row_alone(model, idx[b:b + 1], name), b).backward()
    for n, p in lora_params.items():
        separate = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.allclose(mixed[n], separate, atol=1e-5, rtol=1e-4), n
    assert all(mixed[n].abs().max() == 0 for n in lora_params if ".adapters.d." in n)
    assert any(mixed[n].abs().max() > 0 for n in lora_params if ".adapters.c." in n)


def test_dropout_uses_each_rows_own_p():
    """In training, rows of an adapter with dropout 0 are deterministic; rows of one with
    dropout 0.5 change from call to call, and match eval mode on average only."""
    torch.manual_seed(0)
    model = apply_lora(small_gpt(), r=4, alpha=8, dropout=0.0)
    add_adapter(model, "wet", r=4, alpha=8, dropout=0.5)
    for p_name, p in model.named_parameters():
        if "lora_B" in p_name:
            torch.nn.init.normal_(p)
    model.train()
    idx = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), mixed_adapters(model, ["default", "wet"]):
        one, two = model(idx)[0], model(idx)[0]
    assert torch.equal(one[0], two[0])
    assert (one[1] - two[1]).abs().max() > 1e-3


def test_bad_names_are_refused_before_anything_changes():
    model, names = many_adapters(2)
    for bad, kind in ((["a", "nope"], ValueError), ("a", ValueError), ([], ValueError),
                      ([1, "a"], ValueError)):
        with pytest.raises(kind):
            with mixed_adapters(model, bad):
                pass
    with pytest.raises(ValueError, match="way must be"):
        with mixed_adapters(model, ["a"], way="fast"):
            pass
    assert all(m.row_plan is None for m in model.modules() if hasattr(m, "row_plan"))


def test_wrong_row_count_nesting_merge_and_exit_by_exception():
    model, names = many_adapters(2)
    idx = torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="2 names, one per row, but the batch has 3"):
        with mixed_adapters(model, ["a", "b"]):
            model(idx)
    with mixed_adapters(model, ["a", "b", None]):
        with pytest.raises(RuntimeError, match="do not nest"):
            with mixed_adapters(model, ["a", "b", None]):
                pass
        with pytest.raises(RuntimeError, match="mixed_adapters"):
            merge_lora(model)
    set_active_adapters(model, "a")
    merge_lora(model)
    with pytest.raises(RuntimeError, match="merged"):
        with mixed_adapters(model, ["a"]):
            pass
    unmerge_lora(model)
    before = copy.deepcopy(model)
    with pytest.raises(KeyError):
        with mixed_adapters(model, ["a", "b", None]):
            raise KeyError("boom")
    assert all(m.row_plan is None for m in model.modules() if hasattr(m, "row_plan"))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], before(idx)[0])  # active adapter "a" back in use
