"""Reading a fine-tuning run: did it learn, diverge or never start; how far did it drift from the
base; does the same seed give the same run.

Lesson 09 measures its recipes with these; each is a plain function of losses, models or logs:

- ``outcome`` / ``outcome_counts``: a run's fate from its loss curve, and the fates of a recipe's
  runs over the seeds in a few words ("learned x2, diverged x1");
- ``DriftProbe``: at each validation, the task's validation loss, KL(base || tuned) and the
  tuned model's loss on the pretraining text (tiny_gpt.evaluate.measure_drift); its ``track``
  follows them over a whole fine-tune, from step 0;
- ``logged_losses`` / ``same_tensors`` / ``run_gaps``: a run's loss curve read back from its
  JSON-lines log, whether two runs ended with bit-identical weights, and how far other runs
  are from a reference run.
"""
import json
import math

import torch

from .evaluate import logits_of, measure_drift, task_loss

LEARNED = 0.1  # a run "learned" when its end is below this fraction of its first loss


def outcome(losses, end, learned=LEARNED):
    """How a run went, from its losses and ``end``, the level it ended at (a mean of its last
    steps, so that one noisy step does not decide):

    - "diverged (nan)":  end is nan;
    - "learned":         end < learned x losses[0];
    - "diverged":        some loss got below learned x losses[0], and the end lost it again;
    - "never learned":   no loss ever got there."""
    if math.isnan(end):
        return "diverged (nan)"
    goal = learned * losses[0]
    if end < goal:
        return "learned"
    return "diverged" if min(losses) < goal else "never learned"


def outcome_counts(found):
    """["learned", "diverged", "learned"] -> "learned x2, diverged x1", in order of first
    appearance."""
    return ", ".join(f"{o} x{found.count(o)}" for o in dict.fromkeys(found))


class DriftProbe:
    """evaluate(model) -> {"val_loss", "kl", "pretrain_loss"} for a fine-tune of ``base_fn``:

        val_loss       = task_loss(model, val_examples)          the task, on validation data
        kl             = mean_t KL(p_base || p_tuned)             on fixed pretraining windows
        pretrain_loss  = the tuned model's next-token loss there  (forgetting, against the base)

    ``base_fn`` is the base as a logits callable (tiny_gpt.evaluate.logits_of, or the same model
    with its adapters disabled); ``windows`` = (batches, windows per batch, window length)."""

    def __init__(self, base_fn, val_ids, windows, val_examples, device="cpu"):
        self.base_fn, self.val_ids, self.val_examples = base_fn, val_ids, val_examples
        self.n_batches, self.batch_size, self.seq_len = windows
        self.device = device

    def __call__(self, model):
        d = measure_drift(self.base_fn, logits_of(model), self.val_ids, self.seq_len,
                          self.n_batches, self.batch_size, device=self.device)
        return {"val_loss": task_loss(model, self.val_examples), "kl": d["kl"],
                "pretrain_loss": d["tuned_loss"]}

    def track(self, model, fit):
        """{(metric, step): value} over a fine-tune: the probe at step 0, before any update, then
        at every validation of ``fit(evaluate)`` (which trains ``model``, calling evaluate every
        eval_every steps, and returns a TrainResult whose ``evals`` are [(step, metrics)])."""
        model.to(self.device).eval()
        with torch.no_grad():
            start = self(model)
        evals = [(0, start)] + fit(self).evals
        return {(key, step): value for step, metrics in evals for key, value in metrics.items()}


def logged_losses(path):
    """The "loss" of every record of a JSON-lines training log (tiny_gpt.train's log_path)
    -> (records,) float32 tensor, in the order they were written."""
    with open(path, encoding="utf-8") as log:
        return torch.tensor([json.loads(line)["loss"] for line in log])


def same_tensors(a, b):
    """Whether two lists of tensors are identical, element for element (torch.equal: same
    shapes, same values)."""
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def run_gaps(runs, reference):
    """{label: (loss curve, weights)} -> {other label: (max_t |loss_t - reference loss_t|,
    weights identical to the reference's)} for every run but the reference. Same seed, same
    run: (0.0, True); curves of different lengths are an error, not a gap."""
    ref_curve, ref_weights = runs[reference]
    gaps = {}
    for label, (curve, weights) in runs.items():
        if label == reference:
            continue
        if len(curve) != len(ref_curve):
            raise ValueError(f"run {label!r} logged {len(curve)} losses and {reference!r} "
                             f"{len(ref_curve)}: only runs of equal length compare step by step")
        gaps[label] = ((curve - ref_curve).abs().max().item(), same_tensors(weights, ref_weights))
    return gaps
