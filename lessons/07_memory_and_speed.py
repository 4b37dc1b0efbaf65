"""Lesson 07 -- memory and speed: where the bytes of a training step go.

One training step holds four kinds of memory. With Phi parameters in float32, of which phi are
trained (ZeRO, Rajbhandari et al. 2020, Sec. 3, splits them the same way):

    weights       4 Phi bytes                  a 4-bit NF4 base: ~0.52 bytes per weight
    gradients     4 phi                        only trainable parameters get a .grad
    optimizer     8 phi (+ 4 per tensor)       AdamW's exp_avg and exp_avg_sq; SGD momentum 4 phi
    activations   what autograd saves for backward; grows with batch x sequence length

Full fine-tuning has phi = Phi; LoRA r=8 on Q and V trains phi = 2% of it. Each of the usual
memory recipes attacks one line. LoRA: gradients and optimizer state -- and activations too,
since a frozen layer keeps no input for a weight gradient. QLoRA (Dettmers et al. 2023, Sec. 3):
the weights. bf16 autocast: activations saved in 2 bytes (some stay float32: see "By dtype").
Gradient accumulation: activations of one micro-batch at a time, the same gradient. Gradient
checkpointing (Chen et al. 2016): activations, at the price of a second forward of each block.
CPU offload: the accelerator's copy of the frozen weights. Everything is measured from the
tensors (tiny_gpt/memory/ledger.py): activations are the storages autograd saves, each counted
once, caught with saved_tensors_hooks.

What checkpointing costs depends on what backward costs. Full fine-tuning's backward computes a
weight gradient for every matmul; LoRA's skips them for the frozen base, so the same recomputed
forward is a larger share of a cheaper step ("The phases of a step"). Recomputing only part of
the model is the usual answer, measured here: the MLPs only, the attentions only, 2 or 3 of the
4 blocks. Under LoRA the MLP's frozen layers keep no input (only its GELU does), so the MLPs
alone cut less than the attentions; whole blocks cut memory in proportion to their number.

The pitfall: torch.utils.checkpoint(use_reentrant=True) when the blocks' input does not require
grad (frozen embeddings under LoRA) -- the adapters get no gradient, and only a warning says so.
The table shows it and the fixes (tiny_gpt/memory/checkpointing.py explains why).

The batch: 16 windows of 256 characters of the pretraining text, the model's full context (the
task examples, 20-50 characters, would need padding). Step times are medians of interleaved
rounds, so that a shared machine's slow spells hit every configuration alike; optimizers run at
lr 0: the same work, but the weights stay put, so gradients can be compared afterwards.

Speed, last: every speed target of the project side by side in one run (lessons/speed.py, also
runnable alone as ``python -m lessons.speed``): NF4 against bitsandbytes' kernels, one LoRALinear
against the frozen layer, a training step of our LoRA against PEFT's and of QLoRA against LoRA
(bitsandbytes and PEFT where installed), and torch.compile -- graph breaks, and the LoRA and the
QLoRA step compiled by inductor (the fine-tuning lessons' --compile flag) against the same eager
steps, in default runs only (compiling takes about 30 s a model).

Run: ``python lessons/07_memory_and_speed.py``: about 3 minutes on 2 CPU cores, base cached.
"""
import copy
from dataclasses import astuple, dataclass

import torch

from lessons import speed
from lessons.common import (Checks, get_base_model, lesson_dir, lora_copy, parse_args, print_table,
                            run_main, takeaway, text_batch, write_summary)
from lessons.plots import matplotlib_pyplot, save_figure
from lora import lora_layers
from lora.qlora_checks import linear_bytes
from tiny_gpt.memory.ledger import MB, measure_step, weight_ledger
from tiny_gpt.memory.offload import FrozenBaseOffload
from tiny_gpt.memory.probes import (backward_outcome, block_saved_bytes, fresh_gradients,
                                    grad_norm, max_abs_diff)
from tiny_gpt.memory.step_configs import idle_config, measure_configs, with_checkpointing
from tiny_gpt.memory.step_time import time_step
from tiny_gpt.util.timing import round_robin_phase_medians

NAME = "07_memory_and_speed"
ACCUM_TOL = 1e-6  # float32 gradients summed in another order: ~1e-8 apart here
MAIN_ROWS = ["full FT, AdamW", "full FT, SGD", "LoRA", "LoRA r=64", "LoRA + ckpt", "LoRA + bf16",
             "QLoRA", "QLoRA + ckpt"]
