"""Pretraining the base model on the embedded corpus (or on a text file), and its cache on disk.

Every lesson after 00 starts from the same pretrained base, so it is trained once and saved as
a safetensors file whose metadata records the model config and the pretraining recipe; a cached
file made with a different recipe is not reused.
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from .data import CORPUS_VERSION, encode, get_batch, load_text, make_corpus, train_val_split
from .evaluate import validation_loss
from .model import GPT, GPTConfig
from .util.safetensors import load_file, save_file
from .train import TrainConfig, TrainResult, train


@dataclass
class PretrainRecipe:
    corpus_chars: int = 2_000_000   # size of the generated corpus
    corpus_seed: int = 0            # seed of the generated corpus
    corpus_version: int = CORPUS_VERSION  # grammar version (a cached base of another is stale)
    text_path: Optional[str] = None  # train on this UTF-8 file instead of the generated corpus
    steps: int = 1200               # optimizer steps (copying is learned at ~800: data.py)
    batch_size: int = 32            # windows per step
    seq_len: int = 128              # window length (<= block_size)
    lr: float = 4e-3                # peak learning rate
    warmup_steps: int = 50          # linear warmup steps
    eval_every: int = 100           # steps between validation-loss measurements
    eval_batches: int = 8           # batches of validation windows per measurement
    seed: int = 0                   # model init and batch order


def corpus_ids(recipe: PretrainRecipe):
    """(train ids, val ids) as 1-D long tensors, 90/10 split of the text."""
    if recipe.text_path:
        text = load_text(recipe.text_path)
    else:
        text = make_corpus(recipe.corpus_chars, recipe.corpus_seed)
    return train_val_split(torch.tensor(encode(text), dtype=torch.long))


def pretrain(recipe: PretrainRecipe, model_cfg: GPTConfig = None, device="auto",
             log_path=None, progress=True):
    """Train a fresh GPT on the corpus. Returns (model, TrainResult)."""
    model_cfg = model_cfg or GPTConfig()
    torch.manual_seed(recipe.seed)
    model = GPT(model_cfg)
    train_ids, val_ids = corpus_ids(recipe)
    cfg = TrainConfig(max_steps=recipe.steps, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
                      eval_every=recipe.eval_every, seed=recipe.seed, log_path=log_path,
                      progress=progress, restore_best=False, weight_decay=0.1)

    def batch(gen):
        x, y = get_batch(train_ids, recipe.batch_size, recipe.seq_len, gen)
        return x, y, None

    def evaluate(m):
        return {"val_loss": validation_loss(m, val_ids, recipe.seq_len, recipe.eval_batches,
                                            recipe.batch_size)}

    result = train(model, batch, cfg, evaluate, device=device)
    return model, result


def save_base(path, model: GPT, recipe: PretrainRecipe, result: TrainResult) -> None:
    meta = {"gpt_config": json.dumps(asdict(model.config)),
            "recipe": json.dumps(asdict(recipe)),
            "result": json.dumps({"steps": result.steps, "tokens": result.tokens,
                                  "wall_time": result.wall_time, "evals": result.evals})}
    save_file(model.state_dict(), path, metadata=meta)


def load_base(path, recipe: PretrainRecipe = None, device="cpu"):
    """Load a saved base. With a recipe, return None if the file was made with another one.
    Returns (model, info dict with the recipe and the pretraining result) or None."""
    if not Path(path).exists():
        return None
    tensors, meta = load_file(path)
    if recipe is not None and json.loads(meta.get("recipe", "{}")) != asdict(recipe):
        return None
    model = GPT(GPTConfig(**json.loads(meta["gpt_config"])))
    model.load_state_dict(tensors)
    info = {"recipe": json.loads(meta["recipe"]), "result": json.loads(meta["result"])}
    return model.to(device), info
