"""A Hugging Face tokenizer.json, read by hand: byte-level BPE as GPT-2, Llama 3, SmolLM/SmolLM2
and Qwen2/2.5 store it.

    tok = load_tokenizer("DIR")        # DIR/tokenizer.json (+ tokenizer_config.json, config.json,
    ids = tok.encode("Hello world")    #  generation_config.json beside it, for BOS and EOS)
    text = tok.decode(ids)

encode(text), in the order tokenizers applies the file's sections:
    1. added tokens (special ones such as <|endoftext|>) are cut out of the text and kept whole:
       first those matched on the raw text, then, after the normalizer (NFC in Qwen2), the rest
    2. each remaining span: pre-tokenizer -> pieces -> byte symbols -> BPE (bpe.py) -> ids
    3. BOS in front when add_bos (from tokenizer_config.json's add_bos_token, else from the
       post-processor's template, as Llama 3's puts <|begin_of_text|> there); EOS at the end
       when add_eos
decode(ids): every token's byte symbols back to bytes, then UTF-8, an invalid sequence becoming
U+FFFD as tokenizers does; an added token whose text is not in byte symbols is its own UTF-8.

Other kinds are refused by name: SentencePiece-style BPE (byte_fallback, Metaspace '▁' for
spaces, as Llama 2 and TinyLlama store it), WordPiece, Unigram, WordLevel.
"""
import json
import re
import unicodedata
from pathlib import Path

from .bpe import (SENTENCEPIECE, SUPPORTED, WHITE_SPACE, BytePairEncoding, TokenizerFileError,
                  bytes_to_unicode, read_merges, read_pre_tokenizer, section)

CONFIG_FILES = ("tokenizer_config.json", "config.json", "generation_config.json")


def read_json(path: Path) -> dict:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TokenizerFileError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(spec, dict):
        raise TokenizerFileError(f"{path} must hold a JSON object, not {type(spec).__name__}")
    return spec


def read_model(model) -> BytePairEncoding:
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else model
        raise TokenizerFileError(f"model type {kind!r} is not supported; {SUPPORTED}")
    if model.get("byte_fallback"):
        raise TokenizerFileError(SENTENCEPIECE)
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise TokenizerFileError(f"model.{key} = {model[key]!r} is not supported; {SUPPORTED}")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(type(i) is int and i >= 0 for i in vocab.values()):
        raise TokenizerFileError("model.vocab must map each token to a whole number >= 0")
    missing = [s for s in bytes_to_unicode().values() if s not in vocab]
    if missing:
        raise TokenizerFileError(f"model.vocab lacks {len(missing)} of the 256 byte symbols "
                                 f"(e.g. {missing[0]!r}): not a byte-level BPE vocabulary")
    return BytePairEncoding(vocab, read_merges(model.get("merges"), vocab),
                            bool(model.get("ignore_merges")))


def read_normalizer(spec):
    """text -> text: Unicode normal forms (NFC, NFD, NFKC, NFKD), in the file's order."""
    forms = [step["type"] for step in section(spec, "normalizer", ("NFC", "NFD", "NFKC", "NFKD"))]

    def normalize(text: str) -> str:
        for form in forms:
            text = unicodedata.normalize(form, text)
        return text
    return normalize




# -- added tokens ------------------------------------------------------------------------------

