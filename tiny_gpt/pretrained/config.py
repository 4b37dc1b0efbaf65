"""A pretrained checkpoint's shape, read from a Hugging Face ``config.json`` and checked.

One dataclass holds every family this package builds: the Llama family (model_type "llama":
Llama 2 / 3.x, TinyLlama, SmolLM / SmolLM2; "qwen2": Qwen2 / Qwen2.5, which adds a bias to
q, k and v) and GPT-2 ("gpt2", whose file spells the same numbers n_embd, n_layer, ...). A
config is refused -- with the field named -- before any module is built: an unknown
model_type, a missing or wrong-typed field, head counts that do not divide, or a feature this
code does not implement (another rope_scaling kind, sliding-window attention).

Rotary settings arrive in two spellings: ``rope_theta`` and ``rope_scaling`` at the top level
(the files on the Hub), or one ``rope_parameters`` object (files written by transformers 5).
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..memory.checkpointing import IMPLS as CHECKPOINT_IMPLS
from ..util.checks import is_number, is_whole_number

FAMILIES = ("llama", "qwen2", "gpt2")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class ModelConfig:
    model_type: str                  # "llama", "qwen2" or "gpt2"
    vocab_size: int                  # rows of the token embedding
    hidden_size: int                 # width of the residual stream (GPT-2: n_embd)
    intermediate_size: int           # hidden width of the MLP (GPT-2: n_inner or 4 * n_embd)
    num_hidden_layers: int           # transformer blocks (GPT-2: n_layer)
    num_attention_heads: int         # query heads (GPT-2: n_head)
    num_key_value_heads: int         # key/value heads; fewer than query heads = grouped-query
    head_dim: int                    # width of one head (default hidden_size / heads)
    max_position_embeddings: int     # longest context (GPT-2: n_positions)
    norm_eps: float                  # RMSNorm / LayerNorm epsilon
    rope_theta: float = 10000.0      # rotary base (Llama family only)
    rope_scaling: Optional[dict] = None  # the llama3 frequency scaling, or None
    attention_bias: bool = False     # bias on q, k, v (and o for Llama's attention_bias)
    qkv_bias_only: bool = False      # Qwen2: bias on q, k, v but not on o
    mlp_bias: bool = False           # bias on the MLP's projections (Llama's mlp_bias)
    tie_word_embeddings: bool = False  # the output head reuses the token embedding
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[object] = None  # an id or a list of ids (Llama 3 has several)
    gradient_checkpointing: bool = False   # recompute each block in backward (not from the file)
    checkpoint_impl: str = "torch"         # "torch", "torch_reentrant" or "manual"
    source: dict = field(default_factory=dict, repr=False, compare=False)  # the JSON as read

    @property
    def block_size(self) -> int:
        """The longest sequence the model takes: the name the training loop and tiny GPT use."""
        return self.max_position_embeddings

    def __post_init__(self):
        check_config(self)


def check_config(cfg: ModelConfig) -> None:
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim",
                 "max_position_embeddings"):
        if not is_whole_number(getattr(cfg, name), 1):
            raise ValueError(f"config field {name!r} must be a whole number >= 1, got "
                             f"{getattr(cfg, name)!r}")
    if cfg.model_type not in FAMILIES:
        raise ValueError(f"unknown model_type {cfg.model_type!r}; this code builds {FAMILIES}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(f"num_attention_heads={cfg.num_attention_heads} must be a multiple of "
                         f"num_key_value_heads={cfg.num_key_value_heads} (grouped-query "
                         "attention shares each key/value head among a whole group)")
    if cfg.model_type == "gpt2" and cfg.hidden_size != cfg.num_attention_heads * cfg.head_dim:
        raise ValueError(f"GPT-2: n_embd={cfg.hidden_size} must be divisible by "
                         f"n_head={cfg.num_attention_heads}")
    if cfg.model_type != "gpt2" and cfg.head_dim % 2:
        raise ValueError(f"head_dim={cfg.head_dim} must be even (rotary pairs of channels)")
    if not (is_number(cfg.norm_eps) and 0 < cfg.norm_eps < 1):
        raise ValueError(f"the norm epsilon must be a number in (0, 1), got {cfg.norm_eps!r}")
    if not (is_number(cfg.rope_theta) and 1 < cfg.rope_theta < math.inf):
        raise ValueError(f"rope_theta must be a finite number > 1, got {cfg.rope_theta!r}")
    for name in ("attention_bias", "qkv_bias_only", "mlp_bias", "tie_word_embeddings",
                 "gradient_checkpointing"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"config field {name!r} must be true or false, got "
                             f"{getattr(cfg, name)!r}")
    if cfg.checkpoint_impl not in CHECKPOINT_IMPLS:
        raise ValueError(f"checkpoint_impl={cfg.checkpoint_impl!r}; use one of "
                         f"{CHECKPOINT_IMPLS}")
    if cfg.rope_scaling is not None:
        check_llama3_scaling(cfg.rope_scaling)


def check_llama3_scaling(scaling) -> None:
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be an object or null, got {scaling!r}")
    missing = [k for k in LLAMA3_ROPE_KEYS if not is_number(scaling.get(k))]
    if missing:
        raise ValueError(f"rope_scaling of type llama3 needs numbers for {missing}, got "
                         f"{scaling!r}")
    if not (scaling["factor"] >= 1 and 0 < scaling["low_freq_factor"]
            < scaling["high_freq_factor"] and scaling["original_max_position_embeddings"] > 0):
        raise ValueError("rope_scaling needs factor >= 1, 0 < low_freq_factor < "
                         f"high_freq_factor and original_max_position_embeddings > 0, got "
                         f"{scaling!r}")


def _get(raw, name, kind, default=None, required=True):
    """raw[name] checked against `kind` (a type or tuple of types); bools never pass as ints."""
    if name not in raw or raw[name] is None:
        if required and default is None:
            raise ValueError(f"config.json: missing field {name!r}")
        return default
    value = raw[name]
    if isinstance(value, bool) and kind is not bool:
        raise ValueError(f"config.json: field {name!r} must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ValueError(f"config.json: field {name!r} must be {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind):
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", float: "a number", bool: "true or false",
                        str: "a string", dict: "an object"}.get(k, k.__name__) for k in kinds)


def _rope(raw):
    """(rope_theta, llama3 scaling or None) from either spelling; other scalings refused."""
    params = _get(raw, "rope_parameters", dict, required=False) or {}
    scaling = _get(raw, "rope_scaling", dict, required=False) or params
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"config.json: rope scaling {kind!r} is not implemented here (only "
                         "'default' and 'llama3')")
    return theta, {k: scaling.get(k) for k in LLAMA3_ROPE_KEYS}


def _llama_family(raw, model_type):
    hidden = _get(raw, "hidden_size", int)
    heads = _get(raw, "num_attention_heads", int)
    if _get(raw, "hidden_act", str, "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {raw['hidden_act']!r} is not implemented "
                         "(the Llama family's MLP is SwiGLU: 'silu')")
    for flag in ("use_sliding_window", "rope_interleaved"):
        if _get(raw, flag, bool, False):
            raise ValueError(f"config.json: {flag}=true is not implemented here")
    head_dim = _get(raw, "head_dim", int, required=False)
    if head_dim is None:
        if heads < 1 or hidden % heads:
            raise ValueError(f"config.json: hidden_size={hidden} must be divisible by "
                             f"num_attention_heads={heads} when no head_dim is given")
        head_dim = hidden // heads
    theta, scaling = _rope(raw)
    qwen = model_type == "qwen2"
    return dict(
        hidden_size=hidden, num_attention_heads=heads,
        intermediate_size=_get(raw, "intermediate_size", int),
        num_hidden_layers=_get(raw, "num_hidden_layers", int),
        num_key_value_heads=_get(raw, "num_key_value_heads", int, heads),
        head_dim=head_dim,
        max_position_embeddings=_get(raw, "max_position_embeddings", int),
        norm_eps=_get(raw, "rms_norm_eps", (int, float), 1e-6), rope_theta=theta,
        rope_scaling=scaling, attention_bias=qwen or _get(raw, "attention_bias", bool, False),
        qkv_bias_only=qwen, mlp_bias=_get(raw, "mlp_bias", bool, False),
        tie_word_embeddings=_get(raw, "tie_word_embeddings", bool, False))


def _gpt2(raw):
    hidden, heads = _get(raw, "n_embd", int), _get(raw, "n_head", int)
    act = _get(raw, "activation_function", str, "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"config.json: activation_function {act!r} is not implemented (GPT-2 "
                         "uses the tanh GELU: 'gelu_new')")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                 "add_cross_attention"):
        if _get(raw, flag, bool, False):
            raise ValueError(f"config.json: {flag}=true is not implemented here")
    return dict(
        hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=hidden // heads if is_whole_number(heads, 1) else 0,
        intermediate_size=_get(raw, "n_inner", int, 4 * hidden),
        num_hidden_layers=_get(raw, "n_layer", int),
        max_position_embeddings=_get(raw, "n_positions", int),
        norm_eps=_get(raw, "layer_norm_epsilon", (int, float), 1e-5), attention_bias=True,
        mlp_bias=True, tie_word_embeddings=_get(raw, "tie_word_embeddings", bool, True))


def config_from_dict(raw: dict) -> ModelConfig:
    """A parsed config.json -> ModelConfig; every problem raised as a ValueError naming it."""
    if not isinstance(raw, dict):
        raise ValueError("config.json must hold a JSON object")
    model_type = _get(raw, "model_type", str)
    if model_type not in FAMILIES:
        raise ValueError(f"config.json: unknown model_type {model_type!r}; this code builds "
                         f"{FAMILIES}")
    fields = _gpt2(raw) if model_type == "gpt2" else _llama_family(raw, model_type)
    return ModelConfig(model_type=model_type, vocab_size=_get(raw, "vocab_size", int),
                       bos_token_id=_get(raw, "bos_token_id", int, required=False),
                       eos_token_id=_get(raw, "eos_token_id", (int, list), required=False),
                       source=dict(raw), **fields)


def read_config(path) -> ModelConfig:
    """config.json (or the folder holding it) -> ModelConfig."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    try:
        return config_from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def shipped_config(name: str) -> ModelConfig:
    """A config shipped with the package: "tiny", "smollm2-135m" or "llama-3.2-1b" (shapes
    only; no weights come with them)."""
    known = sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))
    if name not in known:
        raise ValueError(f"no shipped config {name!r}; shipped: {known}")
    return read_config(CONFIGS_DIR / f"{name}.json")


