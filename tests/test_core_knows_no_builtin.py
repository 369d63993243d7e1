"""The core knows no builtin plugin (issue 11): no module under ``core/`` names a builtin plugin or
imports ``qlora_plugins.builtin_plugins``. What the core needs from a plugin comes through the
declared methods of its kind (docs/plugins.md); defaults come from ``Plugin.default``.

The check reads every module's syntax tree (docstrings are prose and are skipped):

- a string literal or an identifier equal to an *unambiguous* builtin name (``nf4``, ``lora``,
  ``paged_adamw``, ``tiny-llama``...) is a violation wherever it occurs;
- the builtin names that are also ordinary words (``none``, ``text``, ``full``, ``adapter``,
  ``merged``) are violations only where they are used as plugin names: compared with
  (``== "none"``, ``in ("lora", "full")``), passed as a name to the registry
  (``registry.create(kind, "full")``), as keys of a table (``{"none": 0}``, unless the word is a
  plugin kind or config section, like ``"adapter"``), or as the value of a parameter that names a
  plugin (``quantizer="none"``);
- ``qlora_plugins.builtin_plugins`` may appear only in the registry's tuple of builtin modules,
  which is how builtins are found (the same way as third-party plugins).

:data:`ALLOWED` lists the occurrences that look like plugin names but are not, with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import new_registry

from qlora_plugins.core.config import SECTIONS
from qlora_plugins.core.interfaces import KINDS

CORE = Path(__file__).resolve().parents[1] / "core"

#: Builtin names that are also ordinary words in the core (report keys, peft's ``bias="none"``,
#: datasets' ``text`` builder, the ``adapter`` plugin kind, the ``perplexity`` figure of
#: quant-report and of the evaluators, ``chat`` as in chat template / ``qlora chat``...): flagged
#: only where used as names.
AMBIGUOUS = frozenset({"none", "text", "full", "adapter", "merged", "perplexity", "chat"})

#: Parameters and keywords whose value is a plugin name.
NAME_PARAMETERS = frozenset(
    {"name", "quantizer", "adapter", "optimizer", "exporter", "export", "data", "data_format", "model_source", "source"}
)

#: Registry methods whose second positional argument (after the kind) is a plugin name.
NAME_METHODS = frozenset({"create", "get", "registration"})

#: (file, the line's text stripped) of occurrences that are not plugin names, and why.
ALLOWED: dict[tuple[str, str], str] = {
    ("datafiles.py", 'if builder in ("json", "csv", "text"):'): "the datasets library's builder names, not a data format",
    ("checkpoint_format.py", '_BNB_TYPES = ("nf4", "fp4")'): "bitsandbytes' own quant_type names (the on-disk format), "
    "compared with a quantizer's declared quant_type, not a plugin name",
    ("__init__.py", 'for quant_type, table in (("nf4", nf4_code), ("fp4", fp4_code)):'): "bitsandbytes' quant_type argument of its "
    "own CUDA kernels (kernels/__init__.py), not a plugin name",
    ("quant_report.py", 'out_row.update({"perplexity": ppl, "perplexity_ratio": ppl / base["fp_perplexity"]})'): "the perplexity "
    "figure of quant-report's table, not the perplexity evaluator",
    ("inference.py", 'if mode == "chat":'): "the --template mode of qlora generate/eval (auto, chat, plain), not the chat data format",
}


BUILTIN_PREFIX = "qlora_plugins.builtin_plugins"


def builtin_names() -> set[str]:
    """Every name a builtin plugin registers, from a fresh registry (all kinds)."""
    registry = new_registry()
    return {r.name for r in registry.registrations() if r.source.builtin}


NAMES = builtin_names()
UNAMBIGUOUS = NAMES - AMBIGUOUS
NOT_NAMES_AS_KEYS = set(KINDS) | set(SECTIONS)  # a key "adapter" is the kind or the section


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings or bare string statements."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            ids.add(id(node.value))
    return ids


def _registry_tuple(tree: ast.AST, filename: str) -> set[int]:
    """ids of the string constants in the registry's ``DEFAULT_PLUGINS`` tuple (how builtins are found)."""
    if filename != "registry.py":
        return set()
    ids = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "DEFAULT_PLUGINS" for t in targets) and isinstance(node.value, ast.Tuple):
            ids |= {id(e) for e in node.value.elts if isinstance(e, ast.Constant)}
    return ids


