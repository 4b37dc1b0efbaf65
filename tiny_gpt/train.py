"""The training loop's driver, around the one training step of tiny_gpt/step.py.

train() draws the micro-batches of each step with a seeded generator, runs the step, and
around it does what a run needs but the step's idea does not: validation, keeping the best
weights, early stopping, JSON-lines logs, checkpoints to resume from (with every RNG and the
optimizer and loss-scaler state, so a resumed run ends where an uninterrupted one would),
LoRA+'s parameter groups, torch.compile, and data parallelism (tiny_gpt/parallel).
"""
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .parallel.data_parallel import ddp_of
from .step import accumulate_gradients, autocast_context, lr_at, optimizer_step
from .util.progress import Progress
from .util.checks import is_number, is_whole_number
from .util.modules import is_compressed_weight
from .util.safetensors import check_writable
from .util.torch_compat import cuda_grad_scaler, dynamo_traces_function_backward


@dataclass
class TrainConfig:
    max_steps: int = 1000          # optimizer steps
    lr: float = 1e-3               # peak learning rate, reached after warmup
    min_lr_ratio: float = 0.1      # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50         # linear warmup from ~0 to lr
    schedule: str = "cosine"       # "cosine" (after warmup) or "constant"
    optimizer: str = "adamw"       # "adamw" or "sgd" (momentum 0.9)
    weight_decay: float = 0.0      # AdamW decoupled weight decay
    betas: tuple = (0.9, 0.95)     # AdamW moment decay rates
    grad_clip: float = 1.0         # max global grad norm; 0 turns clipping off
    grad_accum: int = 1            # micro-batches per optimizer step
    precision: str = "fp32"        # "fp32", "bf16" (autocast, CPU or CUDA), "fp16" (CUDA only)
    eval_every: int = 100          # steps between validations (0: never)
    patience: Optional[int] = None  # early stop after this many validations without progress
    restore_best: bool = True      # at the end, load the best validated trainable weights
    seed: int = 0                  # seeds torch and the batch generator
    log_path: Optional[str] = None   # JSON-lines log, one record per step
    ckpt_path: Optional[str] = None  # checkpoint file (safetensors)
    ckpt_every: int = 0            # steps between checkpoints (0: only at the end, if a path)
    resume: bool = False           # continue from ckpt_path if it exists
    progress: bool = True          # one-line progress display with ETA
    loraplus_lr_ratio: float = 1.0  # LoRA+ (Hayou et al. 2024): parameters named .lora_B train
                                    # at this multiple of lr (16 in the paper); 1 = plain LoRA
    compile: bool = False          # run the training steps through torch.compile (inductor);
                                   # the first step compiles (tens of seconds on a 2-core CPU)

    def __post_init__(self):
        check_config(self)


CHOICES = {"schedule": ("cosine", "constant"), "optimizer": ("adamw", "sgd"),
           "precision": ("fp32", "bf16", "fp16")}


def _real(value, low, high=math.inf, low_open=False):
    return is_number(value) and (value > low if low_open else value >= low) and value <= high


def check_config(cfg) -> None:
    """Refuse a TrainConfig that would train wrongly or not at all, naming the field."""
    rules = [("max_steps", is_whole_number(cfg.max_steps, 1), "a whole number >= 1"),
             ("lr", _real(cfg.lr, 0, low_open=True) and math.isfinite(cfg.lr), "finite and > 0"),
             ("min_lr_ratio", _real(cfg.min_lr_ratio, 0, 1), "in [0, 1]"),
             ("warmup_steps", is_whole_number(cfg.warmup_steps, 0), "a whole number >= 0"),
             ("weight_decay", _real(cfg.weight_decay, 0, 1e6), "finite and >= 0"),
             ("betas", isinstance(cfg.betas, (tuple, list)) and len(cfg.betas) == 2
              and all(_real(b, 0, 1) and b < 1 for b in cfg.betas), "two numbers in [0, 1)"),
             ("grad_clip", _real(cfg.grad_clip, 0, 1e30), "finite and >= 0 (0: no clipping)"),
             ("grad_accum", is_whole_number(cfg.grad_accum, 1), "a whole number >= 1"),
             ("eval_every", is_whole_number(cfg.eval_every, 0), "a whole number >= 0 (0: never)"),
             ("patience", cfg.patience is None or is_whole_number(cfg.patience, 1), "None or >= 1"),
             ("ckpt_every", is_whole_number(cfg.ckpt_every, 0), "a whole number >= 0"),
             ("seed", is_whole_number(cfg.seed, 0), "a whole number >= 0"),
             ("loraplus_lr_ratio", _real(cfg.loraplus_lr_ratio, 0, 1e6, low_open=True),
              "finite and > 0 (1: the same lr for A and B)"),
             ("compile", isinstance(cfg.compile, bool), "True or False")]
    rules += [(name, getattr(cfg, name) in allowed, "one of " + ", ".join(map(repr, allowed)))
              for name, allowed in CHOICES.items()]
    for name, ok, allowed in rules:
        if not ok:
            raise ValueError(f"TrainConfig.{name} must be {allowed}; got {getattr(cfg, name)!r}")


