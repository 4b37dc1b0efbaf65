"""tiny_gpt.stability: a run's outcome from its losses, drift at a validation, logs read back."""
import copy
import json

import pytest
import torch

from tiny_gpt.evaluate import logits_of, measure_drift, task_loss
from lora import apply_lora, lora_layers
from lora.params import base_logits
from tiny_gpt.stability import (DriftProbe, logged_losses, outcome, outcome_counts, run_gaps,
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


def test_drift_probe_tracks_step_0_before_training_then_every_validation(small_model):
    """track measures the untouched model at step 0, then whatever fit's validations return,
    keyed (metric, step)."""
    val_ids = torch.randint(0, 96, (4000,), generator=torch.Generator().manual_seed(0))
    examples = [('upper "ab" -> "', 'AB"\n')]
    model = copy.deepcopy(small_model)
    probe = DriftProbe(logits_of(small_model.eval()), val_ids, (1, 4, 16), examples)

    def fit(evaluate):  # stands in for training: a change, then one validation at step 5
        with torch.no_grad():
            model.ln_f.weight.mul_(3.0)
        return type("Result", (), {"evals": [(5, evaluate(model))]})
    found = probe.track(model, fit)
    assert sorted({step for _, step in found}) == [0, 5]
    assert found["kl", 0] == pytest.approx(0.0, abs=1e-6) and found["kl", 5] > 1e-3
    assert found["pretrain_loss", 5] == pytest.approx(probe(model)["pretrain_loss"])


def test_run_gaps_against_the_reference_run():
    w = [torch.ones(2)]
    runs = {"a": (torch.tensor([3.0, 2.0]), w),
            "a again": (torch.tensor([3.0, 2.0]), [w[0].clone()]),
            "b": (torch.tensor([3.5, 1.0]), [torch.zeros(2)])}  # differences +0.5 and -1
    assert run_gaps(runs, "a") == {"a again": (0.0, True), "b": (1.0, False)}
    with pytest.raises(ValueError, match="equal length"):
        run_gaps({**runs, "short": (torch.tensor([3.0]), w)}, "a")


def test_base_logits_is_the_lora_model_with_its_adapters_off(small_model):
    idx = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    model = apply_lora(copy.deepcopy(small_model), ["q_proj", "v_proj"], r=2).eval()
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(1))
        assert torch.equal(base_logits(model)(idx), small_model.eval()(idx)[0])
        assert not torch.equal(model(idx)[0], small_model(idx)[0])  # adapters back on
