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
import string
from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch

from .data import ADJECTIVES, ADVERBS, INTRANSITIVE, NOUNS, VERBS, encode
from .util.checks import is_whole_number

Example = Tuple[str, str]  # (prompt, answer); the answer ends with "\n"
ATBASH = str.maketrans(string.ascii_lowercase, string.ascii_lowercase[::-1])


def corpus_words(min_len: int = 3, max_len: int = 8) -> List[str]:
    """The corpus's lower-case words, deduplicated, in a fixed order."""
    words = sorted(set(NOUNS + VERBS + INTRANSITIVE + ADJECTIVES + ADVERBS))
    return [w for w in words if min_len <= len(w) <= max_len]


# Pseudo-words are built from these pieces: an onset, a vowel, sometimes a closing consonant.
_ONSETS = "b c d f g h j k l m n p r s t v w z br cl dr fl gr pl st tr sh ch".split()
_VOWELS = "a e i o u ai ea oo".split()
_CODAS = "n r s t l m k nd st".split()
LEXICON_SIZE = 1100  # 15% of it held out for testing: 165 words, >= 150 (see Task.splits)


def pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word of one to three syllables, e.g. 'brailom' or 'tesh'."""
    syllables = []
    for _ in range(rng.choice([1, 2, 2, 3])):
        coda = rng.choice(_CODAS) if rng.random() < 0.4 else ""
        syllables.append(rng.choice(_ONSETS) + rng.choice(_VOWELS) + coda)
    return "".join(syllables)


def lexicon(size: int = LEXICON_SIZE, min_len: int = 3, max_len: int = 8) -> List[str]:
    """The tasks' words: every corpus word, then pseudo-words up to `size`, in a fixed order.

    The corpus has only 240 words of 3-8 letters, which would hold out 36 for testing, and a
    test set of 36 words cannot tell 90% from 95% (each word moves the score by almost three
    points). Pseudo-words fill the list instead of more real ones because the corpus, and with
    it the base model, stays as it is; and the tasks are about characters (upper-case them,
    swap them, spell them backwards), which a made-up word exercises as well as a real one.
    All splits draw from the same mix, so train and test words are alike."""
    words = corpus_words(min_len, max_len)
    seen, rng = set(words), random.Random(2026)
    for _ in range(100 * size):
        if len(words) >= size:
            break
        word = pseudo_word(rng)
        if min_len <= len(word) <= max_len and word not in seen:
            seen.add(word)
            words.append(word)
    return words


DEFAULT_SIZES = {"train": 2000, "val": 200, "test": 200}


@dataclass(frozen=True)
class Task:
    name: str                          # also the first word of every prompt
    describe: str                      # one line for tables
    words_per_input: Tuple[int, ...]   # an input joins this many words, the count drawn evenly
    transform: Callable[[str], str]    # input text -> answer text (without newline)

    def example(self, text: str) -> Example:
        return f'{self.name} "{text}" -> "', self.transform(text) + '"\n'

    def distinct_inputs(self, n_words: int) -> int:
        """How many different inputs n_words words make: the sum of n_words ** k over k."""
        return sum(n_words ** k for k in self.words_per_input)

    def splits(self, n_train=None, n_val=None, n_test=None, seed=0) -> dict:
        """Disjoint train/val/test examples. The word list is split 70/15/15 first, and each
        split's inputs are built only from its own words, so prompts never cross splits. A size
        left as None is DEFAULT_SIZES' or, if fewer distinct inputs exist, all of them; a size
        asked for that the split's words cannot make is an error."""
        words = lexicon()
        random.Random(1234).shuffle(words)  # the word split is fixed, whatever the seed
        a, b = int(0.7 * len(words)), int(0.85 * len(words))
        pools = {"train": words[:a], "val": words[a:b], "test": words[b:]}
        asked = {"train": n_train, "val": n_val, "test": n_test}
        sizes = {split: self._size(split, asked[split], len(pools[split])) for split in pools}
        rng = random.Random(seed)
        return {split: [self.example(t) for t in self._unique_inputs(rng, pool, sizes[split])]
                for split, pool in pools.items()}

    def _size(self, split, asked, n_words):
        most = self.distinct_inputs(n_words)
        if asked is None:
            return min(DEFAULT_SIZES[split], most)
        if not is_whole_number(asked) or not 1 <= asked <= most:
            raise ValueError(f"task {self.name!r}: n_{split} must be a whole number from 1 to "
                             f"{most} (the distinct inputs its {n_words} {split} words make), "
                             f"got {asked!r}")
        return asked

    def _unique_inputs(self, rng, pool, n):
        """n different inputs; the words are dealt from the pool reshuffled each time it runs
        out, so that every word of a split is used before any is used twice."""
        deck = _dealt(rng, pool)
        seen, inputs = set(), []
        while len(inputs) < n:  # n <= distinct_inputs, so this ends
            k = rng.choice(self.words_per_input)
            text = " ".join(next(deck) for _ in range(k))
            if text not in seen:
                seen.add(text)
                inputs.append(text)
        return inputs


def _dealt(rng, pool):
    """The words of `pool` in a random order, again and again, each round reshuffled."""
    while True:
        order = list(pool)
        rng.shuffle(order)
        yield from order


TASKS = {
    "upper": Task("upper", "upper-case one or two words", (1, 2), str.upper),
    "swap": Task("swap", "swap two words", (2,), lambda t: " ".join(t.split()[::-1])),
    "reverse": Task("reverse", "spell a word backwards", (1,), lambda w: w[::-1]),
    # far from anything in the corpus: a fixed letter substitution (a <-> z, b <-> y, ...)
    "atbash": Task("atbash", "mirror each letter in the alphabet", (1,),
                   lambda w: w.translate(ATBASH)),
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


def epoch_batches(examples: List[Example], batch_size: int):
    """A get_batch for train() that goes through `examples` in epochs: each epoch a new
    order, drawn with the generator it is given, cut into len // batch_size batches (the
    remainder left out). len(examples) // batch_size steps make one epoch. The position
    within the epoch lives in the closure, not in the generator: a run resumed from a
    checkpoint draws the next epoch's order and skips the rest of the interrupted epoch, so it
    does not end where an uninterrupted run would (sample_batch's runs do)."""
    if not is_whole_number(batch_size, 1) or batch_size > len(examples):
        raise ValueError(f"epoch_batches: batch_size must be a whole number from 1 to the "
                         f"{len(examples)} examples, got {batch_size!r}")
    order, steps = [], len(examples) // batch_size

    def get_batch(generator=None):
        if not order:
            perm = torch.randperm(len(examples), generator=generator).tolist()
            order.extend(perm[i * batch_size:(i + 1) * batch_size] for i in range(steps))
        return make_batch([examples[i] for i in order.pop(0)])
    return get_batch
