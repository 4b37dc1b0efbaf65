"""The ledger's prediction: the bytes of a training step computed from a model's shape alone.

ledger.py measures a step; this module says beforehand what it will find, for a decoder of the
Llama family (the tiny GPT is lesson 07's), and so carries the measurement to shapes no laptop
can hold. With P parameters of which p are trained, in a step of N = batch x sequence tokens:

    weights      frozen P - p at the base's bytes each (4 fp32, 2 bf16, ~0.52 for NF4 with
                 double-quantized scales: 0.5 + 1/64 + 4/(64 * 256), quant/qtensor.py), and the
                 p trained ones at the adapters' bytes
    gradients    p x (bytes of a trained value)
    optimizer    AdamW: 2 p x (bytes of its state) + 4 bytes of step count per trained tensor
    activations  N x (per-token bytes of one block) x layers + N x (the head's per-token bytes)

What a block saves for backward (the items of `saved_per_token`), for a frozen base with
LoRA on q_proj and v_proj: each RMSNorm its input and one 1 / rms per token; the attention's
normed input once (LoRA's A and B need it for their gradient) and x A^T of rank r per adapter;
query, key and value after the rotary embedding (key and value expanded to every head), the
attention's output and one log-sum-exp per head (PyTorch's flash attention keeps no T x T
matrix); the MLP's gate, its SiLU and its up projection. Frozen projections keep nothing: a
weight needs no gradient, so its input is not saved (ledger.py). Full fine-tuning saves every
projection's input too. With gradient checkpointing a block keeps only its input, and one
block's own tensors live again during its backward. The head saves the final norm's input and
the log-softmax of the logits, N x vocab floats: at 49k words that alone outweighs 30 blocks'
checkpointed inputs.

Weights, gradients and optimizer state are exact (tests hold them against the ledger). The
activations are a count of the tensors each operation saves, which the code of another model
can change; the lesson prints the measured value beside this one, and the ratio.
"""
from dataclasses import dataclass, fields
from typing import Optional, Tuple

from .ledger import Ledger

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
BLOCKSIZE, SCALE_GROUP = 64, 256  # NF4 values per scale, scales per second-level scale
FOUR_BIT_TABLES = 256 * 2 * 4 + 256 * 4 + 16 * 4  # per layer: pair table, scale map, code book


