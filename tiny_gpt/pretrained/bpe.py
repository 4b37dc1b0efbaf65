"""Byte-level BPE, the algorithm: from a piece of text to token ids.

GPT-2, Llama 3, SmolLM/SmolLM2 and Qwen2/2.5 all tokenize the same way:

    text --pre-tokenizer--> pieces  ("Hello", " world", "!!", "\\n\\n")
         --UTF-8, byte map--> each piece as symbols, one per byte ("Ġworld")
         --BPE merges, lowest rank first--> vocabulary entries ("Ġworld") --> ids

The pre-tokenizer's regular expression keeps merges from crossing word, number and space
boundaries; it is written for a regex engine with Unicode classes (\\p{L}, \\p{N}), which the
standard library's `re` lacks, so `to_stdlib_re` rewrites it (see there for what it uses).
tokenizer.py reads these parts out of a tokenizer.json file and adds what surrounds them.
"""
import functools
import re
import sys
import unicodedata


class TokenizerFileError(ValueError):
    """A tokenizer file that cannot be read as byte-level BPE; the message says what and why."""


SUPPORTED = "supported: byte-level BPE as GPT-2, Llama 3, SmolLM/SmolLM2 and Qwen2/2.5 store it"
SENTENCEPIECE = ("SentencePiece-style BPE (byte_fallback, '▁' for spaces, as Llama 2 and "
                 "TinyLlama store it) is not supported; " + SUPPORTED)


def section(spec: dict, name: str, allowed: tuple) -> list:
    """The steps of a normalizer / pre-tokenizer / post-processor / decoder section, a Sequence
    flattened; a step whose type is not in `allowed` is refused by name."""
    if spec is None:
        return []
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "Sequence":
        inner = next((spec[k] for k in ("normalizers", "pretokenizers", "processors", "decoders")
                      if k in spec), None)
        return [step for s in inner or [] for step in section(s, name, allowed)]
    if kind not in allowed:
        hint = SENTENCEPIECE if kind in ("Metaspace", "Prepend", "Replace", "ByteFallback",
                                         "Fuse", "Strip") else f"supported: {', '.join(allowed)}"
        raise TokenizerFileError(f"{name} {kind!r} is not supported; {hint}")
    return [spec]


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict:
    """{byte: character}, GPT-2's map from each of the 256 byte values to a printable character.

    Why it exists: BPE runs on bytes, but the vocabulary and merges are stored as JSON text, and
    "a b" merge lines use the space as separator. A byte that is a control code, white space or
    half of a UTF-8 character cannot stand in such text as itself. So the printable Latin-1 bytes
    ('!'..'~', '¡'..'¬', '®'..'ÿ', 188 of them) keep their own character, and the other 68 get
    the characters 256, 257, ... in byte order: the space (byte 32) becomes 'Ġ' (256 + 32),
    the newline (byte 10) becomes 'Ċ' (256 + 10).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return mapping


def to_byte_symbols(piece: str) -> str:
    """The piece's UTF-8 bytes, each written as its byte-map character."""
    byte_map = bytes_to_unicode()
    return "".join(byte_map[b] for b in piece.encode("utf-8"))


# -- the pre-tokenizer's pattern, in the standard library's `re` ------------------------------

# Unicode's White_Space property (PropList.txt), which \s means to the regex engine tokenizers
# uses. Python's \s differs: it also matches \x1c-\x1f (str.isspace() is True for them).
WHITE_SPACE = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"

# GPT-2's pattern: the ByteLevel pre-tokenizer's own split when use_regex is true.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@functools.lru_cache(maxsize=None)
def category_runs() -> tuple:
    """((first, last, category), ...): the code points as runs of one Unicode general category
    ("Lu", "Nd", ...), read once from unicodedata (one pass over 1.1M code points, ~0.5 s)."""
    runs, start, current = [], 0, unicodedata.category(chr(0))
    for point in range(1, sys.maxunicode + 1):
        category = unicodedata.category(chr(point))
        if category != current:
            runs.append((start, point - 1, current))
            start, current = point, category
    return tuple(runs + [(start, sys.maxunicode, current)])