class AddedTokens:
    """The file's added_tokens, found in a text before anything else and never split.

    Matching is leftmost-longest, as tokenizers' Aho-Corasick search: alternatives are tried
    longest first at each position. lstrip / rstrip let a token take the white space beside it
    (that space then belongs to no other token)."""

    def __init__(self, entries: list):
        self.by_id, self.special = {}, set()
        tokens = {True: [], False: []}  # normalized: matched after the normalizer, or before
        for n, entry in enumerate(entries):
            if not (isinstance(entry, dict) and isinstance(entry.get("content"), str)
                    and entry["content"] and type(entry.get("id")) is int):
                raise TokenizerFileError(f"added_tokens[{n}] needs a non-empty 'content' and an "
                                         f"integer 'id', not {entry!r}")
            if entry.get("single_word"):
                raise TokenizerFileError(f"added token {entry['content']!r}: single_word is not "
                                         "supported")
            self.by_id[entry["id"]] = entry["content"]
            if entry.get("special"):
                self.special.add(entry["id"])
            tokens[bool(entry.get("normalized", not entry.get("special")))].append(entry)
        self.regex = {key: self._alternation(group) for key, group in tokens.items()}

    @staticmethod
    def _alternation(entries: list):
        """One pattern, one group per token (longest first); None when there are none."""
        entries = sorted(entries, key=lambda e: -len(e["content"]))
        space = f"[{WHITE_SPACE}]*"
        alternatives = [(space if e.get("lstrip") else "") + f"({re.escape(e['content'])})"
                        + (space if e.get("rstrip") else "") for e in entries]
        ids = [e["id"] for e in entries]
        return (re.compile("|".join(alternatives)), ids) if entries else None

    def split(self, text: str, normalized: bool) -> list:
        """[(span, None) or (token text, id)], in order; the spans hold no added token."""
        if self.regex[normalized] is None:
            return [(text, None)] if text else []
        regex, ids = self.regex[normalized]
        parts, end = [], 0
        for match in regex.finditer(text):
            parts += [(text[end:match.start()], None), (match[0], ids[match.lastindex - 1])]
            end = match.end()
        return [(part, i) for part, i in parts + [(text[end:], None)] if part]


# -- BOS and EOS -------------------------------------------------------------------------------

def template_tokens(spec) -> tuple:
    """(tokens before the text, tokens after it) in the post-processor's single template."""
    steps = section(spec, "post_processor", ("ByteLevel", "TemplateProcessing"))
    before, after = [], []
    for step in (s for s in steps if s["type"] == "TemplateProcessing"):
        items = step.get("single") or []
        kinds = [next(iter(item)) if isinstance(item, dict) else None for item in items]
        if kinds.count("Sequence") != 1 or not set(kinds) <= {"Sequence", "SpecialToken"}:
            raise TokenizerFileError(f"post_processor template {items!r}: expected special "
                                     "tokens around one sequence")
        a = kinds.index("Sequence")
        before += [item["SpecialToken"]["id"] for item in items[:a]]
        after += [item["SpecialToken"]["id"] for item in items[a + 1:]]
    if len(before) > 1 or len(after) > 1:
        raise TokenizerFileError(f"post_processor adds {before} before and {after} after the "
                                 "text: at most one BOS before and one EOS after is supported")
    return before, after


def config_ids(configs: dict, key: str) -> list:
    """Every id that config.json / generation_config.json give for `key` (an int or a list)."""
    ids = []
    for name in ("generation_config.json", "config.json"):
        value = configs.get(name, {}).get(key)
        for i in (value if isinstance(value, list) else [] if value is None else [value]):
            if type(i) is not int:
                raise TokenizerFileError(f"{name}: {key} must be an integer or a list of them")
            ids.append(i)
    return ids


def special_id(name: str, configs: dict, template: list, token_id) -> "int | None":
    """The id of the BOS or EOS token (name "bos" or "eos"): tokenizer_config.json's token,
    else the one the template adds, else config.json's / generation_config.json's id."""
    token = configs.get("tokenizer_config.json", {}).get(f"{name}_token")
    token = token.get("content") if isinstance(token, dict) else token
    for text in ([token] if isinstance(token, str) else []) + template:
        found = token_id(text)
        if found is None:
            raise TokenizerFileError(f"{name}_token {text!r} is not in the vocabulary")
        return found
    ids = config_ids(configs, f"{name}_token_id")
    return ids[0] if ids else None


def add_flag(name: str, configs: dict, template: list) -> bool:
    """tokenizer_config.json's add_bos_token / add_eos_token, else whether the template adds it."""
    flag = configs.get("tokenizer_config.json", {}).get(f"add_{name}_token")
    return flag if isinstance(flag, bool) else bool(template)