CKPT_ROWS = [  # (config, what is checkpointed, the config it is compared with)
    ("LoRA", "nothing", "LoRA"),
    ("LoRA + ckpt", "every block, torch.utils.checkpoint", "LoRA"),
    ("LoRA + ckpt (ours)", "every block, ours (CheckpointFunction)", "LoRA"),
    ("LoRA + ckpt (reentrant)", "every block, reentrant + input grads", "LoRA"),
    ("LoRA + ckpt MLP", "the MLPs only (ours)", "LoRA"),
    ("LoRA + ckpt attn", "the attentions only (ours)", "LoRA"),
    ("LoRA + ckpt 2/4", "blocks 0 and 2 (ours)", "LoRA"),
    ("LoRA + ckpt 3/4", "blocks 0, 1, 2 (ours)", "LoRA"),
    ("full FT, AdamW", "full FT: nothing", "full FT, AdamW"),
    ("full FT + ckpt", "full FT: every block", "full FT, AdamW")]


def adapted(base, impl=None, parts=None, quantized=False, r=8):
    """A LoRA (or QLoRA) copy of the base, Q and V at rank r (alpha = 2r), seed 0: the same
    adapters in every configuration. impl: per-block checkpointing ("torch_reentrant" comes
    with its fix); parts: submodules to checkpoint instead (selective checkpointing)."""
    return with_checkpointing(lora_copy(base, 0, r=r, alpha=2 * r, quantized=quantized), impl,
                              parts)


def build_configs(base, batch, micro, cuda):
    """name -> (model, optimizer, precision, micro-batches)."""
    models = {"full FT, AdamW": copy.deepcopy(base), "full FT, SGD": copy.deepcopy(base),
              "full FT + ckpt": with_checkpointing(copy.deepcopy(base), "torch"),
              "LoRA": adapted(base), "LoRA r=64": adapted(base, r=64),
              "LoRA + ckpt": adapted(base, "torch"),
              "LoRA + ckpt (ours)": adapted(base, "manual"),
              "LoRA + ckpt (reentrant)": adapted(base, "torch_reentrant"),
              "LoRA + ckpt MLP": adapted(base, parts="mlp"),
              "LoRA + ckpt attn": adapted(base, parts="attn"),
              "LoRA + ckpt 2/4": adapted(base, parts=["blocks.0", "blocks.2"]),
              "LoRA + ckpt 3/4": adapted(base, parts=["blocks.0", "blocks.1", "blocks.2"]),
              "LoRA + bf16": adapted(base), "LoRA, 4 micro-batches": adapted(base),
              "QLoRA": adapted(base, quantized=True),
              "QLoRA + ckpt": adapted(base, "torch", quantized=True)}
    if cuda:
        models["LoRA + fp16"] = adapted(base)  # memory and time only: no loss scaling needed here
    # lr 0: the same work per step, but the weights stay put for the gradient comparisons
    return {name: idle_config(model, micro if "micro" in name else [batch],
                              next((p for p in ("bf16", "fp16") if p in name), "fp32"),
                              sgd="SGD" in name) for name, model in models.items()}


@dataclass(frozen=True)
class Budget:
    batch: int = 16       # B, sequences of the measured batch
    seq_len: int = 256    # T
    repeats: int = 7      # timed steps per configuration, taking turns
    warmup: int = 1


QUICK = Budget(batch=4, seq_len=32, repeats=1, warmup=0)


class Run:
    """The batch, the configurations, and what one measuring pass found for each of them."""

    def __init__(self, args, base):
        self.args, self.device, self.base = args, args.device, base
        self.B, self.T, self.repeats, warmup = astuple(args.budget)
        x, y = text_batch(args, self.B, self.T)
        self.batch = (x, y, None)
        self.micro = [(x[i::4], y[i::4], None) for i in range(4)]  # 4 micro-batches of B/4
        self.configs = build_configs(base, self.batch, self.micro, self.device.type == "cuda")
        self.ledgers, self.phases = measure_configs(self.configs, self.repeats, warmup)
        self.times = {n: ph["total"] for n, ph in self.phases.items()}
        self.main_rows = MAIN_ROWS + (["LoRA + fp16"] if "LoRA + fp16" in self.configs else [])
        self.ref_grads = fresh_gradients(self.configs["LoRA"][0], [self.batch], self.device)[1]


