"""Every CUDA path of the project, run and measured once, printed as one table.

    python -m lessons.gpu_check                    on a machine with a CUDA GPU
    python -m lessons.gpu_check --device cpu       the checks a CPU can run, on the CPU
    python -m lessons.gpu_check --only fp32 qlora  some of them (names: --help)

One row per check (pass, fail, or skipped and why) with what it measured: LoRA steps in fp32,
bf16 and fp16 with the project's loss scaler; the 4-bit layer against its float twin; a QLoRA
step; CPU offload; memory and step time per recipe; lessons 06 and 07 --quick. Models have random
weights (the tiny GPT; tiny_gpt.pretrained's SmolLM2-135M shape where that exists). Without CUDA,
``--device cuda`` (the default) prints one line and exits 0; a failed check exits 1.
"""
import argparse
import copy
import math
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from lessons.common import machine_line, print_table
from lora import apply_lora, prepare_qlora
from quant import Linear4bit
from tiny_gpt import GPT, GPTConfig
from tiny_gpt.memory.ledger import MB, measure_step
from tiny_gpt.memory.loss_scaling import DynamicLossScaler
from tiny_gpt.memory.offload import FrozenBaseOffload
from tiny_gpt.memory.probes import fresh_gradients, max_rel_diff
from tiny_gpt.train import check_device
from tiny_gpt.step import accumulate_gradients, optimizer_step
from tiny_gpt.util.timing import medians, ratio_spread, round_robin_times

STEPS = 8              # optimizer steps of each LoRA run: enough for the loss to move
LOSS_TOL_16BIT = 0.1   # a 16-bit run's largest distance from fp32's losses, as a share of how
                       # far fp32's fell (bf16's rounding alone: 1e-3 of it, tiny GPT, CPU)
# tests/test_quant_linear4bit.py's, read as assert_close does: |a - b| <= tol * (1 + |b|)
LINEAR4BIT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
OFFLOAD_TOL = 1e-5     # float32, relative: a GPU's attention backward may add in another order
TIME_ROUNDS, TIME_WARMUP = 7, 2  # timed rounds of the recipes taking turns, after untimed ones


class Skipped(Exception):
    """Raised by a check that cannot run here; its message says why."""


@dataclass(frozen=True)
class Subject:
    """A model to check: its builder (random weights, float32, CPU) and its batch's shape."""
    name: str
    build: Callable
    vocab: int
    batch: int = 16
    seq: int = 64
    lr: float = 1e-2  # the lessons' LoRA learning rate; a 30-block model needs a smaller one


TINY = Subject("tiny GPT", lambda: GPT(GPTConfig()), vocab=GPTConfig().vocab_size)


@lru_cache(maxsize=None)
def base_model(subject):
    """The subject built once, seed 0; every check trains a copy of it."""
    torch.manual_seed(0)
    return subject.build()


