"""Meta-tests in datasette's style: every hook is exercised by a test that implements it, every
hook is documented in docs/ with its exact signature, and the public classes and hooks have
docstrings."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import qlora_plugins
from qlora_plugins.core import hookspecs
from qlora_plugins.core.interfaces import KINDS, Plugin

TESTS = Path(__file__).resolve().parent
DOCS = TESTS.parent / "docs"


def hook_specs() -> dict:
    """The functions of the hookspecs module marked with ``@hookspec``."""
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return {name: fn for name, fn in vars(hookspecs).items() if inspect.isfunction(fn) and hasattr(fn, marker)}


HOOKS = sorted(hook_specs())


def test_the_hook_list_is_what_the_registry_calls():
    from qlora_plugins.core.registry import HOOKS as REGISTRY_HOOKS

    assert set(HOOKS) == set(REGISTRY_HOOKS.values()) | {"register_commands"}
    assert {"register_quantizers", "register_adapters", "register_optimizers", "register_exporters", "register_commands"} <= set(HOOKS)


def _is_hookimpl(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(target, ast.Name) and target.id == "hookimpl") or (isinstance(target, ast.Attribute) and target.attr == "hookimpl")


def implemented_in_tests() -> dict[str, set[str]]:
    """hook name -> test files with a ``@hookimpl`` function of that name (in the test code itself,
    not in strings)."""
    found: dict[str, set[str]] = {}
    for path in TESTS.rglob("test_*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any(_is_hookimpl(d) for d in node.decorator_list):
                found.setdefault(node.name, set()).add(path.name)
    return found


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_implemented_by_a_test(hook):
    assert hook in implemented_in_tests(), f"no test implements {hook} with @hookimpl"


def signature_of(hook: str) -> str:
    """``register_quantizers(register)``: the name and parameter names, no annotations."""
    params = inspect.signature(hook_specs()[hook]).parameters
    return f"{hook}({', '.join(params)})"


def docs_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.rglob("*.md")))


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_signature(hook):
    if not list(DOCS.rglob("*.md")):
        pytest.skip("docs/ has no Markdown files yet")
    assert signature_of(hook) in docs_text(), f"docs/ lacks the signature {signature_of(hook)}"


def test_signature_strings_look_right():
    assert signature_of("register_quantizers") == "register_quantizers(register)"
    assert signature_of("register_commands") == "register_commands(cli)"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_docstring_with_params(hook):
    fn = hook_specs()[hook]
    doc = inspect.getdoc(fn)
    assert doc and doc.strip(), hook
    for param in inspect.signature(fn).parameters:
        assert f":param {param}:" in doc, f"{hook} does not document {param}"


PUBLIC_CLASSES = [getattr(qlora_plugins, name) for name in qlora_plugins.__all__ if inspect.isclass(getattr(qlora_plugins, name))]


@pytest.mark.parametrize("cls", PUBLIC_CLASSES, ids=lambda c: c.__name__)
def test_public_classes_have_docstrings(cls):
    assert cls.__doc__ and cls.__doc__.strip(), cls.__name__


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_plugin_base_classes_and_their_methods_are_documented(kind):
    base = KINDS[kind]
    assert issubclass(base, Plugin) and base.__doc__
    assert base.kind == kind
    for name, member in vars(base).items():
        if inspect.isfunction(member) and not name.startswith("_"):
            assert member.__doc__, f"{base.__name__}.{name} has no docstring"


def test_errors_are_documented():
    import qlora_plugins.errors as errors

    for name in errors.__all__:
        assert getattr(errors, name).__doc__, name