@functools.lru_cache(maxsize=None)
def category_class(category: str) -> str:
    """The inside of a `re` character class holding every code point whose general category
    starts with `category` ("L": letters, "N": numbers, "Lu": upper-case letters), as ranges
    "\\Uxxxxxxxx-\\Uyyyyyyyy"."""
    ranges = []
    for first, last, name in category_runs():
        if not name.startswith(category):
            continue
        if ranges and ranges[-1][1] == first - 1:  # adjacent runs ("Lu" then "Ll") join
            first = ranges.pop()[0]
        ranges.append((first, last))
    if not ranges:
        raise TokenizerFileError(f"\\p{{{category}}}: no Unicode general category of that name")
    return "".join(f"\\U{a:08x}" + (f"-\\U{b:08x}" if b > a else "") for a, b in ranges)


def _escape_to_stdlib(escape: str, in_class: bool) -> str:
    r"""One escape of the pattern (\p{L}, \s, \n, ...) in `re`'s terms."""
    match = re.fullmatch(r"\\([pP])(?:\{(\w+)\}|(\w))", escape)
    if match:
        inside = category_class(match[2] or match[3])
    elif escape in (r"\s", r"\S"):
        inside = WHITE_SPACE
    elif escape[1] in "rntfv" or not escape[1].isalnum():  # \n, \t, \', \[ ... mean the same
        return escape
    else:
        raise TokenizerFileError(f"pre-tokenizer pattern: the escape {escape} is not supported "
                                 r"(supported: \p{..}, \P{..}, \s, \S, \r, \n, \t, \f, \v)")
    negated = escape[1] in "PS"
    if in_class and negated:
        raise TokenizerFileError(f"pre-tokenizer pattern: {escape} inside [...] is not supported")
    if in_class:
        return inside
    return f"[^{inside}]" if negated else f"[{inside}]"


def to_stdlib_re(pattern: str) -> "re.Pattern":
    r"""The pre-tokenizer's pattern compiled by the standard library's `re`.

    `re` has no \p{L} or \p{N}. The usual stand-ins, [^\W\d_] for letters and \d for numbers,
    are wrong on real text: [^\W\d_] also takes numbers that are not decimal digits ('½', '²',
    'Ⅻ', '①') as letters, and \d misses them as numbers. So each \p{X} becomes the explicit class
    of every code point in general category X, read from Python's unicodedata (category_class),
    and \s the explicit White_Space class (Python's \s also takes \x1c-\x1f). Marks such as the
    Devanagari vowel signs are neither letters nor numbers in either engine.
    Where it can still differ: the Unicode version. Python's database (unicodedata.unidata_version)
    and the regex engine tokenizers was built with may not be the same version, and a code point
    assigned in the newer one only is a letter there and unassigned in the other.
    Everything else in these patterns ((?i:...), (?!...), {1,3}, [^...]) means the same in `re`.
    """
    out, in_class, i = [], False, 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            escape = re.match(r"\\[pP](?:\{\w+\}|\w)|\\.", pattern[i:], re.S)[0]
            out.append(_escape_to_stdlib(escape, in_class))
            i += len(escape)
            continue
        if char == "[" and in_class:
            raise TokenizerFileError("pre-tokenizer pattern: nested [...] is not supported")
        in_class = (char == "[") or (in_class and char != "]")
        out.append(char)
        i += 1
    try:
        return re.compile("".join(out))
    except re.error as error:
        raise TokenizerFileError(f"pre-tokenizer pattern {pattern!r}: {error}") from None


# -- the pre-tokenizer: text -> pieces in byte symbols ----------------------------------------

def split_isolated(regex: "re.Pattern", text: str) -> list:
    """Every match of `regex` a piece of its own, and so is every stretch between matches."""
    pieces, end = [], 0
    for match in regex.finditer(text):
        pieces += [text[end:match.start()], match[0]]
        end = match.end()
    return [piece for piece in pieces + [text[end:]] if piece]