def ledger_section(run):
    t_full = run.times["full FT, AdamW"]
    print_table(f"One training step, batch {run.B} x {run.T} tokens ({run.device}): MiB, and "
                "ms per step", ["config", "frozen", "trainable", "grads", "optim", "activ",
                                "total", "ms", "x full FT"],
                [[n, *[f"{v:.2f}" for v in run.ledgers[n].megabytes().values()],
                  f"{1e3 * run.times[n]:.0f}", f"{run.times[n] / t_full:.2f}"]
                 for n in run.main_rows])
    mib = lambda d: ", ".join(f"{k} {v / MB:.3g}" for k, v in sorted(d.items()))
    print_table("By dtype (MiB)", ["config", "weights", "saved activations"],
                [[n, mib(run.ledgers[n].by_dtype), mib(run.ledgers[n].activations_by_dtype)]
                 for n in ["LoRA", "LoRA + bf16", "QLoRA"]])


def checkpoint_section(run):
    rows = []
    for name, label, against in CKPT_ROWS:
        cut = 1 - run.ledgers[name].activations / run.ledgers[against].activations
        extra = run.times[name] / run.times[against] - 1
        diff = "-"  # gradients are compared among the LoRA configurations
        if against == "LoRA":
            grads = fresh_gradients(run.configs[name][0], [run.batch], run.device)[1]
            diff = f"{max_abs_diff(grads, run.ref_grads):.1e}"
        rows.append([label, f"{run.ledgers[name].activations / MB:.2f}", f"{100 * cut:.0f}%",
                     f"{1e3 * run.times[name]:.0f}", f"{100 * extra:+.0f}%", diff])
    print_table("Gradient checkpointing: what to recompute (activations saved in forward)",
                ["checkpointed", "activ MiB", "cut", "ms", "extra time", "max|dgrad|"], rows)
    names = ["full FT, AdamW", "full FT + ckpt", "LoRA", "LoRA + ckpt"]
    phases = ("forward", "backward", "optimizer")
    print_table("The phases of a step (ms, medians): a recompute repeats the blocks' forward",
                ["config", *phases, "backward / forward"],
                [[n, *[f"{1e3 * run.phases[n][k]:.0f}" for k in phases],
                  f"{run.phases[n]['backward'] / run.phases[n]['forward']:.2f}"] for n in names])
    model, x = run.configs["LoRA"][0], run.batch[0].to(run.device)
    block = block_saved_bytes(model, x)  # what one recompute rebuilds during backward
    print(f"One block's own saved tensors (LoRA), rebuilt one block at a time in backward: "
          f"{block / MB:.2f} MiB on top of the checkpointed step's saved activations.\n")


def accumulation_section(run):
    diff = max_abs_diff(fresh_gradients(run.configs["LoRA"][0], run.micro, run.device)[1],
                        run.ref_grads)
    one, four = "LoRA", "LoRA, 4 micro-batches"
    print_table(f"Gradient accumulation (LoRA): 4 micro-batches of {run.B // 4} vs one batch "
                f"of {run.B}", ["", "peak activ MiB", "ms", "max|dgrad| vs one batch"],
                [["one batch", f"{run.ledgers[one].activations / MB:.2f}",
                  f"{1e3 * run.times[one]:.0f}", "0"],
                 ["4 micro-batches", f"{run.ledgers[four].activations / MB:.2f}",
                  f"{1e3 * run.times[four]:.0f}", f"{diff:.1e}"]])
    return diff