def config_to_dict(cfg: ModelConfig) -> dict:
    """ModelConfig -> a config.json in the family's own spelling (what read_config reads)."""
    common = {"model_type": cfg.model_type, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_word_embeddings,
              "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    if cfg.model_type == "gpt2":
        return {**common, "architectures": ["GPT2LMHeadModel"], "n_embd": cfg.hidden_size,
                "n_head": cfg.num_attention_heads, "n_layer": cfg.num_hidden_layers,
                "n_inner": cfg.intermediate_size, "n_positions": cfg.max_position_embeddings,
                "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new"}
    rope = {"rope_type": "default"} if cfg.rope_scaling is None else \
        {"rope_type": "llama3", **cfg.rope_scaling}
    arch = "Qwen2ForCausalLM" if cfg.model_type == "qwen2" else "LlamaForCausalLM"
    out = {**common, "architectures": [arch], "hidden_size": cfg.hidden_size,
           "intermediate_size": cfg.intermediate_size,
           "num_hidden_layers": cfg.num_hidden_layers,
           "num_attention_heads": cfg.num_attention_heads,
           "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
           "max_position_embeddings": cfg.max_position_embeddings,
           "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "rope_theta": cfg.rope_theta,
           "rope_scaling": None if cfg.rope_scaling is None else rope,
           "mlp_bias": cfg.mlp_bias}
    if cfg.model_type == "llama":
        out["attention_bias"] = cfg.attention_bias
    return out
