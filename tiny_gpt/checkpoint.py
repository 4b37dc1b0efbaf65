"""Training checkpoints on disk: model, optimizer, step and RNG state in one safetensors file.

Everything that decides what happens next in training is stored, so a resumed run continues
with exactly the losses an uninterrupted run would have had. The file is written atomically and
read without pickle: tensors by name, everything else as JSON in the metadata.

Names inside the file:
    model.<parameter or buffer name>   the model's state dict
    optim.<i>.<key>                    optimizer state of the i-th trainable parameter
    rng.torch, rng.batch, rng.cuda     torch's global generator, the batch generator, CUDA's
    metadata "trainer"                 JSON: step, optimizer param groups, best score so far...
"""
import json

import torch

from .util.safetensors import SafetensorsError, load_file, save_file


def save_checkpoint(path, model, optimizer, batch_gen: torch.Generator, state: dict) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for i, st in opt["state"].items():
        for key, value in st.items():
            if value is not None:  # e.g. SGD without momentum keeps momentum_buffer=None
                tensors[f"optim.{i}.{key}"] = torch.as_tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.batch"] = batch_gen.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    trainer = dict(state, param_groups=opt["param_groups"])
    save_file(tensors, path, metadata={"trainer": json.dumps(trainer)})


def load_checkpoint(path, model, optimizer, batch_gen: torch.Generator) -> dict:
    """Restore everything save_checkpoint wrote; returns the trainer state dict (step, ...)."""
    tensors, metadata = load_file(path)
    if "trainer" not in metadata:
        raise SafetensorsError(f"{path}: not a training checkpoint (no 'trainer' metadata)")
    trainer = json.loads(metadata["trainer"])
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(model_sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match this model; missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    optimizer.load_state_dict(_optimizer_state(tensors, trainer.pop("param_groups")))
    torch.set_rng_state(tensors["rng.torch"])
    batch_gen.set_state(tensors["rng.batch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return trainer


def _optimizer_state(tensors, param_groups):
    state = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = value
    return {"state": state, "param_groups": param_groups}
