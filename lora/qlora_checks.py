"""Measuring a QLoRA model: the dequant-matmul against the dense path, bytes of a 4-bit base,
and how far each way of shipping the adapter moves the trained weights.

Lesson 06 prints these; each is a plain function of modules and tensors:

- ``dequant_matmul_parity``: DequantMatmul's output and gradients next to autograd through the
  dense dequantized weight, in float64, plus torch's gradcheck;
- ``base_bytes`` / ``linear_bytes``: stored bytes of the linear weights and of the whole model,
  fp32 / bf16 / NF4, and what the linear layers hold in memory besides;
- ``weight_of`` / ``rel_distance``: the effective float weight of a layer, and the relative
  Frobenius distance between lists of weights (the share of 4-bit codes that re-quantizing
  changes is quant.analysis.codes_changed);
- ``shipped_models`` / ``shipping_errors`` / ``merge_findings``: the ways to ship the
  fine-tune as one set of weights, how far each moves from the model as trained, and what that
  says of the float merge and of re-quantizing;
- ``nf4_lm_losses``, ``forward_backward_medians``, ``reload_gap``: the 4-bit base as a language
  model, the time of a step, an adapter re-loaded onto a fresh 4-bit base.
"""
import copy

import torch
import torch.nn as nn

from quant import DequantMatmul, Linear4bit, codes_changed, quantize_model, quantize_nf4
from tiny_gpt import exact_match
from tiny_gpt.evaluate import validation_loss
from tiny_gpt.memory.ledger import tensor_bytes
from tiny_gpt.util.timing import round_robin_medians

from .export import dequantized_float_model
from .inject import disable_adapters, lora_layers, merge_lora
from .io import load_adapter
from .layer import LoRALinear


def dequant_matmul_parity(linear, seed=0, shape=(2, 2)):
    """DequantMatmul(x, NF4(W), b) next to y = x W_deq^T + b with W_deq a float64 tensor.

    -> (gradcheck passed, [max |diff| of y, dL/dx, dL/db], number of floats in the dense dL/dW
    that the 4-bit path never forms). Both paths multiply the same float64 values in the same
    order, so the differences are float64 rounding; dL/dy is a random probe."""
    q = quantize_nf4(linear.weight.detach().cpu())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, linear.in_features, generator=gen,
                    dtype=torch.float64).requires_grad_()
    b = linear.bias.detach().cpu().double().requires_grad_()
    ok = torch.autograd.gradcheck(lambda x, b: DequantMatmul.apply(x, q, b), (x, b))
    probe = torch.randn(*shape, linear.out_features, generator=gen, dtype=torch.float64)
    y4 = DequantMatmul.apply(x, q, b)
    w = q.dequantize(torch.float64).requires_grad_()  # the dense path: W as a float tensor
    yd = x @ w.T + b
    grads4 = torch.autograd.grad((y4 * probe).sum(), (x, b))
    gxd, gbd, gwd = torch.autograd.grad((yd * probe).sum(), (x, b, w))
    diffs = [(u - v).abs().max().item() for u, v in zip((y4, *grads4), (yd, gxd, gbd))]
    return ok, diffs, gwd.numel()


def base_bytes(base, nf4_model):
    """Stored bytes of a float base and of its 4-bit copy -> (linear, whole, tables, counts).

    linear: {"fp32", "bf16", "NF4"} bytes of the nn.Linear weights alone (NF4: codes, scales and
    code book from each Linear4bit's state dict, its bias left out); whole: the same for every
    tensor of the model (NF4 model: the rest stays fp32); tables: bytes of the buffers a
    Linear4bit holds besides what it stores (look-up tables derived from its code book);
    counts: {"layers": nn.Linear layers, "linear": their weights' elements, "all": the base's
    parameters}. tensor_bytes counts each storage once."""
    linears = [m for m in base.modules() if isinstance(m, nn.Linear)]
    n_lin = sum(m.weight.numel() for m in linears)
    q4 = [m for m in nf4_model.modules() if isinstance(m, Linear4bit)]
    linear = {"fp32": 4 * n_lin, "bf16": 2 * n_lin,
              "NF4": tensor_bytes(t for m in q4 for name, t in m.state_dict().items()
                                  if name != "bias")}
    whole = {"fp32": tensor_bytes(base.state_dict().values()),
             "bf16": tensor_bytes(copy.deepcopy(base).bfloat16().state_dict().values()),
             "NF4": tensor_bytes(nf4_model.state_dict().values())}
    tables = tensor_bytes(t for m in q4 for t in m.buffers()) - linear["NF4"]
    counts = {"layers": len(linears), "linear": n_lin,
              "all": sum(p.numel() for p in base.parameters())}
    return linear, whole, tables, counts


def weight_of(module):
    """Float (out, in) weight of an nn.Linear, a Linear4bit (dequantized) or a LoRALinear's base
    (which holds W + sBA once merged)."""
    module = module.base if isinstance(module, LoRALinear) else module
    if isinstance(module, Linear4bit):
        return module.dequantized_weight(torch.float32)
    return module.weight.detach()


def rel_distance(weights, reference):
    """sqrt(sum_k |W_k - R_k|_F^2 / sum_k |R_k|_F^2): the Frobenius distance of a list of layers
    taken together, relative to the reference's norm."""
    num = sum((w - r).pow(2).sum() for w, r in zip(weights, reference))
    return (num / sum(r.pow(2).sum() for r in reference)).sqrt().item()