# -- the tokenizer -----------------------------------------------------------------------------

class Tokenizer:
    """encode(text) -> ids and decode(ids) -> text for one tokenizer.json (see the module doc).

    bos_id, eos_id: the begin / end token's id (None when the files name none); eos_ids: every id
    that ends generation (generation_config.json may list several); add_bos, add_eos: whether
    encode adds them, which the argument of encode overrides; vocab_size: the largest id + 1."""

    def __init__(self, spec: dict, configs: dict):
        self.bpe = read_model(spec.get("model"))
        self.normalize = read_normalizer(spec.get("normalizer"))
        self.pre_tokenize = read_pre_tokenizer(spec.get("pre_tokenizer"))
        section(spec.get("decoder"), "decoder", ("ByteLevel",))
        self.added = AddedTokens(spec.get("added_tokens") or [])
        self.id_to_token = {i: token for token, i in self.bpe.vocab.items()}
        self.id_to_token.update(self.added.by_id)
        self.vocab_size = max(self.id_to_token) + 1
        before, after = template_tokens(spec.get("post_processor"))
        self.bos_id = special_id("bos", configs, before, self.token_id)
        self.eos_id = special_id("eos", configs, after, self.token_id)
        self.eos_ids = tuple(dict.fromkeys(
            ([self.eos_id] if self.eos_id is not None else []) + config_ids(configs, "eos_token_id")))
        self.add_bos, self.add_eos = add_flag("bos", configs, before), add_flag("eos", configs, after)
        for name, flag, i in (("BOS", self.add_bos, self.bos_id), ("EOS", self.add_eos, self.eos_id)):
            if flag and i is None:
                raise TokenizerFileError(f"the files ask to add {name} but name no {name} token")

    def token_id(self, token: str) -> "int | None":
        """The id of `token` (an added token or a vocabulary entry in byte symbols), or None."""
        found = [i for i, text in self.added.by_id.items() if text == token]
        return found[0] if found else self.bpe.vocab.get(token)

    def encode(self, text: str, add_bos: bool = None, add_eos: bool = None) -> list:
        """Token ids of `text`; BOS / EOS added as the files say unless add_bos / add_eos say."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, not {type(text).__name__}")
        ids = []
        for raw, raw_id in self.added.split(text, normalized=False):
            if raw_id is not None:
                ids.append(raw_id)
                continue
            for span, span_id in self.added.split(self.normalize(raw), normalized=True):
                ids += [span_id] if span_id is not None else [
                    i for piece in self.pre_tokenize(span) for i in self.bpe.encode(piece)]
        add_bos = self.add_bos if add_bos is None else add_bos
        add_eos = self.add_eos if add_eos is None else add_eos
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of `ids` (a list of ints, or a 1-D tensor); bytes that are not valid UTF-8
        become U+FFFD, one per maximal invalid sequence, as Rust's from_utf8_lossy does."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        bad = [i for i in ids if type(i) is not int or i not in self.id_to_token]
        if bad:
            raise ValueError(f"decode: {bad[0]!r} is not a token id of this vocabulary "
                             f"(ids are whole numbers below {self.vocab_size})")
        symbol_to_byte = {s: b for b, s in bytes_to_unicode().items()}
        data = bytearray()
        for i in ids:
            if skip_special_tokens and i in self.added.special:
                continue
            token = self.id_to_token[i]
            in_symbols = all(s in symbol_to_byte for s in token)
            data += bytes(symbol_to_byte[s] for s in token) if in_symbols else token.encode()
        return data.decode("utf-8", errors="replace")


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer of a Hugging Face folder (or of a tokenizer.json file named directly), with
    BOS / EOS read from tokenizer_config.json, config.json and generation_config.json beside it."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer file at {file}")
    configs = {name: read_json(file.parent / name) for name in CONFIG_FILES
               if (file.parent / name).is_file()}
    return Tokenizer(read_json(file), configs)
