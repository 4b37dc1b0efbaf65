"""Imports run one way: lessons -> (lora, quant) -> tiny_gpt -> torch; this test is where the rule
is written down and held.

Every module of the four packages is parsed (not imported) and each of its imports resolved to
a top-level package, relative imports included. The rule:
    tiny_gpt  imports none of lora, quant, lessons
    quant     imports neither lora nor lessons
    lora      does not import lessons, and takes from quant only its public API (`quant`,
              never `quant.<module>`): QLoRA composes the two in lora/qlora.py
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tiny_gpt", "lora", "quant", "lessons")
FORBIDDEN = {"tiny_gpt": {"lora", "quant", "lessons"}, "quant": {"lora", "lessons"},
             "lora": {"lessons"}, "lessons": set()}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool):
    """Full dotted names of everything `source` (the module `name`) imports."""
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from .. import y: resolve against the package
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            yield target
            if node.level and not node.module:  # from . import x: x is a submodule too
                yield from (f"{target}.{alias.name}" for alias in node.names)


def violations(name: str, imports) -> list:
    """The imports of module `name` that break the rule in the module docstring."""
    owner = name.split(".")[0]
    bad = [m for m in imports if m.split(".")[0] in FORBIDDEN.get(owner, set())]
    if owner == "lora":
        bad += [m for m in imports if m.startswith("quant.")]
    return bad


def all_modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path


@pytest.mark.parametrize("path", list(all_modules()), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_imports_only_downhill(path):
    name = module_name(path)
    imports = list(imported_modules(path.read_text(), name, path.name == "__init__.py"))
    assert not violations(name, imports), f"{name} imports against the design's direction"


def test_the_rule_catches_each_kind_of_wrong_import():
    cases = {"tiny_gpt.memory.loss_scaling": "from lora import LoRALinear",
             "tiny_gpt.train": "import quant",
             "quant.linear4bit": "from lora.layer import LoRALinear",
             "lora.qlora": "from quant.linear4bit import Linear4bit",
             "lora.io": "import lessons.common"}
    for name, line in cases.items():
        assert violations(name, list(imported_modules(line, name, False))), line


def test_relative_imports_are_resolved_against_their_package():
    got = list(imported_modules("from ..util.modules import select_paths\nfrom . import ledger",
                                "tiny_gpt.memory.checkpointing", False))
    assert got == ["tiny_gpt.util.modules", "tiny_gpt.memory", "tiny_gpt.memory.ledger"]
    assert list(imported_modules("from .evaluate import exact_match", "tiny_gpt", True)) == \
        ["tiny_gpt.evaluate"]


def test_the_allowed_imports_pass():
    assert not violations("lora.qlora", ["quant", "tiny_gpt.util.modules", "torch"])
    assert not violations("lessons.common", ["lora", "quant.bench", "tiny_gpt.train"])
