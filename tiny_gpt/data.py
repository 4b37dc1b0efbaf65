"""The embedded pretraining corpus, the character tokenizer, and random-window batching.

The corpus is generated in code from a small grammar and word lists written for this project,
so nothing is downloaded and every run with the same seed sees the same text. Any UTF-8 file
can be used instead (``load_text``), as long as its characters are in the alphabet.
"""
import random
from pathlib import Path

import torch

# The alphabet: newline and the 95 printable ASCII characters (space .. '~'). Fixed, so that
# every task's text encodes with the same vocabulary as the base model.
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE = len(ALPHABET)  # 96
_CHAR_TO_ID = {ch: i for i, ch in enumerate(ALPHABET)}


def encode(text: str) -> list:
    """Text -> token ids. An unknown character is an error that names it and its position."""
    ids = []
    for pos, ch in enumerate(text):
        tok = _CHAR_TO_ID.get(ch)
        if tok is None:
            raise ValueError(
                f"character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in the alphabet "
                "(printable ASCII and newline)")
        ids.append(tok)
    return ids


def decode(ids) -> str:
    """Token ids -> text. An id outside 0 .. VOCAB_SIZE - 1 is an error that names it."""
    chars = []
    for pos, i in enumerate(ids):
        i = int(i)
        if not 0 <= i < len(ALPHABET):
            raise ValueError(f"token id {i} at position {pos} is outside the vocabulary "
                             f"0..{len(ALPHABET) - 1}")
        chars.append(ALPHABET[i])
    return "".join(chars)


# ---------------------------------------------------------------------------------------------
# The grammar. Word lists are public so that the fine-tuning tasks can draw words from them.

NOUNS = """cat dog bird fish horse mouse rabbit fox wolf bear lion tiger frog snake goat sheep
cow duck owl crow eagle whale shark crab bee ant girl boy man woman child king queen farmer
baker teacher doctor sailor pilot singer painter student friend mother father sister brother
river forest mountain garden field valley island desert ocean lake city village house castle
tower bridge road street market school library kitchen window door table chair bed lamp clock
book letter story song poem picture map key box basket bottle cup plate bread apple cheese
cake soup tea milk honey stone flower tree leaf seed rain snow wind storm cloud star moon sun
fire light shadow dream secret ship boat train wagon bicycle drum flute violin ring coin""".split()
VERBS = """sees likes loves helps follows watches carries keeps paints draws builds opens
closes reads writes sings hears knows meets visits calls finds takes brings holds wants needs
chases catches feeds cleans moves pushes pulls lifts throws counts remembers forgets""".split()
INTRANSITIVE = """sleeps runs jumps swims laughs sings waits dances walks rests smiles listens
works plays wanders falls grows shines""".split()
ADJECTIVES = """big small old young happy sad quick slow bright dark quiet loud warm cold soft hard
green red blue yellow white black brown golden silver tall short kind brave clever gentle wild
busy lazy hungry sleepy strange famous little heavy light round sharp empty full""".split()
ADVERBS = """slowly quickly quietly loudly happily sadly gently often never always soon again
together alone early late""".split()
NAMES = """Anna Ben Clara David Ella Frank Grace Henry Iris Jack Kate Leo Mia Noah Olga Paul
Rosa Sam Tina Victor""".split()
PLACES = """in the garden|near the river|by the window|under the tree|on the hill|at the market|in
the forest|across the bridge|behind the house|inside the castle""".replace("\n", " ").split("|")
NUMBERS = "two three four five six seven eight nine ten".split()


def _noun_phrase(rng):
    roll = rng.random()
    if roll < 0.15:
        return rng.choice(NAMES)
    det = rng.choice(["the", "the", "a", "my", "our", "that"])
    if det == "a" and roll < 0.6:
        adj = rng.choice(ADJECTIVES)
        det = "an" if adj[0] in "aeiou" else "a"
        return f"{det} {adj} {rng.choice(NOUNS)}"
    if det == "a":
        noun = rng.choice(NOUNS)
        return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
    if roll < 0.5:
        return f"{det} {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    return f"{det} {rng.choice(NOUNS)}"


