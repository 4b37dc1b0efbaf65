"""Fine-tuning on a task: the training loop fed with task batches and scored on the task.

Whatever is trainable in the model is trained -- every weight for full fine-tuning, only the
adapter factors after ``lora.apply_lora`` -- so LoRA, QLoRA, full fine-tuning and the other
methods are all compared through this one function, with the same data and step budget. It is
the one home of task fine-tuning: the lessons call it too (lessons/common.py).
"""
from .evaluate import exact_match, task_loss
from .tasks import sample_batch
from .train import TrainConfig, train


def finetune(model, splits: dict, cfg: TrainConfig, batch_size: int = 32, device="auto",
             with_accuracy: bool = False, evaluate=None):
    """Train on batches of `batch_size` examples drawn from splits['train']; every
    cfg.eval_every steps call evaluate(model) -> metrics, by default the answer loss on
    splits['val'] (and its exact match when with_accuracy). Returns the TrainResult."""

    def batch(gen):
        return sample_batch(splits["train"], batch_size, gen)

    def validate(m):
        metrics = {"val_loss": task_loss(m, splits["val"])}
        if with_accuracy:
            metrics["val_acc"] = exact_match(m, splits["val"], next(m.parameters()).device)
        return metrics

    return train(model, batch, cfg, evaluate or validate, device=device)
