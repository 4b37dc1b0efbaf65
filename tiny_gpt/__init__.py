"""The tiny GPT, its embedded data and tasks, and the one training loop."""
from .model import GPT, GPTConfig, masked_cross_entropy
from .data import ALPHABET, VOCAB_SIZE, decode, encode, get_batch, load_text, make_corpus
from .tasks import TASKS, Task, exact_match, get_task, make_batch, sample_batch
from .train import TrainConfig, TrainResult, pick_device, train

__all__ = [
    "GPT", "GPTConfig", "masked_cross_entropy", "ALPHABET", "VOCAB_SIZE", "decode", "encode",
    "get_batch", "load_text", "make_corpus", "TASKS", "Task", "exact_match", "get_task",
    "make_batch", "sample_batch", "TrainConfig", "TrainResult", "pick_device", "train",
]