CORPUS_VERSION = 4  # bump whenever the grammar changes, so cached base models are retrained
# Fraction of sentences that echo earlier words (see _repetition). Copying from the context is
# learned in a sudden jump ("induction heads", Olsson et al. 2022), late in a short run: with
# 0.35 the tiny GPT had not learned it after 1,600 steps at lr 2e-3, with 0.6 (and lr 4e-3) it
# has by step ~800 of 1,200, measured as the loss on the second copy of a made-up word.
REPETITION_SHARE = 0.6


def _clause(rng):
    """Something to quote: half the time a short lower-case clause, half the time a made-up
    word of random letters. A made-up word cannot be guessed from the grammar, only copied
    from earlier in the context -- that is what pushes the model to learn to copy."""
    roll = rng.random()
    if roll < 0.5:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
    if roll < 0.75:
        return f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    return f"the {rng.choice(NOUNS)} {rng.choice(VERBS + INTRANSITIVE)}"


def _repetition(rng):
    """Sentences that repeat earlier words, verbatim, in capitals or in another order. Real
    text is full of such echoes; they are where a model learns to copy from its context, the
    skill that the fine-tuning tasks later redirect."""
    a, b, quote = rng.choice(NAMES), rng.choice(NAMES), _clause(rng)
    kind = rng.randrange(3)
    if kind == 0:
        return f'{a} says "{quote}" and {b} says "{quote}" too.'
    if kind == 1:
        return f'{a} reads "{quote}" and shouts "{quote.upper()}!"'
    x, y = rng.choice(NOUNS), rng.choice(NOUNS)
    return f"{a} likes {x}s and {y}s, or {y}s and {x}s?"


def _sentence(rng):
    """One sentence from a handful of templates."""
    if rng.random() < REPETITION_SHARE:
        return _repetition(rng)
    kind = rng.random()
    subj = _noun_phrase(rng)
    if kind < 0.35:
        s = f"{subj} {rng.choice(VERBS)} {_noun_phrase(rng)}"
    elif kind < 0.55:
        s = f"{subj} {rng.choice(INTRANSITIVE)} {rng.choice(ADVERBS)}"
    elif kind < 0.7:
        s = f"{subj} {rng.choice(VERBS)} {_noun_phrase(rng)} {rng.choice(PLACES)}"
    elif kind < 0.8:
        s = f"{subj} has {rng.choice(NUMBERS)} {rng.choice(NOUNS)}s"
    elif kind < 0.9:
        s = f"{subj} is {rng.choice(ADJECTIVES)} and {rng.choice(ADJECTIVES)}"
    else:
        verb = rng.choice(VERBS)
        return f"Who {verb} {_noun_phrase(rng)}? {subj.capitalize()} does."
    return s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!"])


def make_corpus(n_chars: int = 1_000_000, seed: int = 0) -> str:
    """Deterministic English-like text: paragraphs of 2-6 sentences, blank line between."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_chars:
        para = " ".join(_sentence(rng) for _ in range(rng.randint(2, 6))) + "\n\n"
        parts.append(para)
        size += len(para)
    return "".join(parts)[:n_chars]


def load_text(path) -> str:
    """Read a user's UTF-8 text file and check that it encodes (raises on unknown chars);
    every error names the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such text file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: byte {e.object[e.start]:#04x} at byte "
                         f"offset {e.start}") from None
    if not text:
        raise ValueError(f"{path} is empty")
    try:
        encode(text)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return text


def train_val_split(ids: torch.Tensor, val_fraction: float = 0.1):
    """Split a 1-D token tensor into a training head and a validation tail."""
    n_val = int(len(ids) * val_fraction)
    return ids[: len(ids) - n_val], ids[len(ids) - n_val:]


def get_batch(ids: torch.Tensor, batch_size: int, block_size: int, generator=None):
    """Random windows: x = ids[i : i+T], y = ids[i+1 : i+T+1] for batch_size random starts."""
    if len(ids) <= block_size:
        raise ValueError(f"text of {len(ids)} tokens is too short for block_size {block_size}")
    starts = torch.randint(len(ids) - block_size, (batch_size,), generator=generator)
    offsets = torch.arange(block_size)
    x = ids[starts[:, None] + offsets]      # (B, T)
    y = ids[starts[:, None] + offsets + 1]  # (B, T)
    return x, y
