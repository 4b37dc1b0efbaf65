"""Before a long QLoRA run: a few steps on a small subset, next to the float twin.

The usual advice for "quantization compatibility issues" is to validate numeric stability on a
small subset before full training. Concretely, a 4-bit stack can go wrong in ways that a long
run only shows late: scales that were stored wrong (a layer's outputs off by a factor), a
compute dtype that overflows, a backward that returns NaN. A few steps of the QLoRA model and
of its float twin -- the same base in float, with the same adapters -- on the same batches
show each of these at once:

    loss gap          |L_4bit - L_float| / L_float per step: the 4-bit base should cost the
                      loss a few percent (NF4's error is about 0.1 of a weight's std): 1.8% and
                      5.3% on two bases pretrained by this project; scales 1.5x off give 47%.
                      The default limit, 10%, sits between the two kinds
    non-finite        any nan / inf in a loss or an adapter gradient
    gradient cosine   cos(g_4bit, g_float) of the adapter gradients per step: the two stacks
                      should push the adapters the same way (1 = the same direction)

Both models are copied first, so the caller's are left as they were; the steps are plain SGD.
"""
import copy
import math
from dataclasses import dataclass, field
from typing import List

import torch


@dataclass
class StackReport:
    """Per-step numbers of check_qlora_stack and the limits they were held to."""
    loss_4bit: List[float] = field(default_factory=list)
    loss_float: List[float] = field(default_factory=list)
    grad_cosine: List[float] = field(default_factory=list)
    non_finite: List[str] = field(default_factory=list)   # what was nan / inf, and where
    max_loss_gap: float = 0.10
    min_grad_cosine: float = 0.9

    @property
    def loss_gaps(self) -> List[float]:
        return [abs(q - f) / abs(f) for q, f in zip(self.loss_4bit, self.loss_float)]

    def problems(self) -> List[str]:
        """What is wrong with the stack, in words; empty when it is sound."""
        found = list(self.non_finite)
        gaps = [g for g in self.loss_gaps if not math.isnan(g)]
        if gaps and max(gaps) > self.max_loss_gap:
            found.append(f"the 4-bit loss is {max(gaps):.1%} away from the float twin's "
                         f"(allowed: {self.max_loss_gap:.0%})")
        cosines = [c for c in self.grad_cosine if not math.isnan(c)]
        if cosines and min(cosines) < self.min_grad_cosine:
            found.append(f"the adapter gradients point elsewhere than the float twin's: cosine "
                         f"{min(cosines):.3f} (required: >= {self.min_grad_cosine})")
        return found


def check_qlora_stack(qlora_model, float_twin, batches, lr: float = 1e-2,
                      max_loss_gap: float = 0.10, min_grad_cosine: float = 0.9,
                      raise_on_failure: bool = True) -> StackReport:
    """One SGD step per batch on copies of the QLoRA model and its float twin.

    qlora_model, float_twin: models called as model(x, y, mask) -> (logits, loss), with the
        same trainable adapters (names and values), e.g. lessons.common.lora_copy(base, seed)
        with and without quantized=True. batches: a few (x, y, mask) of the small subset.
    Raises a ValueError listing every problem when raise_on_failure (the default) and the
    stack is not sound; returns the StackReport either way otherwise.
    """
    models = [copy.deepcopy(qlora_model).train(), copy.deepcopy(float_twin).train()]
    check_same_adapters(*models)
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr)
                  for m in models]
    report = StackReport(max_loss_gap=max_loss_gap, min_grad_cosine=min_grad_cosine)
    for step, batch in enumerate(batches, start=1):
        (loss_q, grad_q), (loss_f, grad_f) = (_loss_and_gradient(m, o, batch)
                                              for m, o in zip(models, optimizers))
        report.loss_4bit.append(loss_q)
        report.loss_float.append(loss_f)
        report.grad_cosine.append(float(torch.nn.functional.cosine_similarity(
            grad_q, grad_f, dim=0)))
        for name, loss, grad in (("4-bit", loss_q, grad_q), ("float", loss_f, grad_f)):
            if not math.isfinite(loss) or not torch.isfinite(grad).all():
                report.non_finite.append(f"step {step}: the {name} model's loss or adapter "
                                         f"gradient is not finite (loss {loss})")
        for optimizer in optimizers:
            optimizer.step()
    if raise_on_failure and report.problems():
        raise ValueError("the quantized stack is not sound on the small subset: "
                         + "; ".join(report.problems()))
    return report


def check_same_adapters(model_a, model_b) -> None:
    """The two models must train the same adapter tensors, starting from the same values."""
    a = {n: p for n, p in model_a.named_parameters() if p.requires_grad}
    b = {n: p for n, p in model_b.named_parameters() if p.requires_grad}
    if a.keys() != b.keys():
        raise ValueError(f"the QLoRA model and its float twin train different parameters: "
                         f"{sorted(a.keys() ^ b.keys())[:4]}")
    differ = [n for n in a if not torch.equal(a[n].detach().cpu(), b[n].detach().cpu())]
    if differ:
        raise ValueError(f"the float twin's adapters start from other values than the QLoRA "
                         f"model's ({differ[0]}, ...): make both with the same seed")


def _loss_and_gradient(model, optimizer, batch):
    """(loss as a float, every trainable gradient flattened into one vector)."""
    optimizer.zero_grad(set_to_none=True)
    x, y, mask = (t.to(next(model.parameters()).device) for t in batch)
    _, loss = model(x, y, mask)
    loss.backward()
    grads = [p.grad.reshape(-1) for p in model.parameters()
             if p.requires_grad and p.grad is not None]
    return loss.item(), torch.cat(grads).float()
