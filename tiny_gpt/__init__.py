"""The tiny GPT, its embedded data and tasks, the one training loop, and the tools around it.

    model.py       the GPT (GPTConfig, GPT, masked_cross_entropy)
    data.py        the generated corpus, the character tokenizer, batches of text
    tasks.py       the fine-tuning tasks: prompt -> answer examples and their batches
    train.py       the one training loop (accumulation, clipping, schedule, early stopping)
    finetune.py    the loop fed with task batches; pretrain.py the base model and its cache
    checkpoint.py  training state on disk; evaluate.py exact match, losses and drift

Subpackages: ``memory/`` (the memory ledger, CPU offload, gradient checkpointing, fp16 loss
scaling), ``methods/`` (adapter tuning and prefix tuning, the methods LoRA is compared with),
``util/`` (plumbing: safetensors files, timing, finite differences, module selection, torch
version differences), ``pretrained/`` (real checkpoints: the Llama family and GPT-2 by hand,
and the loader of Hugging Face folders). Nothing here imports ``lora``, ``quant`` or ``lessons``.
"""
from .model import GPT, GPTConfig, masked_cross_entropy
from .data import ALPHABET, VOCAB_SIZE, decode, encode, get_batch, load_text, make_corpus
from .tasks import TASKS, Task, get_task, make_batch, sample_batch
from .evaluate import exact_match
from .train import TrainConfig, TrainResult, pick_device, train

__all__ = [
    "GPT", "GPTConfig", "masked_cross_entropy", "ALPHABET", "VOCAB_SIZE", "decode", "encode",
    "get_batch", "load_text", "make_corpus", "TASKS", "Task", "exact_match", "get_task",
    "make_batch", "sample_batch", "TrainConfig", "TrainResult", "pick_device", "train",
]
