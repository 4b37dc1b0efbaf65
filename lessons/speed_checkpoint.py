"""Speed at a real shape: one training step at SmolLM2-135M's shape, ours against transformers.

    python -m lessons.speed_checkpoint            # a few minutes on 2 CPU cores
    python -m lessons.speed_checkpoint --quick    # the tiny shape: the code paths only

The same checkpoint (random weights, written once in Hugging Face's layout) is loaded twice:
into this project's Llama (tiny_gpt/pretrained) with our LoRA on q_proj and v_proj, and into
transformers' LlamaForCausalLM with PEFT's LoRA, the same A and B copied in (B drawn away from
zero, so that neither side skips a zero product), and the two losses checked equal. Then a step
of each, AdamW at lr 0 (the full work; the weights stay put), taking turns round after round
(tiny_gpt/util/timing.py). QLoRA: our 4-bit base loaded straight into NF4
(quant/load_4bit.py) against transformers with bitsandbytes' 4-bit layers, where bitsandbytes
runs on this CPU (the table says why not where it does not).

A target is read from the per-round ratios: met when even their upper quartile is within it,
not met when even the lower quartile is above it, cannot tell when the middle half straddles
it (lessons/speed.py reads every speed target so). transformers, PEFT and bitsandbytes are
never dependencies: without them this section prints one line and measures nothing.
"""
import tempfile

import torch
import torch.nn as nn

from lessons.common import machine_line, print_table
from lora import apply_lora, lora_layers
from lora.bench import copy_factors_to_peft, peft_lora
from quant import load_pretrained_4bit
from tiny_gpt.memory.step_time import idle_adamw, step_times, time_step
from tiny_gpt.model import masked_cross_entropy
from tiny_gpt.pretrained import build_model, load_pretrained, save_pretrained, shipped_config
from tiny_gpt.step import micro_batch_loss
from tiny_gpt.util.timing import medians, ratio_spread

TARGET = 1.0          # ours / theirs, per step
SAME_LOSS_TOL = 1e-5  # float32, the same weights: the order of summation only
R, ALPHA = 8, 16


class LogitsOnly(nn.Module):
    """transformers' model called as ours is: idx -> (logits, None)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets=None):
        logits = self.model(input_ids=idx, use_cache=False).logits
        return logits, None if targets is None else masked_cross_entropy(logits, targets)


def ours_lora(folder, quantized):
    model = (load_pretrained_4bit if quantized else load_pretrained)(folder)
    apply_lora(model, targets=("q_proj", "v_proj"), r=R, alpha=ALPHA)
    with torch.no_grad():  # a trained-looking B, drawn once and copied to PEFT's layers
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(0.0, 0.02)
    return model.train()


def theirs_lora(folder, ours, quantized):
    """transformers + PEFT (+ bitsandbytes' 4-bit) on the same folder, our A and B copied."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    options = {"dtype": torch.float32}
    if quantized:
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(folder, **options)
    model = peft_lora(model, ("q_proj", "v_proj"), R, ALPHA)
    copy_factors_to_peft(model, ours)
    return LogitsOnly(model).train()


def pair(folder, quantized):
    """(ours, theirs) or (None, why theirs could not be built)."""
    ours = ours_lora(folder, quantized)
    try:
        return ours, theirs_lora(folder, ours, quantized)
    except Exception as err:  # bitsandbytes without a CPU backend raises its own kinds
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"


def step_ratio(ours, theirs, batch, repeats):
    """-> (loss gap, RatioSpread of ours / theirs, {side: median seconds})."""
    x, y, _ = batch[0]
    losses = [micro_batch_loss(m, x, y, None, y.numel()).item() for m in (ours, theirs)]
    steps = {n: (lambda m=m, o=idle_adamw(m): time_step(m, batch, o))
             for n, m in (("ours", ours), ("theirs", theirs))}
    times = step_times(steps, repeats)
    return abs(losses[0] - losses[1]), ratio_spread(times, "ours", "theirs"), medians(times)


def verdict(spread):
    return {True: "met", False: "not met", None: "cannot tell"}[spread.at_most(TARGET)]


def checkpoint_section(quick: bool) -> dict:
    """Print the comparison; -> {name: RatioSpread, or the loss gap} ({} when skipped)."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        print(f"6. A step at SmolLM2-135M's shape against transformers + PEFT: skipped ({err})\n")
        return {}
    cfg = shipped_config("tiny" if quick else "smollm2-135m")
    B, T, repeats = (2, 16, 3) if quick else (4, 128, 7)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(cfg.vocab_size, (B, T + 1), generator=gen)
    batch = [(ids[:, :-1], ids[:, 1:], None)]
    rows, found = [], {}
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        save_pretrained(build_model(cfg), folder)
        for name, quantized, against in (("LoRA", False, "transformers + PEFT"),
                                         ("QLoRA", True, "+ bitsandbytes 4-bit")):
            ours, theirs = pair(folder, quantized)
            if ours is None:
                rows.append([name, against, "-", "-", "-", f"skipped: {theirs}"])
                continue
            gap, spread, sec = step_ratio(ours, theirs, batch, repeats)
            found[f"{name} step / {against}"], found[f"{name} loss gap"] = spread, gap
            rows.append([name, against, f"{sec['ours']:.2f}", f"{sec['theirs']:.2f}",
                         f"{gap:.1e}", f"{spread} {verdict(spread)}"])
    print_table(f"6. One AdamW step at {'the tiny' if quick else 'SmolLM2-135M'}'s shape, "
                f"batch {B} x {T}, LoRA r = {R} on q_proj, v_proj (medians of {repeats} rounds, "
                f"taking turns; {machine_line()})", ["ours", "against", "ours s", "theirs s",
                "|loss gap|", f"ours / theirs <= {TARGET}: median [quartiles]"], rows)
    return found


if __name__ == "__main__":
    import sys
    checkpoint_section("--quick" in sys.argv[1:])