def _string(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _strings_in(node: ast.AST) -> list[str]:
    """The string constant ``node``, or those of a tuple/list/set literal."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for s in map(_string, node.elts) if s is not None]
    value = _string(node)
    return [value] if value is not None else []


def violations(source: str, filename: str) -> list[str]:
    """``file:line: what`` for each use of a builtin plugin name in ``source``."""
    tree = ast.parse(source)
    lines = source.splitlines()
    skip = _docstrings(tree)
    registry_tuple = _registry_tuple(tree, filename)
    found: list[tuple[int, str]] = []

    def flag(node: ast.AST, what: str) -> None:
        found.append((node.lineno, what))

    for node in ast.walk(tree):
        # strings and identifiers equal to an unambiguous builtin name, anywhere
        value = _string(node)
        if value is not None and id(node) not in skip:
            if value in UNAMBIGUOUS:
                flag(node, f"string {value!r}")
            if value.startswith(BUILTIN_PREFIX) and id(node) not in registry_tuple:
                flag(node, f"string {value!r} names a builtin module")
        for ident in _identifiers(node):
            if ident in UNAMBIGUOUS:
                flag(node, f"identifier {ident!r}")
        # imports of the builtin plugins
        if isinstance(node, ast.Import) and any(a.name.startswith(BUILTIN_PREFIX) for a in node.names):
            flag(node, "imports a builtin plugin module")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(BUILTIN_PREFIX):
            flag(node, "imports a builtin plugin module")
        # ordinary words used as plugin names
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                for text in _strings_in(side):
                    if text in NAMES:
                        flag(node, f"compares with the builtin name {text!r}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in NAME_METHODS:
            for text in _strings_in(node.args[1]) if len(node.args) > 1 else []:  # (kind, name, ...)
                if text in NAMES:
                    flag(node, f"asks the registry for the builtin {text!r}")
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg in NAME_PARAMETERS and _string(kw.value) in NAMES:
                    flag(node, f"passes the builtin name {_string(kw.value)!r} as {kw.arg}")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            params = [*node.args.posonlyargs, *node.args.args]
            pairs = list(zip(params[len(params) - len(node.args.defaults) :], node.args.defaults))
            pairs += [(a, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None]
            for param, default in pairs:
                if param.arg in NAME_PARAMETERS and _string(default) in NAMES:
                    flag(default, f"defaults {param.arg} to the builtin name {_string(default)!r}")
        if isinstance(node, ast.Dict):
            for key in node.keys:
                text = _string(key) if key is not None else None
                if text in NAMES and text not in NOT_NAMES_AS_KEYS:
                    flag(key, f"a table keyed by the builtin name {text!r}")

    out = []
    for lineno, what in sorted(set(found)):
        text = lines[lineno - 1].strip() if 0 < lineno <= len(lines) else ""
        if (filename, text) not in ALLOWED:
            out.append(f"core/{filename}:{lineno}: {what}: {text}")
    return out


def _identifiers(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return [node.attr]
    if isinstance(node, ast.arg):
        return [node.arg]
    if isinstance(node, ast.keyword):
        return [node.arg] if node.arg else []
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.alias):
        return [node.asname or node.name.rsplit(".", 1)[-1]]
    return []


def _cases() -> list:
    cases = []
    for path in sorted(CORE.rglob("*.py")):
        if "__pycache__" not in path.parts:
            cases.append(pytest.param(path, id=str(path.relative_to(CORE))))
    return cases


def test_the_builtin_names_are_collected_from_the_registry():
    assert {
        "nf4",
        "fp4",
        "int4_sym",
        "int4_asym",
        "none",
        "lora",
        "full",
        "adamw",
        "paged_adamw",
        "adamw_8bit",
        "offload_adamw",
        "adapter",
        "merged",
        "merged_4bit",
        "instruction",
        "text",
        "classification",
        "tiny-llama",
        "tiny-gpt2",
        "tiny-bert",
    } <= NAMES
    assert {"nf4", "lora", "paged_adamw", "instruction", "classification", "tiny-llama"} <= UNAMBIGUOUS


@pytest.mark.parametrize("path", _cases())
def test_core_module_names_no_builtin_plugin(path: Path):
    found = violations(path.read_text(encoding="utf-8"), path.name)
    assert not found, "the core names builtin plugins (ask the plugin through a declared method):\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        'QUANTIZERS = {"nf4": 1}',
        'if settings.quantizer == "none":\n    pass',
        'ok = adapter in ("lora", "full")',
        'ok = adapter not in ("full",)',
        'x = registry.create("adapter", "full", {})',
        'x = registry.get("exporter", "merged")',
        'Settings(quantizer="none")',
        'def f(adapter="full"):\n    pass',
        'table = {"none": 0}',
        "from qlora_plugins.builtin_plugins import adapter_lora",
        "import qlora_plugins.builtin_plugins.bnb_backend",
        'MODULE = "qlora_plugins.builtin_plugins.quantizer_none"',
        "def lora():\n    pass",
        "x = config.paged_adamw",
        'x = "tiny-llama"',
    ],
)
def test_the_check_catches_builtin_names(source: str):
    assert violations(source, "example.py")


@pytest.mark.parametrize(
    "source",
    [
        'def f():\n    "Quantize with nf4 like lora does."\n    return 1',
        'report = {"adapter": 1, "quantizer": 2}',
        'config = LoraConfig(bias="none")',
        'text = ", ".join(names) or "none"',
        "shown = short_text(text, 200)",
        'path = out / "adapter"',
        'x = registry.create("adapter", spec.name, spec.options, "adapter")',
    ],
)
def test_the_check_leaves_ordinary_words_alone(source: str):
    assert violations(source, "example.py") == []
