"""How a target name picks modules, for LoRA (lora/inject.py) and 4-bit (quant/linear4bit.py)
alike: QLoRA hands the same targets to both, so they must read them the same way."""


def path_matches(path: str, target: str) -> bool:
    """True if `target` is the module's full path ("blocks.0.attn.q_proj") or its last
    dotted parts ("q_proj", "attn.q_proj")."""
    return path == target or path.endswith("." + target)