def pre_tokenizer_step(step: dict):
    """piece -> pieces, for one Split, Digits or ByteLevel step."""
    if step["type"] == "Digits":  # Rust's char::is_numeric is Unicode's \p{N}
        regex = to_stdlib_re(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        return lambda piece: split_isolated(regex, piece)
    if step["type"] == "Split":
        pattern = step.get("pattern") or {}
        if step.get("behavior") != "Isolated" or step.get("invert"):
            raise TokenizerFileError(f"pre_tokenizer Split with behavior {step.get('behavior')!r}"
                                     f", invert {step.get('invert')!r}: only Isolated, not "
                                     "inverted, is supported")
        if "Regex" in pattern:
            regex = to_stdlib_re(pattern["Regex"])
        elif "String" in pattern:
            regex = re.compile(re.escape(pattern["String"]))
        else:
            raise TokenizerFileError(f"pre_tokenizer Split pattern {pattern!r}: no Regex or String")
        return lambda piece: split_isolated(regex, piece)
    regex = to_stdlib_re(GPT2_PATTERN) if step.get("use_regex", True) else None
    prefix = " " if step.get("add_prefix_space") else ""
    return lambda piece: byte_level(piece, prefix, regex)


def byte_level(piece: str, prefix: str, regex) -> list:
    """ByteLevel: a space in front (add_prefix_space), GPT-2's split (use_regex), byte symbols."""
    if prefix and not piece.startswith(prefix):
        piece = prefix + piece
    return [to_byte_symbols(p) for p in (split_isolated(regex, piece) if regex else [piece])]


def read_pre_tokenizer(spec):
    """text -> [piece in byte symbols]: the file's steps in order, ending with ByteLevel."""
    steps = section(spec, "pre_tokenizer", ("Split", "Digits", "ByteLevel"))
    if [s["type"] for s in steps].count("ByteLevel") != 1 or steps[-1]["type"] != "ByteLevel":
        raise TokenizerFileError("pre_tokenizer must end with one ByteLevel step (byte-level "
                                 f"BPE); it has {[s['type'] for s in steps]}; {SUPPORTED}")
    functions = [pre_tokenizer_step(step) for step in steps]

    def pre_tokenize(text: str) -> list:
        pieces = [text]
        for function in functions:
            pieces = [out for piece in pieces for out in function(piece)]
        return pieces
    return pre_tokenize


# -- BPE: merges by rank ---------------------------------------------------------------------

def read_merges(merges, vocab: dict) -> list:
    """[(left, right), ...] in rank order, from either layout tokenizer.json uses: "left right"
    strings (older files) or ["left", "right"] pairs (newer ones). Anything else is refused, and
    so is a merge whose parts, or whose result, are not in the vocabulary: a file read the wrong
    way fails here instead of loading with no merges."""
    if not isinstance(merges, list):
        raise TokenizerFileError(f"model.merges must be a list, not {type(merges).__name__}")
    pairs = []
    for rank, merge in enumerate(merges):
        if isinstance(merge, str) and merge.count(" ") == 1:
            pair = tuple(merge.split(" "))
        elif isinstance(merge, list) and len(merge) == 2 and all(isinstance(p, str) for p in merge):
            pair = tuple(merge)
        else:
            raise TokenizerFileError(f"model.merges[{rank}] is {merge!r}: a merge is written "
                                     'as "left right" or as ["left", "right"]')
        missing = [part for part in (*pair, "".join(pair)) if part not in vocab]
        if "" in pair or missing:
            raise TokenizerFileError(f"model.merges[{rank}] {merge!r}: {missing or 'empty part'}"
                                     " not in the vocabulary")
        pairs.append(pair)
    if not pairs and any(len(token) > 1 for token in vocab):
        raise TokenizerFileError("model.merges is empty but the vocabulary has tokens longer "
                                 "than one symbol, which only merges can produce")
    return pairs


def merge_pair(symbols: list, pair: tuple) -> list:
    """Every occurrence of the adjacent `pair` joined into one symbol, left to right."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


class BytePairEncoding:
    """The BPE model of a tokenizer.json: the vocabulary {symbol string: id} and the merges.

    Encoding a piece (already in byte symbols):
        symbols = one per byte
        repeat: among adjacent pairs, take the one with the lowest rank (earliest merge);
                if no pair is a merge, stop; else join all its occurrences, left to right
    (the training order replayed: the rank says when training joined the pair). Llama 3's files
    set ignore_merges: a piece that is itself in the vocabulary is taken whole. A piece's ids
    are cached: real text repeats the same words.
    """

    def __init__(self, vocab: dict, merges: list, ignore_merges: bool = False):
        self.vocab = vocab
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.ignore_merges = ignore_merges
        self.cache = {}

    def merge(self, symbols: str) -> list:
        """The piece's symbols after every merge that applies, lowest rank first."""
        parts = list(symbols)
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if best not in self.ranks:
                break
            parts = merge_pair(parts, best)
        return parts

    def encode(self, symbols: str) -> list:
        """Ids of one pre-token written in byte symbols."""
        if symbols not in self.cache:
            if len(self.cache) >= 100_000:  # bound the memory a long text can take
                self.cache.clear()
            whole = self.ignore_merges and symbols in self.vocab
            self.cache[symbols] = [self.vocab[s] for s in ([symbols] if whole else self.merge(symbols))]
        return self.cache[symbols]