def pitfall_section(run):
    """Reentrant checkpointing with frozen embeddings, and its fixes: adapter grad norms."""
    x, y = (t.to(run.device) for t in run.batch[:2])
    rows = []
    for label, impl, fix in [("no checkpointing", None, False),
                             ("reentrant", "torch_reentrant", False),
                             ("reentrant + input requires grad", "torch_reentrant", True),
                             ("non-reentrant (torch)", "torch", False),
                             ("ours (CheckpointFunction)", "manual", False)]:
        model = with_checkpointing(adapted(run.base), impl, fix_reentrant=fix)
        for _, layer in lora_layers(model):  # a trained-looking B, so that A gets gradient too
            torch.nn.init.normal_(layer.lora_B, std=0.02)
        model.ln_f.requires_grad_(True)  # trained too (as with modules_to_save): no error
        caught, _ = backward_outcome(model, x, y)
        adapters = [p for n, p in model.named_parameters() if "lora_" in n]
        missing, norm = grad_norm(adapters)
        rows.append([label, f"{missing}/{len(adapters)}", f"{norm:.4g}",
                     f"{model.ln_f.weight.grad.norm().item():.4g}", "yes" if caught else "no"])
    print_table("The reentrant pitfall: LoRA + a trained ln_f, frozen embeddings",
                ["checkpointing", "adapter grads None", "adapter grad norm", "ln_f grad norm",
                 "warning"], rows)
    model = with_checkpointing(adapted(run.base), "torch_reentrant", fix_reentrant=False)
    error = backward_outcome(model, x, y)[1]  # the loss has no grad_fn at all
    print(f"Reentrant with only the adapters trainable: {error or 'no error'}\n")


def qlora_section(run):
    """The frozen base's bytes as stored (state dicts: codes, scales, code books, biases). Each
    Linear4bit also holds 3 KiB of look-up tables rebuilt from its code books, not stored:
    constant per layer, so a large weight does not notice them and this tiny model does; they
    are shown on their own row, outside the ratio."""
    lin32 = linear_bytes(run.base)[0]
    lin4, held = linear_bytes(run.configs["QLoRA"][0])  # stored, and held in memory
    base32, base4 = weight_ledger(run.base).weights, run.ledgers["QLoRA"].frozen
    print_table("QLoRA's frozen base vs float32", ["part", "fp32 MiB", "NF4 MiB", "ratio"],
                [["linear layers (weights, biases)", f"{lin32 / MB:.3f}", f"{lin4 / MB:.3f}",
                  f"{lin4 / lin32:.1%}"],
                 ["  + look-up tables, held but not stored", "", f"{(held - lin4) / MB:.3f}",
                  f"{held / lin32:.1%} with them"],
                 ["whole base in memory (+ fp32 embeddings, norms)", f"{base32 / MB:.3f}",
                  f"{base4 / MB:.3f}", f"{base4 / base32:.1%}"]])
    return lin4 / lin32, base4 / base32


def offload_section(run):
    """CUDA only: frozen block weights in CPU memory, streamed to the GPU one block at a time."""
    if run.device.type != "cuda":
        print("CPU offload: not measured. This run is on the CPU, so the weights would be "
              "'offloaded' into the memory they already live in; it pays when a GPU's memory "
              "is the limit (tests/test_memory.py checks the mechanism on the CPU).\n")
        return
    model, opt, _, _ = run.configs["LoRA"]
    resident = torch.cuda.memory_allocated(run.device)
    with FrozenBaseOffload(model, run.device) as off:
        streamed = torch.cuda.memory_allocated(run.device)
        ledger = measure_step(model, [run.batch], opt, hooks=(off.pack, off.unpack))
        t = round_robin_phase_medians({"o": lambda: time_step(model, [run.batch], opt)},
                                      run.repeats)["o"]["total"]
    print_table("CPU offload of the frozen blocks",
                ["", "weights on GPU MiB", "peak GPU MiB", "ms"],
                [["LoRA", f"{resident / MB:.2f}", f"{run.ledgers['LoRA'].device_peak / MB:.2f}",
                  f"{1e3 * run.times['LoRA']:.0f}"],
                 ["LoRA + offload", f"{streamed / MB:.2f}", f"{ledger.device_peak / MB:.2f}",
                  f"{1e3 * t:.0f}"]])


