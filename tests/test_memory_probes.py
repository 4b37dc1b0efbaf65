"""tiny_gpt.memory.probes: gradients of one step, their gaps, backward's warnings and errors."""
import copy
import math

import pytest
import torch

from tiny_gpt.memory.checkpointing import checkpoint_submodules
from tiny_gpt.memory.ledger import SavedTensorMeter
from tiny_gpt.memory.probes import (backward_outcome, block_saved_bytes, fresh_gradients,
                                    grad_norm, idle_sgd, max_abs_diff,
                                    max_rel_diff)


CPU = torch.device("cpu")


def batch(seed=0, n=4, t=16):
    tokens = torch.randint(0, 96, (n, t + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:], None


def test_fresh_gradients_are_one_steps_own_and_leave_none_behind(small_model):
    x, y, _ = batch()
    small_model.zero_grad()
    small_model(x, y)[1].backward()  # a stale gradient that must not be added in
    loss, grads = fresh_gradients(small_model, [batch()], CPU)
    assert all(p.grad is None for p in small_model.parameters())
    twin = copy.deepcopy(small_model)
    want = twin(x, y)[1]
    want.backward()
    assert loss == pytest.approx(want.item(), rel=1e-6)
    for name, p in twin.named_parameters():
        torch.testing.assert_close(grads[name], p.grad)


def test_micro_batches_give_one_batch_gradients_and_names_drop_wrappers(small_model):
    whole = fresh_gradients(small_model, [batch(n=4)], CPU)[1]
    x, y, _ = batch(n=4)
    micro = [(x[i::2], y[i::2], None) for i in range(2)]
    wrapped = copy.deepcopy(small_model)
    checkpoint_submodules(wrapped, ["blocks.0"], impl="manual")
    assert any(".module." in n for n, _ in wrapped.named_parameters())
    parts = fresh_gradients(wrapped, micro, CPU)[1]
    assert parts.keys() == whole.keys()  # ".module." dropped from the checkpointed block
    assert max_abs_diff(parts, whole) < 1e-6  # float32 sums in another order


def test_max_abs_diff_is_the_largest_gap_and_refuses_other_names():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([1.0, 2.5]), "b": torch.tensor([-0.75])}
    assert max_abs_diff(a, b) == 0.75
    assert max_rel_diff(a, b) == 1.0  # b: 0.75 / 0.75; w: 0.5 / 2.5 = 0.2
    zero = {"A": torch.zeros(3), "w": torch.tensor([2.0])}
    assert max_rel_diff(zero, zero) == 0.0  # a zero reference matched exactly: no gap
    assert max_rel_diff({"A": torch.tensor([0.0, 1e-9, 0.0]), "w": zero["w"]}, zero) == math.inf
    with pytest.raises(ValueError, match="only in the first"):
        max_abs_diff(a, {"w": a["w"]})


def test_backward_outcome_reports_the_error_of_a_loss_without_graph(small_model):
    x, y, _ = batch()
    caught, error = backward_outcome(small_model, x, y)
    assert error is None and small_model.ln_f.weight.grad is not None
    frozen = copy.deepcopy(small_model).requires_grad_(False)
    assert "does not require grad" in backward_outcome(frozen, x, y)[1]


def test_grad_norm_counts_missing_gradients():
    a, b, c = (torch.zeros(2, requires_grad=True) for _ in range(3))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    assert grad_norm([a, b, c]) == (1, 5.0)


def test_block_saved_bytes_is_what_the_first_block_saves(small_model):
    x = batch()[0]
    got = block_saved_bytes(small_model, x)
    h = small_model.tok_emb(x) + small_model.pos_emb(torch.arange(x.shape[1]))
    with SavedTensorMeter(small_model) as whole:  # both graphs kept alive: a freed one's
        outputs = [small_model.blocks[i](h) for i in (0, 1)]  # memory could be reused and its
    assert 0 < got and got * 1.5 < whole.bytes  # storages counted once. Two blocks save ~2x
    del outputs


def test_idle_sgd_steps_but_does_not_move_the_weights(small_model):
    opt = idle_sgd(small_model)
    before = copy.deepcopy(small_model.state_dict())
    x, y, _ = batch()
    small_model(x, y)[1].backward()
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in small_model.state_dict().items())
    assert len(opt.state) == len(list(small_model.parameters()))  # momentum buffers made