@dataclass
class TrainResult:
    steps: int                     # optimizer steps taken (early stopping may cut them short)
    tokens: int                    # loss tokens seen
    wall_time: float               # seconds spent in this call
    losses: list = field(default_factory=list)   # training loss per step
    evals: list = field(default_factory=list)    # (step, metrics dict) per validation
    best_step: Optional[int] = None
    best_score: Optional[float] = None
    stopped_early: bool = False


def pick_device(name: str = "auto") -> torch.device:
    """'auto' takes cuda, then mps, then cpu; any other name ("cpu", "cuda:1", ...) is used
    as given, once this machine is known to have it."""
    if name != "auto":
        return check_device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_device(name) -> torch.device:
    """torch.device(name), refused with a clear message when it is not a device name or this
    machine does not have it."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this torch sees no CUDA GPU; use "
                         "auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and not (mps and mps.is_available()):
        raise ValueError(f"device {name!r} asked for, but MPS is not available; use auto or cpu")
    return device


def param_groups(model, cfg: TrainConfig):
    """The trainable parameters as optimizer groups, each with an "lr_scale" that the schedule
    multiplies its lr by: LoRA+ puts every parameter held as `.lora_B` (the attribute's exact
    name: an adapter named "lora_Bx" keeps its A at 1) in a group of its own at
    loraplus_lr_ratio, everything else at 1. (B starts at zero and A at random: Hayou et al.
    show that one lr for both is too small for B or too large for A as the width grows.)"""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no parameters that require grad; nothing to train")
    if cfg.loraplus_lr_ratio == 1.0:
        return [{"params": [p for _, p in named], "lr_scale": 1.0}]
    is_B = [n.rsplit(".", 1)[-1] == "lora_B" for n, _ in named]  # the attribute, not a substring
    if not any(is_B):
        raise ValueError("loraplus_lr_ratio is set, but no trainable parameter is a lora_B")
    groups = [{"params": [p for (_, p), b in zip(named, is_B) if not b], "lr_scale": 1.0},
              {"params": [p for (_, p), b in zip(named, is_B) if b],
               "lr_scale": float(cfg.loraplus_lr_ratio)}]
    return [g for g in groups if g["params"]]


def set_lr(optimizer, lr: float) -> None:
    """The schedule's lr for this step, times each group's lr_scale (LoRA+; see param_groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def make_optimizer(model, cfg: TrainConfig):
    params = param_groups(model, cfg)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas,
                                 weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use 'adamw' or 'sgd'")


def train(model, get_batch: Callable, cfg: TrainConfig, evaluate: Optional[Callable] = None,
          device="auto", monitor: str = "val_loss", mode: str = "min") -> TrainResult:
    """Train ``model`` in place.

    get_batch(generator) -> (x, y, loss_mask or None), one micro-batch, drawn with the given
    torch.Generator so that runs are reproducible and resumable.
    evaluate(model) -> dict of metrics, called every eval_every steps; ``monitor`` names the one
    used for early stopping and best-weight tracking (``mode`` 'min' or 'max').
    Everything that decides the rest of a run -- weights, optimizer and loss-scaler state, RNGs,
    the best weights so far -- goes into the checkpoint, so a resumed run ends where an
    uninterrupted one would.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    device = pick_device(device) if isinstance(device, str) else device
    autocast_context(device, cfg.precision)  # refuses a precision this device cannot run
    if ddp_of(model) is not None and (cfg.ckpt_path or cfg.log_path):
        raise ValueError("train() under DistributedDataParallel: every rank would write the same "
                         "ckpt_path / log_path; leave them unset and save from rank 0 (as lesson "
                         "13 saves its adapter)")
    if cfg.ckpt_path:
        check_writable(cfg.ckpt_path)  # found now, not after all the training
    if cfg.compile:
        check_compilable(model)
    run = _Run(model.to(device).train(), cfg, torch.Generator().manual_seed(cfg.seed))
    if cfg.resume and cfg.ckpt_path and Path(cfg.ckpt_path).exists():
        # checked whole before anything is loaded; it sets torch's RNG to the file's
        run.state, run.best_weights = load_checkpoint(cfg.ckpt_path, model, run.optimizer,
                                                      run.batch_gen, run.scaler)
    else:
        torch.manual_seed(cfg.seed)
    result = TrainResult(steps=run.state["step"], tokens=run.state["tokens"], wall_time=0.0)
    log = open(cfg.log_path, "a") if cfg.log_path else None
    progress, t0 = Progress(cfg.max_steps, cfg.progress), time.time()
    try:
        for step in range(run.state["step"], cfg.max_steps):
            if run.state["stopped_early"]:
                break
            loss, lr = run.step(step, get_batch, device)
            result.losses.append(loss)
            if log:
                log.write(json.dumps({"step": step + 1, "loss": loss, "lr": lr,
                                      "tokens": run.state["tokens"],
                                      "time": round(time.time() - t0, 4)}) + "\n")
            progress.update(step - result.steps, loss, lr, run.state["tokens"] - result.tokens)
            if evaluate and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                run.validate(evaluate, step + 1, monitor, mode, result)
            if cfg.ckpt_path and cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0:
                run.save(cfg.ckpt_path)
    finally:
        if log:
            log.close()
    return run.finish(result, t0)


def check_compilable(model):
    """Refuse compile=True where this torch cannot compile the model: torch.compile before 2.4
    breaks the graph at every custom autograd.Function and, in torch 2.1, fails on a weight
    stored compressed (a 4-bit base: util.modules.is_compressed_weight).
    A float model with LoRA compiles there, in pieces."""
    if dynamo_traces_function_backward():
        return
    compressed = [name for name, module in model.named_modules()
                  if is_compressed_weight(getattr(module, "weight", None))]
    if compressed:
        raise ValueError(f"compile=True: torch {torch.__version__} cannot compile a model with a "
                         f"compressed (4-bit) weight, such as {compressed[0]!r}; torch >= 2.4 "
                         "can, or train with compile=False")


class _Run:
    """The state of one call of train(): the model, its optimizer and loss scaler, the batch
    generator, the counters, and the best trainable weights seen by validation."""

    def __init__(self, model, cfg, batch_gen):
        self.model, self.cfg, self.batch_gen = model, cfg, batch_gen
        # the compiled module shares the model's parameters: the optimizer, checkpoints and
        # evaluation keep using the model itself
        self.step_model = torch.compile(model) if cfg.compile else model
        self.optimizer = make_optimizer(model, cfg)
        self.scaler = cuda_grad_scaler() if cfg.precision == "fp16" else None
        self.state = {"step": 0, "tokens": 0, "best_score": None, "best_step": None,
                      "bad_evals": 0, "stopped_early": False}
        self.best_weights = None

    def step(self, step, get_batch, device):
        """One optimizer step (grad_accum micro-batches); returns (loss, lr)."""
        lr = lr_at(step, self.cfg)
        set_lr(self.optimizer, lr)
        micro = [get_batch(self.batch_gen) for _ in range(self.cfg.grad_accum)]
        loss, n_tok = accumulate_gradients(self.step_model, micro, device, self.cfg.precision,
                                           self.scaler)
        optimizer_step(self.model, self.optimizer, self.scaler, self.cfg.grad_clip)
        self.state["step"], self.state["tokens"] = step + 1, self.state["tokens"] + n_tok
        return loss, lr

    def validate(self, evaluate, step, monitor, mode, result):
        """Evaluate; keep the best weights; decide on early stopping."""
        ddp = ddp_of(self.model)  # evaluate the model itself, not its DDP wrapper
        evaluated = self.model if ddp is None else ddp.module
        if _validate(evaluated, evaluate, step, monitor, mode, self.state, result):
            if self.cfg.restore_best:
                self.best_weights = _trainable_copy(self.model)
        if self.cfg.patience is not None and self.state["bad_evals"] >= self.cfg.patience:
            self.state["stopped_early"] = True

    def save(self, path):
        save_checkpoint(path, self.model, self.optimizer, self.batch_gen, self.state,
                        self.best_weights, self.scaler)

    def finish(self, result, t0):
        """Final checkpoint (of the last weights), then the best weights restored."""
        if self.cfg.ckpt_path:
            self.save(self.cfg.ckpt_path)
        if self.best_weights is not None:
            _load_trainable(self.model, self.best_weights)
        result.steps, result.tokens = self.state["step"], self.state["tokens"]
        result.best_step, result.best_score = self.state["best_step"], self.state["best_score"]
        result.stopped_early = self.state["stopped_early"]
        result.wall_time = time.time() - t0
        return result


def _validate(model, evaluate, step, monitor, mode, state, result) -> bool:
    model.eval()
    with torch.no_grad():
        metrics = evaluate(model)
    model.train()
    result.evals.append((step, metrics))
    if monitor not in metrics:
        raise KeyError(f"evaluate() returned {sorted(metrics)}, without the monitored metric "
                       f"{monitor!r}")
    score = metrics[monitor]
    best = state["best_score"]
    improved = best is None or (score < best if mode == "min" else score > best)
    if improved:
        state["best_score"], state["best_step"], state["bad_evals"] = score, step, 0
    else:
        state["bad_evals"] += 1
    return improved


def _trainable_copy(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model, weights):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def config_dict(cfg) -> dict:
    """A dataclass config as a JSON-friendly dict (for logs and tables)."""
    return asdict(cfg)