def fixed_batch(subject, device):
    """[(x, y, None)]: one micro-batch of tokens drawn from the first 64 ids, the same every call;
    a few steps on it make any model's loss fall."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, min(64, subject.vocab), (subject.batch, subject.seq + 1),
                           generator=gen)
    return [(tokens[:, :-1].to(device), tokens[:, 1:].to(device), None)]


def recipe_model(subject, device, recipe="lora"):
    """A copy of the base on the device: "full" (everything trains), "lora" or "qlora" (the base
    quantized on the device). Adapters are drawn with seed 1, the same in every run."""
    model = copy.deepcopy(base_model(subject)).to(device)
    torch.manual_seed(1)
    if recipe == "full":
        return model.requires_grad_(True)
    return (prepare_qlora if recipe == "qlora" else apply_lora)(model)


def optimizer_of(model, subject):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=subject.lr)


def one_step(batch, device, model, optimizer, precision="fp32", scaler=None):
    """Forward, backward, clipping and the optimizer step (tiny_gpt.train's own); -> loss."""
    loss, _ = accumulate_gradients(model, batch, device, precision, scaler)
    optimizer_step(model, optimizer, scaler, grad_clip=1.0)
    return loss


@lru_cache(maxsize=None)
def train_losses(subject, device, precision):
    """The losses of STEPS LoRA steps; fp16 steps through the project's DynamicLossScaler.
    -> (losses, optimizer steps the scaler skipped)."""
    model = recipe_model(subject, device)
    optimizer, batch = optimizer_of(model, subject), fixed_batch(subject, device)
    scaler = DynamicLossScaler() if precision == "fp16" else None
    losses, skipped = [], 0
    for _ in range(STEPS):
        scale = scaler.get_scale() if scaler else None
        losses.append(one_step(batch, device, model, optimizer, precision, scaler))
        skipped += bool(scaler and scaler.get_scale() < scale)  # inf found: step skipped
    return tuple(losses), skipped


def check_lora_steps(subject, precision, device):
    """STEPS LoRA steps: finite losses, the last below the first; a 16-bit run's losses within
    LOSS_TOL_16BIT of the fp32 run's fall."""
    if precision == "fp16" and device.type != "cuda":
        raise Skipped("fp16 autocast runs on CUDA only (autocast_context refuses it on a CPU)")
    losses, skipped = train_losses(subject, device, precision)
    measured = f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    ok = all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    if precision != "fp32":
        fp32 = train_losses(subject, device, "fp32")[0]
        fall = max(fp32[0] - fp32[-1], 0.0)
        gap = max(abs(a - b) for a, b in zip(losses, fp32)) / fall if fall else math.inf
        ok = ok and gap <= LOSS_TOL_16BIT
        measured += f"; max gap to fp32 {gap:.1e} of its fall (<= {LOSS_TOL_16BIT:g})"
    if precision == "fp16":
        measured += f"; {skipped} step(s) skipped by the scaler"
    return ok, measured


def check_linear4bit(device):
    """Linear4bit built from a layer already on the device, against F.linear with its
    dequantized weight: equal up to the matmul's rounding in each compute dtype."""
    linear = torch.nn.Linear(320, 192).to(device)
    x = torch.randn(4, 24, 320, generator=torch.Generator().manual_seed(0)).to(device)
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    worst, parts = 0.0, []
    for dtype in dtypes:
        layer = Linear4bit.from_linear(linear, compute_dtype=dtype)
        twin = F.linear(x.to(dtype), layer.dequantized_weight(), linear.bias.to(dtype)).float()
        gap = ((layer(x) - twin).abs() / (1 + twin.abs())).max().item()
        worst = max(worst, gap / LINEAR4BIT_TOL[dtype])
        parts.append(f"{str(dtype)[6:]} {gap:.1e} (<= {LINEAR4BIT_TOL[dtype]:g})")
    return worst <= 1, "max |4-bit - twin| / (1 + |twin|): " + ", ".join(parts)


def adapter_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


def check_qlora_step(subject, device):
    """prepare_qlora on the device, two steps (B = 0 gives A no gradient in the first): a finite
    loss, a gradient for every adapter, every frozen tensor (4-bit base included) unchanged."""
    model = recipe_model(subject, device, "qlora")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    optimizer, batch = optimizer_of(model, subject), fixed_batch(subject, device)
    one_step(batch, device, model, optimizer)
    loss, _ = accumulate_gradients(model, batch, device)
    grads = adapter_grads(model)
    got = sum(g is not None and bool(torch.isfinite(g).all()) and bool(g.any())
              for g in grads.values())
    changed = [k for k, v in model.state_dict().items() if k in frozen and not
               torch.equal(v, frozen[k])]
    ok = math.isfinite(loss) and got == len(grads) > 0 and not changed
    return ok, (f"loss {loss:.4f}; {got}/{len(grads)} adapter tensors with a gradient; "
                f"{sum(isinstance(m, Linear4bit) for m in model.modules())} 4-bit layers, "
                f"{len(changed)} frozen tensors changed")


def check_offload(device):
    """The tiny GPT's LoRA loss and adapter gradients with the frozen blocks in CPU memory."""
    model, batch = recipe_model(TINY, device), fixed_batch(TINY, device)
    loss, grads = fresh_gradients(model, batch, device)  # the adapters': the rest is frozen
    with FrozenBaseOffload(model, device) as offload:
        off_loss, off_grads = fresh_gradients(model, batch, device)
    gap = max(abs(off_loss - loss) / loss, max_rel_diff(off_grads, grads))
    home = all(p.device.type == device.type for p in model.parameters())
    ok = gap <= OFFLOAD_TOL and offload.offloaded_saves > 0 and home
    return ok, (f"max relative gap {gap:.1e} (<= {OFFLOAD_TOL:g}); {offload.offloaded_saves} "
                f"saved weights fetched back from the CPU; all back on {device.type}: {home}")


RECIPES = {"full FT": ("full", "fp32"), "LoRA": ("lora", "fp32"), "LoRA bf16": ("lora", "bf16"),
           "LoRA fp16": ("lora", "fp16"), "QLoRA": ("qlora", "fp32")}


def recipes_on(device):  # fp16 autocast is CUDA's
    return [name for name in RECIPES if device.type == "cuda" or RECIPES[name][1] != "fp16"]


def recipe(subject, name, device):
    """(model, optimizer, precision, loss scaler or None): the recipe, fresh on the device."""
    kind, precision = RECIPES[name]
    model = recipe_model(subject, device, kind)
    scaler = DynamicLossScaler() if precision == "fp16" else None
    return model, optimizer_of(model, subject), precision, scaler


def check_memory(subject, device):
    """Each recipe's peak over one step (alone on the device, so the peak is its own) must hold
    what the ledger says is alive at once: the weights, and the larger of the saved activations
    (at the end of forward) and the grads + optimizer state (at the optimizer step)."""
    if device.type != "cuda":
        raise Skipped("torch.cuda.max_memory_allocated is CUDA's")
    parts, ok = [], True
    for name in recipes_on(device):
        model, optimizer, precision, _ = recipe(subject, name, device)
        ledger = measure_step(model, fixed_batch(subject, device), optimizer, precision)
        at_once = ledger.weights + max(ledger.activations, ledger.grads + ledger.optimizer)
        ok = ok and ledger.device_peak >= at_once
        parts.append(f"{name} {ledger.device_peak / MB:.1f}/{ledger.total / MB:.1f}")
        del model, optimizer  # before the next recipe's peak
        torch.cuda.empty_cache()
    return ok, "peak/ledger MiB: " + ", ".join(parts)


def check_step_times(subject, device):
    """Median ms per training step, and each recipe's ratio to LoRA from the same rounds."""
    batch = fixed_batch(subject, device)
    steps = {name: partial(one_step, batch, device, *recipe(subject, name, device))
             for name in recipes_on(device)}
    times = round_robin_times(steps, TIME_ROUNDS, TIME_WARMUP)
    ms = {name: 1e3 * t for name, t in medians(times).items()}
    ok = all(0 < t < float("inf") for t in ms.values())
    return ok, "ms: " + ", ".join(
        f"{n} {ms[n]:.4g}" + ("" if n == "LoRA" else f" ({ratio_spread(times, n, 'LoRA')})")
        for n in ms)


def check_lesson(number, device):
    """lessons/NN_*.py --quick on the device, run as `python -m lessons` runs it (its output
    shown as it comes), its outputs in a folder of its own."""
    from lessons.__main__ import lesson_files, run_lesson
    path = next(p for p in lesson_files() if p.name[:2] == number)
    with tempfile.TemporaryDirectory() as runs:
        done = run_lesson(path, argparse.Namespace(device=str(device), runs=Path(runs),
                                                   quick=True))
    last = done["output"].strip().splitlines()[-1:] if done["code"] else []
    return done["code"] == 0, (f"exit {done['code']} in {done['seconds']:.0f} s"
                               + "".join(f": {line[:120]}" for line in last))


def real_subject(device):
    """tiny_gpt.pretrained's model at SmolLM2-135M's shape (its tiny config on a CPU, where the
    135M would take minutes), or None when that package is not there."""
    try:
        from tiny_gpt.pretrained import build_model, shipped_config
    except ImportError:
        return None
    config = shipped_config("smollm2-135m" if device.type == "cuda" else "tiny")
    return Subject(f"{'SmolLM2-135M' if device.type == 'cuda' else 'tiny'} shape, random",
                   partial(build_model, config), vocab=config.vocab_size,
                   batch=4, seq=256 if device.type == "cuda" else 32, lr=1e-3)


def model_checks(subject, key=None):
    """The checks every model gets: [(key, label, check(device))]; `key` names them all."""
    return [(key or k, f"{label} ({subject.name})", check) for k, label, check in [
        ("fp32", "LoRA steps, fp32", partial(check_lora_steps, subject, "fp32")),
        ("bf16", "LoRA steps, bf16 autocast", partial(check_lora_steps, subject, "bf16")),
        ("fp16", "LoRA steps, fp16 autocast + loss scaler",
         partial(check_lora_steps, subject, "fp16")),
        ("qlora", "QLoRA step", partial(check_qlora_step, subject)),
        ("memory", "memory per recipe", partial(check_memory, subject)),
        ("times", "step time per recipe", partial(check_step_times, subject))]]


CHECK_KEYS = ("fp32", "bf16", "fp16", "qlora", "4bit", "offload", "memory", "times",  # --only's
              "lesson06", "lesson07", "real")


def all_checks(device):
    """[(key, label, check)] in the order the table shows them."""
    checks = model_checks(TINY)
    checks[4:4] = [("4bit", "4-bit layer = its dequantized twin", check_linear4bit),
                   ("offload", "CPU offload of the frozen blocks (tiny GPT)", check_offload)]
    checks += [(f"lesson{n}", f"lesson {n} --quick --device {device.type}",
                partial(check_lesson, n)) for n in ("06", "07")]
    real = real_subject(device)
    if real is None:
        return checks + [("real", "real-checkpoint model (SmolLM2-135M shape)",
                          partial(skip, "tiny_gpt.pretrained not available"))]
    return checks + model_checks(real, "real")


def skip(why, device):
    raise Skipped(why)


def run_check(check, device):
    """-> (result, measured): "pass" / "fail" / "skipped: why"; an error is a fail."""
    try:
        ok, measured = check(device)
    except Skipped as why:
        return f"skipped: {why}", ""
    except Exception as error:  # the table reports it; the exit status says it failed
        return "fail", f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return ("pass" if ok else "fail"), measured


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m lessons.gpu_check", allow_abbrev=False,
                                     description="Run every CUDA path once; one table.")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--only", nargs="+", choices=CHECK_KEYS, metavar="CHECK",
                        help=f"run only these checks: {', '.join(CHECK_KEYS)}")
    args = parser.parse_args(argv)
    if args.device.split(":")[0] not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: give cuda, cuda:N or cpu")
    no_gpu = args.device.startswith("cuda") and not torch.cuda.is_available()
    try:  # None: no GPU, nothing to check (main says so)
        args.device = None if no_gpu else check_device(args.device)
    except ValueError as error:
        parser.error(f"--device: {error}")
    return args


def main(argv=None):
    args = parse(argv)
    if args.device is None:
        print(f"No CUDA GPU here (torch {torch.__version__}): nothing to check; "
              "`python -m lessons.gpu_check --device cpu` runs the checks a CPU can.")
        return 0
    device = args.device
    print(f"GPU check on {device}: {machine_line()}\n", flush=True)
    rows = []
    for key, label, check in all_checks(device):
        if args.only is None or key in args.only:
            rows.append([label, *run_check(check, device)])
            print(f"[{rows[-1][1].split(':')[0]}] {label}", flush=True)
    widths = [max(map(len, column)) for column in zip(*rows)]  # text reads left-aligned
    print_table(f"GPU check ({device})", ["check", "result", "measured"],
                [[c.ljust(w) for c, w in zip(row, widths)] for row in rows])
    failed = [label for label, result, _ in rows if result == "fail"]
    print(f"{len(failed)} check(s) failed: {'; '.join(failed)}" if failed else "No check failed.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
