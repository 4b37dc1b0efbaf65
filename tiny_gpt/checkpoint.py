"""Training checkpoints on disk: model, optimizer, loss scaler, step, RNG state and the best
weights so far, in one safetensors file.

Everything that decides what happens next in training is stored, so a resumed run continues
with exactly the losses -- and ends with exactly the weights -- of an uninterrupted run. The
file is written atomically and read without pickle: tensors by name, everything else as JSON
in the metadata. A checkpoint is checked against the model and optimizer before anything is
loaded, so one made for another model changes nothing.

Names inside the file:
    model.<parameter or buffer name>   the model's state dict
    optim.<i>.<key>                    optimizer state of the i-th trainable parameter
    best.<parameter name>              the best validated trainable weights (if tracked)
    rng.torch, rng.batch, rng.cuda     torch's global generator, the batch generator, CUDA's
    metadata "trainer"                 JSON: step, the optimizer's class and param groups,
                                       best score so far, the loss scaler's state (fp16)...
"""
import json

import torch

from .util.safetensors import SafetensorsError, load_file, save_file


def save_checkpoint(path, model, optimizer, batch_gen: torch.Generator, state: dict,
                    best_weights: dict = None, scaler=None) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for i, st in opt["state"].items():
        for key, value in st.items():
            if value is not None:  # e.g. SGD without momentum keeps momentum_buffer=None
                tensors[f"optim.{i}.{key}"] = torch.as_tensor(value)
    tensors.update({f"best.{k}": v for k, v in (best_weights or {}).items()})
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.batch"] = batch_gen.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    trainer = dict(state, param_groups=opt["param_groups"], optimizer=type(optimizer).__name__)
    if scaler is not None:
        trainer["scaler"] = scaler.state_dict()
    save_file(tensors, path, metadata={"trainer": json.dumps(trainer)})


def load_checkpoint(path, model, optimizer, batch_gen: torch.Generator, scaler=None):
    """Restore everything save_checkpoint wrote. Returns (trainer state dict, best weights or
    None). Nothing is changed unless the whole checkpoint fits the model and optimizer."""
    tensors, metadata = load_file(path)
    if "trainer" not in metadata:
        raise SafetensorsError(f"{path}: not a training checkpoint (no 'trainer' metadata)")
    trainer = json.loads(metadata["trainer"])
    model_sd = _section(tensors, "model.")
    best = _section(tensors, "best.") or None
    _check_fits(path, model, model_sd, best, optimizer, trainer, scaler)
    model.load_state_dict(model_sd)
    trainer.pop("optimizer", None)  # checked above; not part of the run's state
    optimizer.load_state_dict(_optimizer_state(tensors, trainer.pop("param_groups")))
    if scaler is not None:
        scaler.load_state_dict(trainer.pop("scaler"))
    torch.set_rng_state(tensors["rng.torch"])
    batch_gen.set_state(tensors["rng.batch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return trainer, best


def _section(tensors, prefix):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_fits(path, model, model_sd, best, optimizer, trainer, scaler):
    """Raise ValueError, before anything is loaded, if the checkpoint is for another model,
    another set of trainable parameters, or another precision."""
    expected = model.state_dict()
    wrong = sorted(k for k in set(model_sd) & set(expected)
                   if model_sd[k].shape != expected[k].shape)
    missing = sorted(set(expected) - set(model_sd))
    unexpected = sorted(set(model_sd) - set(expected))
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: checkpoint does not match this model; missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, other shape {wrong[:5]}")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if best is not None and (set(best) != set(trainable) or
                             any(best[n].shape != trainable[n].shape for n in best)):
        raise ValueError(f"{path}: the checkpoint's best weights are not this model's "
                         f"trainable parameters ({sorted(best)[:3]} vs {sorted(trainable)[:3]})")
    _check_optimizer_kind(path, optimizer, trainer)
    saved = [len(g["params"]) for g in trainer["param_groups"]]
    if saved != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError(f"{path}: the checkpoint's optimizer holds {saved} parameters per "
                         f"group, this one {[len(g['params']) for g in optimizer.param_groups]}")
    if (scaler is None) != ("scaler" not in trainer):
        saved_with = "with" if "scaler" in trainer else "without"
        raise ValueError(f"{path}: the checkpoint was saved {saved_with} a loss scaler (fp16); "
                         "resume with the precision it was trained in")


def _check_optimizer_kind(path, optimizer, trainer):
    """The optimizer's state means nothing to another kind (SGD's momentum buffer is not AdamW's
    moments). The class name is in the file; a file without it is judged by its groups'
    hyper-parameters: AdamW's have "betas", SGD's have "momentum" and no "betas"."""
    ours = type(optimizer).__name__
    saved = trainer.get("optimizer")
    if saved is None:
        has_betas = ["betas" in g for g in trainer["param_groups"]]
        if any(has_betas) != ("betas" in optimizer.param_groups[0]):
            saved = "an optimizer " + ("with" if any(has_betas) else "without") + " betas"
    if saved is not None and saved != ours:
        raise ValueError(f"{path}: the checkpoint holds the state of {saved}, this run uses "
                         f"{ours}; resume with the optimizer it was trained with "
                         "(TrainConfig.optimizer)")


def _optimizer_state(tensors, param_groups):
    state = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = value
    return {"state": state, "param_groups": param_groups}
