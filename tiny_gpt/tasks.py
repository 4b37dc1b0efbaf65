"""Fine-tuning tasks: generators of ``prompt -> answer`` lines, their batches and their score.

Each example is one line, e.g. ``upper "red cat" -> "RED CAT"`` and a newline: the prompt is
``upper "red cat" -> "`` and the answer ``RED CAT"`` plus the newline, which teaches the model to
stop. The input is quoted the way the corpus quotes speech, whose echoes are where the base
model first saw text repeated. The loss is taken on the answer tokens only, and a model is
scored by exact match of its greedy completion on prompts it never trained on: the words are
split into train / validation / test before any example is made, so no prompt is shared
between splits.
"""
import random
from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch

from .data import ADJECTIVES, ADVERBS, INTRANSITIVE, NOUNS, VERBS, encode

Example = Tuple[str, str]  # (prompt, answer); the answer ends with "\n"


def lexicon(min_len: int = 3, max_len: int = 8) -> List[str]:
    """The corpus's lower-case words, deduplicated, in a fixed order."""
    words = sorted(set(NOUNS + VERBS + INTRANSITIVE + ADJECTIVES + ADVERBS))
    return [w for w in words if min_len <= len(w) <= max_len]


@dataclass(frozen=True)
class Task:
    name: str                          # also the first word of every prompt
    describe: str                      # one line for tables
    make_input: Callable               # (rng, words) -> input text
    transform: Callable[[str], str]    # input text -> answer text (without newline)

    def example(self, text: str) -> Example:
        return f'{self.name} "{text}" -> "', self.transform(text) + '"\n'

    def splits(self, n_train=2000, n_val=200, n_test=200, seed=0) -> dict:
        """Disjoint train/val/test examples. The word list is split 70/15/15 first, and each
        split's inputs are built only from its own words, so prompts never cross splits."""
        words = lexicon()
        random.Random(1234).shuffle(words)  # the word split is fixed, whatever the seed
        a, b = int(0.7 * len(words)), int(0.85 * len(words))
        pools = {"train": words[:a], "val": words[a:b], "test": words[b:]}
        sizes = {"train": n_train, "val": n_val, "test": n_test}
        rng = random.Random(seed)
        out = {}
        for split, pool in pools.items():
            inputs = self._unique_inputs(rng, pool, sizes[split])
            out[split] = [self.example(t) for t in inputs]
        return out

    def _unique_inputs(self, rng, pool, n):
        seen, inputs = set(), []
        for _ in range(50 * n):
            text = self.make_input(rng, pool)
            if text not in seen:
                seen.add(text)
                inputs.append(text)
                if len(inputs) == n:
                    break
        return inputs


def _one_word(rng, pool):
    return rng.choice(pool)


def _two_words(rng, pool):
    return f"{rng.choice(pool)} {rng.choice(pool)}"


def _one_or_two_words(rng, pool):
    return _one_word(rng, pool) if rng.random() < 0.5 else _two_words(rng, pool)


TASKS = {
    "upper": Task("upper", "upper-case one or two words", _one_or_two_words, str.upper),
    "swap": Task("swap", "swap two words", _two_words, lambda t: " ".join(t.split()[::-1])),
    "reverse": Task("reverse", "spell a word backwards", _one_word, lambda w: w[::-1]),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(TASKS)}")
    return TASKS[name]


def make_batch(examples: List[Example], pad_id: int = 0):
    """Right-padded (x, y, loss_mask), each (B, T). x = line[:-1], y = line[1:]; the mask is 1
    exactly on the targets that are answer tokens (never on prompt tokens or padding)."""
    lines = [encode(p + a) for p, a in examples]
    T = max(len(l) for l in lines) - 1
    x = torch.full((len(lines), T), pad_id, dtype=torch.long)
    y = torch.full((len(lines), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lines), T), dtype=torch.long)
    for row, ((prompt, _), ids) in enumerate(zip(examples, lines)):
        n = len(ids) - 1
        x[row, :n] = torch.tensor(ids[:-1])
        y[row, :n] = torch.tensor(ids[1:])
        mask[row, len(prompt) - 1: n] = 1  # y[t] is token t+1: answer starts at len(prompt)
    return x, y, mask


def sample_batch(examples: List[Example], batch_size: int, generator=None):
    picks = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
    return make_batch([examples[i] for i in picks])