@dataclass(frozen=True)
class Shape:
    """A Llama-family decoder, in the names of Hugging Face's config.json."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool

    @classmethod
    def of(cls, config) -> "Shape":
        """From a config object or dict with those names (head_dim defaults to
        hidden_size / num_attention_heads, num_key_value_heads to num_attention_heads)."""
        get = (config.get if isinstance(config, dict)
               else lambda name, default=None: getattr(config, name, default))
        heads = get("num_attention_heads")
        values = {f.name: get(f.name) for f in fields(cls)}
        values["head_dim"] = get("head_dim") or get("hidden_size") // heads
        values["num_key_value_heads"] = get("num_key_value_heads") or heads
        values["tie_word_embeddings"] = bool(get("tie_word_embeddings", False))
        return cls(**values)

    def linear_shapes(self) -> dict:
        """{projection name: (out, in)} of one block."""
        d, q, kv, i = (self.hidden_size, self.num_attention_heads * self.head_dim,
                       self.num_key_value_heads * self.head_dim, self.intermediate_size)
        return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
                "gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i)}

    def parameter_counts(self) -> dict:
        """{"embedding", "linear" (every block's projections), "norms", "head"} element
        counts; "head" is 0 when the output layer is the embedding itself (tied)."""
        per_block = sum(o * i for o, i in self.linear_shapes().values())
        embedding = self.vocab_size * self.hidden_size
        return {"embedding": embedding, "linear": per_block * self.num_hidden_layers,
                "norms": (2 * self.num_hidden_layers + 1) * self.hidden_size,
                "head": 0 if self.tie_word_embeddings else embedding}

    def lora_parameters(self, targets, r) -> Tuple[int, int]:
        """(elements, tensors) of LoRA factors A (r, in) and B (out, r) on `targets`."""
        shapes = self.linear_shapes()
        per_block = sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)
        return per_block * self.num_hidden_layers, 2 * len(targets) * self.num_hidden_layers


# Published shapes, from each model's config.json on the Hugging Face hub.
PUBLISHED = {
    # HuggingFaceTB/SmolLM2-135M
    "SmolLM2-135M": Shape(49152, 576, 1536, 30, 9, 3, 64, True),
    # meta-llama/Llama-3.2-1B
    "Llama-3.2-1B": Shape(128256, 2048, 8192, 16, 32, 8, 64, True),
    # meta-llama/Llama-2-7b-hf (LLaMA-7B, the QLoRA paper's 7B, has the same shape)
    "Llama-2-7B": Shape(32000, 4096, 11008, 32, 32, 32, 128, False),
    # huggyllama/llama-65b: LLaMA-65B, the QLoRA paper's largest model
    "LLaMA-65B": Shape(32000, 8192, 22016, 80, 64, 64, 128, False),
    # meta-llama/Llama-2-70b-hf (grouped-query attention: 8 key/value heads)
    "Llama-2-70B": Shape(32000, 8192, 28672, 80, 64, 8, 128, False),
}


@dataclass(frozen=True)
class Recipe:
    """How a step is run: what is trained and in which bytes."""
    name: str
    lora_targets: Optional[Tuple[str, ...]] = ("q_proj", "v_proj")  # None: full fine-tuning
    r: int = 8
    base: str = "fp32"            # the frozen base: "fp32", "bf16" or "nf4" (its projections)
    float_bytes: int = 4          # bytes of the frozen weights kept in float (norms)
    embedding_bytes: int = 4      # bytes of the frozen token embedding (and an untied head)
    trained_bytes: int = 4        # bytes of a trained value and of its gradient
    optimizer_bytes: int = 4      # bytes of each AdamW state value
    activation_bytes: int = 4     # bytes of a saved activation value
    checkpointing: bool = False

    @property
    def full(self):
        return self.lora_targets is None


RECIPES = {r.name: r for r in [
    Recipe("full FT fp32", lora_targets=None),
    Recipe("LoRA"),
    Recipe("LoRA + bf16 weights", base="bf16", float_bytes=2, embedding_bytes=2,
           trained_bytes=2, optimizer_bytes=2, activation_bytes=2),
    Recipe("LoRA + ckpt", checkpointing=True),
    # QLoRA's base: the projections in NF4, the frozen embedding in bfloat16 as the paper
    # keeps it (tiny_gpt/pretrained/upcast_head.py); hidden states, adapters in float32
    Recipe("QLoRA", base="nf4", embedding_bytes=2),
    Recipe("QLoRA + ckpt", base="nf4", embedding_bytes=2, checkpointing=True),
]}
ALL_LINEAR = ATTENTION + MLP
PAPER_RECIPES = {r.name: r for r in [  # as the QLoRA paper runs them: 16-bit weights,
    # gradients and activations, 32-bit AdamW state; QLoRA with bf16 adapters on every linear
    # layer, r = 64, and the embedding and head in bf16 (Dettmers et al. 2023, Sec. 4-5)
    Recipe("full FT 16-bit", lora_targets=None, base="bf16", float_bytes=2, embedding_bytes=2,
           trained_bytes=2, activation_bytes=2, checkpointing=True),
    Recipe("QLoRA, all linear r=64", lora_targets=ALL_LINEAR, r=64, base="nf4",
           float_bytes=2, embedding_bytes=2, trained_bytes=2, activation_bytes=2,
           checkpointing=True),
]}


def nf4_bytes(out_features: int, in_features: int) -> int:
    """Bytes of one Linear4bit's buffers (quant/qtensor.py): packed codes of the blocks (the
    last one zero-padded), 8-bit scales padded to whole groups of 256, a float32 absmax per
    group, the offset, and the code book and decoding tables every layer keeps."""
    blocks = -(-out_features * in_features // BLOCKSIZE)
    groups = -(-blocks // SCALE_GROUP)
    return blocks * BLOCKSIZE // 2 + groups * SCALE_GROUP + 4 * groups + 4 + FOUR_BIT_TABLES


def weight_bytes(shape: Shape, recipe: Recipe) -> Tuple[int, int]:
    """(frozen, trainable) bytes. The embedding and head (recipe.embedding_bytes each) and
    the norms (recipe.float_bytes) stay in float; only the blocks' projections go to 4 bits."""
    counts = shape.parameter_counts()
    if recipe.full:
        return 0, recipe.trained_bytes * sum(counts.values())
    others = (recipe.embedding_bytes * (counts["embedding"] + counts["head"])
              + recipe.float_bytes * counts["norms"])
    if recipe.base == "nf4":
        linear = shape.num_hidden_layers * sum(nf4_bytes(o, i)
                                               for o, i in shape.linear_shapes().values())
    else:
        linear = (2 if recipe.base == "bf16" else 4) * counts["linear"]
    lora, _ = shape.lora_parameters(recipe.lora_targets, recipe.r)
    return others + linear, recipe.trained_bytes * lora


def trained_tensors(shape: Shape, recipe: Recipe) -> Tuple[int, int]:
    """(trained values, trained tensors)."""
    if recipe.full:
        blocks = shape.num_hidden_layers * (len(ATTENTION) + len(MLP) + 2)
        return sum(shape.parameter_counts().values()), blocks + 3 - shape.tie_word_embeddings
    return shape.lora_parameters(recipe.lora_targets, recipe.r)


def saved_per_token(shape: Shape, recipe: Recipe) -> dict:
    """{what: bytes saved per token by one block} (see the module docstring). RMSNorm works in
    float32 whatever the model's dtype, so its saved tensors take 4 bytes a value."""
    a, d = recipe.activation_bytes, shape.hidden_size
    heads, hd, inner = shape.num_attention_heads, shape.head_dim, shape.intermediate_size
    saved = {"2 norms: float32 input, 1/rms": 2 * 4 * (d + 1),
             "attention's normed input": a * d,
             "q, k, v after rotary; output": a * 4 * heads * hd,
             "log-sum-exp per head (float32)": 4 * heads,
             "MLP: gate, SiLU, up": a * 3 * inner}
    if recipe.full:  # every weight's gradient needs its layer's input, each norm's w its x/rms
        saved["o_proj, MLP inputs; 2 x/rms"] = a * (heads * hd + d + inner) + 2 * 4 * d
    else:
        saved["x A^T of each adapter"] = a * recipe.r * len(recipe.lora_targets)
    return saved


def saved_once_per_token(shape: Shape, recipe: Recipe) -> dict:
    """{what: bytes per token saved once, outside the blocks}."""
    d = shape.hidden_size
    saved = {"final norm: float32 input, 1/rms": 4 * (d + 1) + (4 * d if recipe.full else 0),
             "log-softmax of the logits (float32)": 4 * shape.vocab_size,
             "rotary cos, sin": recipe.activation_bytes * 2 * shape.head_dim,
             "targets (int64), loss mask": 8 + 4}
    if not (recipe.full or recipe.checkpointing):  # the frozen embedding's output needs no
        saved["block 0's first norm keeps nothing"] = -4 * (d + 1)  # gradient, nor its norm
    return saved


def activation_bytes(shape: Shape, recipe: Recipe, tokens: int) -> int:
    """Bytes saved for backward during the forward of one micro-batch of `tokens` tokens.
    With checkpointing that is every block's input, and during backward one block at a time
    saves its tensors again (`recompute_bytes`), which the ledger does not see (it listens
    during forward only) but the process's peak memory does."""
    once = tokens * sum(saved_once_per_token(shape, recipe).values())
    if recipe.checkpointing:
        inputs = tokens * recipe.activation_bytes * shape.hidden_size * shape.num_hidden_layers
        return inputs + once
    return tokens * shape.num_hidden_layers * sum(saved_per_token(shape, recipe).values()) + once


def recompute_bytes(shape: Shape, recipe: Recipe, tokens: int) -> int:
    """One checkpointed block's saved tensors, rebuilt during its backward (0 without)."""
    return tokens * sum(saved_per_token(shape, recipe).values()) if recipe.checkpointing else 0


def predict(shape, recipe: Recipe, batch: int, seq_len: int) -> Ledger:
    """The ledger of one AdamW step of `recipe` on `shape` (a Shape, or a config it reads)."""
    shape = shape if isinstance(shape, Shape) else Shape.of(shape)
    frozen, trainable = weight_bytes(shape, recipe)
    values, tensors = trained_tensors(shape, recipe)
    return Ledger(frozen=frozen, trainable=trainable, grads=recipe.trained_bytes * values,
                  optimizer=2 * recipe.optimizer_bytes * values + 4 * tensors,
                  activations=activation_bytes(shape, recipe, batch * seq_len))