@torch.no_grad()
def logits(model, x):
    """The model's logits on token ids x, in eval mode -> (batch, time, vocab)."""
    return model.eval()(x)[0]


def shipped_models(base, qlora_model, adapter_dir):
    """The ways to ship a QLoRA fine-tune as one set of weights -> {"float": the adapter merged
    into a float copy of W_deq, "requant": that copy quantized to NF4 again, "fp32": the saved
    adapter merged into the fp32 original W0}."""
    float_model = dequantized_float_model(qlora_model)
    return {"float": float_model, "requant": quantize_model(copy.deepcopy(float_model)),
            "fp32": merge_lora(load_adapter(copy.deepcopy(base), adapter_dir))}


def shipping_errors(qlora_model, shipped, x, test, device):
    """For the QLoRA model as trained, each model of ``shipped_models`` and the QLoRA model with
    its adapter disabled -> {key: {"acc": exact match on ``test``, "diff": max |logits - the
    QLoRA model's| on x, "dist": rel_distance of its adapted layers' weights from W_deq + sBA}}.
    Keys: "trained", the keys of ``shipped``, "disabled"."""
    paths = [p for p, _ in lora_layers(qlora_model)]
    trained = [weight_of(shipped["float"].get_submodule(p)) for p in paths]  # W_deq + s B A
    ref = logits(qlora_model, x)

    def measure(model, weights=None):  # weights: the adapted layers' (default: weight_of)
        weights = weights or [weight_of(model.get_submodule(p)) for p in paths]
        return {"acc": exact_match(model, test, device),
                "diff": (logits(model, x) - ref).abs().max().item(),
                "dist": rel_distance(weights, trained)}

    found = {"trained": measure(qlora_model, trained)}  # unmerged: its weights are W_deq + sBA
    found.update({key: measure(model) for key, model in shipped.items()})
    with disable_adapters(qlora_model):  # weight_of an unmerged LoRALinear: W_deq
        found["disabled"] = measure(qlora_model)
    return found


def merge_findings(qlora_model, shipped, found, x):
    """What shipping_errors' ``found`` says of the merges -> (rel, changed, err_ratio):

        rel       = max |logits(float merge) - logits(QLoRA)| / max |logits(QLoRA)|  on x
        changed   = share of the adapted layers' 4-bit codes that re-quantizing changes
        err_ratio = dist(re-quantized) / dist(fp32 merge)

    The fp32 merge's distance is |(W0 + sBA) - (W_deq + sBA)| / |W_deq + sBA| = the base's own
    NF4 error |W0 - W_deq| in the same units, so err_ratio is re-quantizing's rounding error
    measured against the error NF4 already made once."""
    rel = found["float"]["diff"] / logits(qlora_model, x).abs().max().item()
    changed = codes_changed([(shipped["requant"].get_submodule(p), layer.base)
                             for p, layer in lora_layers(qlora_model)])
    return rel, changed, found["requant"]["dist"] / found["fp32"]["dist"]


def nf4_lm_losses(base, val_ids, seq_len, n_batches, batch_size):
    """Validation loss of the base with its linear weights in fp32, in NF4, and in NF4 with
    double-quantized scales -> ({name: loss}, the NF4 + double quant model)."""
    models = {"fp32": base, "NF4": quantize_model(copy.deepcopy(base), double_quant=False),
              "NF4 + double quant": quantize_model(copy.deepcopy(base))}
    losses = {k: validation_loss(m.eval(), val_ids, seq_len, n_batches, batch_size)
              for k, m in models.items()}
    return losses, models["NF4 + double quant"]


def forward_backward_medians(models, batch, repeats):
    """{name: model} -> {name: median seconds of forward + backward on batch = (x, y, mask)},
    the models taking turns (round_robin_medians) so that a busy machine slows them alike.
    Gradients are dropped afterwards."""
    x, y, mask = batch
    found = round_robin_medians(
        {m: (lambda model=model: model(x, y, mask)[1].backward()) for m, model in models.items()},
        repeats=repeats)
    for model in models.values():
        model.zero_grad(set_to_none=True)  # timing left gradients behind
    return found


def reload_gap(model, base, adapter_dir, x):
    """The adapter in ``adapter_dir`` loaded onto a freshly quantized copy of ``base``, next to
    ``model`` -> (logits identical, max |logit diff|) on token ids x."""
    fresh = load_adapter(quantize_model(copy.deepcopy(base)), adapter_dir)
    before, after = logits(model, x), logits(fresh, x)
    return torch.equal(before, after), (before - after).abs().max().item()


def linear_bytes(model):
    """Bytes of a model's linear layers, float (nn.Linear) or 4-bit (Linear4bit) -> (stored:
    what their state dicts hold -- weights or codes, scales, code books, biases; held: every
    parameter and buffer they keep in memory, look-up tables rebuilt from the code books
    included). tensor_bytes counts each storage once."""
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, Linear4bit))]
    stored = tensor_bytes(t for m in linears for t in m.state_dict().values())
    held = tensor_bytes(t for m in linears for t in [*m.parameters(), *m.buffers()])
    return stored, held
