"""tiny_gpt.stability: a run's outcome from its losses, drift at a validation, logs read back."""
import copy
import json

import pytest
import torch

from tiny_gpt.evaluate import logits_of, measure_drift, task_loss
from tiny_gpt.stability import (DriftProbe, logged_losses, outcome, outcome_counts,
                                same_tensors)


@pytest.mark.parametrize("losses, end, want", [
    ([5.0, 2.0, 0.4, 0.3], 0.3, "learned"),          # 0.3 < 0.1 x 5
    ([5.0, 0.3, 3.0, 4.0], 4.0, "diverged"),         # got below 0.5, then lost it
    ([5.0, 4.0, 3.0, 2.0], 2.0, "never learned"),    # never below 0.5
    ([5.0, 0.3, float("nan")], float("nan"), "diverged (nan)"),
    ([5.0, 0.5, 0.5], 0.5, "never learned"),         # exactly a tenth is not below it
])
def test_outcome_of_hand_made_curves(losses, end, want):
    assert outcome(losses, end) == want


def test_outcome_uses_the_given_end_not_the_last_loss():
    # the last step dips below the goal, the run's end (a tail mean) does not
    assert outcome([5.0, 4.0, 0.4], end=2.0) == "diverged"
    assert outcome([5.0, 4.0, 0.6], end=0.2) == "learned"


def test_outcome_counts_in_order_of_first_appearance():
    assert outcome_counts(["diverged", "learned", "diverged"]) == "diverged x2, learned x1"
    assert outcome_counts(["learned"] * 3) == "learned x3"


def test_drift_probe_is_zero_kl_against_itself_and_positive_after_a_change(small_model):
    val_ids = torch.randint(0, 96, (4000,), generator=torch.Generator().manual_seed(0))
    examples = [('upper "ab" -> "', 'AB"\n')]
    probe = DriftProbe(logits_of(small_model.eval()), val_ids, (1, 4, 16), examples)
    same = probe(small_model)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6)
    assert same["val_loss"] == task_loss(small_model, examples)
    assert same["pretrain_loss"] == pytest.approx(
        measure_drift(logits_of(small_model), logits_of(small_model), val_ids, 16, 1, 4)[
            "base_loss"])
    moved = copy.deepcopy(small_model)
    with torch.no_grad():
        moved.ln_f.weight.mul_(3.0)
    found = probe(moved.eval())
    want = measure_drift(logits_of(small_model), logits_of(moved), val_ids, 16, 1, 4)
    assert found["kl"] == pytest.approx(want["kl"]) and found["kl"] > 1e-3
    assert found["pretrain_loss"] == pytest.approx(want["tuned_loss"])


def test_logged_losses_read_back_in_order(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": i, "loss": v}) + "\n"
                           for i, v in enumerate([3.5, 2.25, 1.0])))
    assert torch.equal(logged_losses(log), torch.tensor([3.5, 2.25, 1.0]))


def test_same_tensors_is_element_for_element():
    a = [torch.ones(2), torch.zeros(3)]
    assert same_tensors(a, [t.clone() for t in a])
    assert not same_tensors(a, [torch.ones(2), torch.tensor([0.0, 0.0, 1e-12])])
    assert not same_tensors(a, a[:1])