def targets_section(run, qlora_linear, qlora_base, accum_diff):
    """The lesson's targets as Checks: bytes are judged (in a default run), times only shown."""
    led, t = run.ledgers, run.times
    numbers = {"ckpt_activation_cut": 1 - led["LoRA + ckpt"].activations / led["LoRA"].activations,
               "ckpt_extra_time": t["LoRA + ckpt"] / t["LoRA"] - 1,
               "lora_optimizer_ratio": led["LoRA"].optimizer / led["full FT, AdamW"].optimizer,
               "qlora_linear_ratio": qlora_linear, "qlora_base_ratio": qlora_base,
               "lora_time_ratio": t["LoRA"] / t["full FT, AdamW"]}
    checks = Checks(run.args)
    checks.must(f"accumulated gradient = one big batch's (float32, {ACCUM_TOL:g})",
                accum_diff <= ACCUM_TOL, f"{accum_diff:.1e}")
    checks.target("checkpointing cuts saved activations >= 50%",
                  numbers["ckpt_activation_cut"] >= 0.5, f"{numbers['ckpt_activation_cut']:.1%}")
    checks.target("LoRA optimizer state <= 2% of full FT's",
                  numbers["lora_optimizer_ratio"] <= 0.02, f"{numbers['lora_optimizer_ratio']:.2%}")
    checks.target("QLoRA linear layers <= 15% of fp32", qlora_linear <= 0.15, f"{qlora_linear:.1%}")
    checks.shown("QLoRA whole base <= 15% of fp32", qlora_base <= 0.15, f"{qlora_base:.1%}",
                 why="QLoRA keeps embeddings and norms in fp32, a large share of a tiny model")
    checks.shown("checkpointing extra step time <= 40%", numbers["ckpt_extra_time"] <= 0.4,
                 f"{numbers['ckpt_extra_time']:+.1%}")
    checks.shown("LoRA step time < full FT's", numbers["lora_time_ratio"] < 1.0,
                 f"{numbers['lora_time_ratio']:.2f}x")
    return numbers, checks


def conclude(numbers, qlora_linear):
    extra = numbers["ckpt_extra_time"]
    takeaway(f"LoRA's optimizer state is {numbers['lora_optimizer_ratio']:.1%} of full "
             f"fine-tuning's; checkpointing every block cuts the saved activations by "
             f"{numbers['ckpt_activation_cut']:.0%} for {extra:+.0%} step time; QLoRA's linear "
             f"weights take {qlora_linear:.1%} of their fp32 bytes")


def plot(out, run):
    plt = matplotlib_pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    bottom = [0.0] * len(run.main_rows)
    for kind in ["frozen", "trainable", "grads", "optimizer", "activations"]:
        vals = [run.ledgers[n].megabytes()[kind] for n in run.main_rows]
        ax.bar(run.main_rows, vals, bottom=bottom, label=kind if kind in (
            "grads", "optimizer", "activations") else f"{kind} weights")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set(ylabel="MiB", title="Where the bytes of one training step go")
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend()
    marks = {"LoRA + ckpt (ours)": ("x", "every block, ours"),
             "LoRA + ckpt (reentrant)": ("+", "every block, reentrant")}
    for name, label, against in CKPT_ROWS:
        extra = 100 * (run.times[name] / run.times[against] - 1)
        point = (extra, run.ledgers[name].activations / MB)
        marker, legend = marks.get(name, ("o", None))
        ax2.scatter(*point, marker=marker, label=legend, s=50,
                    color="C3" if name.startswith("full") else "C0")
        if legend is None:
            ax2.annotate(label.replace(" (ours)", "").replace(", torch.utils.checkpoint", ""),
                         point, fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax2.set(xlabel="extra step time (%)", ylabel="saved activations (MiB)",
            title="Checkpointing: memory vs extra time (blue LoRA, red full FT)")
    ax2.legend(fontsize=7, loc="upper right")
    save_figure(fig, out / "memory_ledger.png")


def main(argv=None):
    args = parse_args(__doc__, argv, budget=(Budget(), QUICK))
    base, _ = get_base_model(args)
    run = Run(args, base)
    ledger_section(run)
    checkpoint_section(run)
    accum_diff = accumulation_section(run)
    pitfall_section(run)
    qlora_linear, qlora_base = qlora_section(run)
    offload_section(run)
    numbers, checks = targets_section(run, qlora_linear, qlora_base, accum_diff)
    numbers.update(speed.report(base, args, checks))
    plot(lesson_dir(args, NAME), run)
    conclude(numbers, qlora_linear)
    write_summary(args, NAME, {
        "batch": [run.B, run.T], **numbers, "accumulation_max_grad_diff": accum_diff,
        **{f"total_MiB {n}": run.ledgers[n].total / MB for n in run.main_rows},
        **{f"ms {n}": 1e3 * run.times[n] for n in run.main_rows}})
    return checks.report("Targets")


if __name__ == "__main__":
    run_main(main)
