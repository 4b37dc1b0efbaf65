"""Fine-tuning on a task: the training loop fed with task batches and scored on the task.

Whatever is trainable in the model is trained -- every weight for full fine-tuning, only the
adapter factors after ``lora.apply_lora`` -- so LoRA, QLoRA, full fine-tuning and the other
methods are all compared through this one function, with the same data and step budget.
"""
import torch

from .model import masked_cross_entropy
from .tasks import exact_match, make_batch, sample_batch
from .train import TrainConfig, train


@torch.no_grad()
def task_loss(model, examples, batch_size=256) -> float:
    """Mean cross-entropy over the answer tokens of all examples."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        x, y, mask = make_batch(examples[i:i + batch_size])
        logits, _ = model(x.to(device))
        total += masked_cross_entropy(logits, y.to(device), mask.to(device), "sum").item()
        count += int(mask.sum())
    return total / count


def finetune(model, splits: dict, cfg: TrainConfig, batch_size: int = 32, device="auto",
             with_accuracy: bool = False):
    """Train on splits['train']; validate on splits['val'] every cfg.eval_every steps (answer
    loss, and exact match when with_accuracy). Returns the TrainResult."""

    def batch(gen):
        return sample_batch(splits["train"], batch_size, gen)

    def evaluate(m):
        metrics = {"val_loss": task_loss(m, splits["val"])}
        if with_accuracy:
            metrics["val_acc"] = exact_match(m, splits["val"], next(m.parameters()).device)
        return metrics

    return train(model, batch, cfg, evaluate, device=device)
