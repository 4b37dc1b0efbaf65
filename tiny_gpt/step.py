"""One training step (tiny_gpt/train.py's train() runs it step after step).

Gradient accumulation, done right. Each micro-batch i has n_i loss tokens (answer tokens differ
in number from batch to batch). The big-batch loss is  L = sum_i S_i / sum_i n_i,  where S_i is
micro-batch i's summed token loss. Averaging per micro-batch, (1/k) sum_i S_i / n_i, weights the
tokens of short micro-batches more and gives a different gradient. So every micro-batch's
backward here is of S_i / N with N = sum_i n_i counted up front, and the accumulated gradient is
exactly the big batch's.

Then the gradient's global norm is clipped, the learning rate set by the schedule (warmup,
then cosine), and the optimizer steps over the parameters that require grad (frozen ones get no
state). In fp16 a loss scaler scales the loss before backward, the gradients back after (lesson 08).
"""
import math

import torch

from .model import masked_cross_entropy
from .parallel.data_parallel import global_sum, sync_unless_last, world_size
from .util.torch_compat import autocast


def lr_at(step: int, cfg) -> float:
    """Linear warmup over warmup_steps, then cosine from lr down to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return autocast(device.type, enabled=False)
    if precision == "bf16":
        return autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("fp16 training needs a CUDA device (it relies on a gradient "
                             "scaler); on CPU use precision='bf16' or 'fp32'")
        return autocast("cuda", dtype=torch.float16)
    raise ValueError(f"unknown precision {precision!r}; use 'fp32', 'bf16' or 'fp16'")


def count_loss_tokens(micro_batches) -> int:
    """N = sum_i n_i: the loss tokens of all micro-batches [(x, y, mask or None), ...] (the
    mask's ones, else every target; a batch without targets counts 1, for custom losses)."""
    return sum(int(m.sum()) if m is not None else (1 if y is None else y.numel())
               for _, y, m in micro_batches)


def to_device(tensors, device):
    """The tensors of a micro-batch on `device` (None stays None)."""
    return [None if t is None else t.to(device) for t in tensors]


def micro_batch_loss(model, x, y, mask, total_tokens):
    """S_i / N: micro-batch i's summed token loss over the loss tokens of the whole step, so
    that the micro-batches' gradients add up to the big batch's (see the module docstring)."""
    logits, _ = model(x)
    return masked_cross_entropy(logits, y, mask, reduction="sum") / total_tokens


def accumulate_gradients(model, micro_batches, device, precision="fp32", scaler=None):
    """Forward/backward over micro-batches [(x, y, mask), ...] so that the summed gradient
    equals that of one batch holding all of them. Returns (mean token loss, token count).

    Under DistributedDataParallel each rank holds its share of the batch: N is then summed
    over the ranks too, each rank's loss is multiplied by W to undo DDP's average over ranks,
    and only the last micro-batch's backward all-reduces (tiny_gpt/parallel/data_parallel.py).
    """
    total_tokens = int(global_sum(count_loss_tokens(micro_batches), model))
    if total_tokens == 0:  # S / N would be 0 / 0: nan loss, nan weights
        raise ValueError(f"the {len(micro_batches)} micro-batch(es) of this step hold no loss "
                         "token (every loss mask is all zeros); get_batch must give each step "
                         "at least one token with mask 1")
    ranks = world_size(model)
    mean_loss = 0.0
    for i, batch in enumerate(micro_batches):
        x, y, mask = to_device(batch, device)
        with sync_unless_last(model, i == len(micro_batches) - 1):
            with autocast_context(device, precision):
                loss = micro_batch_loss(model, x, y, mask, total_tokens) * ranks
            (scaler.scale(loss) if scaler is not None else loss).backward()
        mean_loss += loss.item() / ranks  # the S_i / N add up to the big batch's mean loss
    return global_sum(mean_loss, model), total_tokens


def optimizer_step(model, optimizer, scaler, grad_clip):
    """After backward: unscale the gradients (when a loss scaler is given), clip their global
    norm to grad_clip (0: no clipping), step (a scaler may skip it on inf/nan), zero them."""
    params = [p for p in model.parameters() if p.requires_grad]
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
