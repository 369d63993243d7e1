"""Safe by default (docs/security.md): no pickle is ever loaded from a file we are handed,
`trust_remote_code` reaches transformers only when the config sets it, a config cannot import
Python (plugin names are looked up in the registry, never imported), and exporters cannot be
told to write outside their output directory."""

from __future__ import annotations

import ast
import json
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, base_config, invoke, new_registry

# --- the source tree -----------------------------------------------------------------------

#: Everything that ships or is an example of a plugin; tests and build copies excluded.
SOURCE_ROOTS = ("qlora_plugins", "core", "builtin_plugins", "examples", "benchmarks")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
#: Files allowed to import a module whose name is not a literal: the registry imports its own
#: tuple of builtin plugin modules (entry points are loaded by importlib.metadata).
DYNAMIC_IMPORT_ALLOWED = {"core/registry.py"}


def source_files() -> list[Path]:
    files = []
    for root in SOURCE_ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO)
            if not {"build", "tests", ".eggs"} & set(rel.parts[:-1]):
                files.append(path)
    return files


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> Any:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return "<missing>"


def unsafe_constructs(path: Path, rel: str | None = None) -> list[str]:
    """Places in ``path`` (shown as ``rel``, by default relative to the repository) that could
    unpickle, execute or import something a file or config names."""
    rel = rel or path.relative_to(REPO).as_posix()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    found = []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = _dotted(node.func)
            last = func.rsplit(".", 1)[-1]
            if func in ("torch.load",) and _keyword(node, "weights_only") is not True:
                found.append(f"{where}: torch.load without weights_only=True")
            elif last == "load" and func.split(".")[0] in ("np", "numpy") and _keyword(node, "allow_pickle") not in ("<missing>", False):
                found.append(f"{where}: numpy load with allow_pickle")
            elif func in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
                found.append(f"{where}: {func} (use yaml.safe_load)")
            elif func in ("eval", "exec", "compile"):
                found.append(f"{where}: {func}()")
            elif func == "__import__" and not (node.args and isinstance(node.args[0], ast.Constant)):
                found.append(f"{where}: __import__ of a computed name")
            elif (
                last == "import_module" and rel not in DYNAMIC_IMPORT_ALLOWED and not (node.args and isinstance(node.args[0], ast.Constant))
            ):
                found.append(f"{where}: import_module of a computed name")
            if _keyword(node, "trust_remote_code") is True:
                found.append(f"{where}: trust_remote_code=True hard-coded")
    return found


def test_the_scan_sees_the_source_tree():
    names = {p.relative_to(REPO).as_posix() for p in source_files()}
    assert {"core/registry.py", "core/checkpointing.py", "builtin_plugins/adapter_lora.py", "qlora_plugins/cli.py"} <= names


def test_the_scan_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport torch, yaml, importlib\ntorch.load(f)\ntorch.load(f, weights_only=False)\n"
        "yaml.load(s)\neval(s)\nimportlib.import_module(name)\nm.from_pretrained(p, trust_remote_code=True)\n"
        "torch.load(f, weights_only=True)\n"
    )
    found = unsafe_constructs(bad, "bad.py")
    assert sorted(f.split(": ", 1)[0] for f in found) == [f"bad.py:{n}" for n in (1, 3, 4, 5, 6, 7, 8)], found


def test_no_unpickling_code_execution_or_computed_imports_in_the_source_tree():
    found = [problem for path in source_files() for problem in unsafe_constructs(path)]
    assert found == []


# --- pickled files we are handed -----------------------------------------------------------


class Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran while unpickling')",))


def write_pickle(path: Path, marker: Path) -> None:
    import torch

    torch.save({"model.embed_tokens.weight": Payload(marker)}, str(path))
    assert not marker.exists()
    with pytest.raises(Exception):  # sanity: the file really is a payload that weights_only refuses
        torch.load(str(path), weights_only=True)
    assert not marker.exists()


def test_a_pickled_checkpoint_is_never_unpickled(tiny_llama_dir, tmp_path):
    """A model directory holding pytorch_model.bin (a pickle) instead of safetensors: the run
    fails without running the pickle's code and without writing a run directory (that the
    failure is one clear line is pinned in test_bad_inputs.py)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    write_pickle(model / "pytorch_model.bin", marker)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(base_config(model={"path": str(model)}, data=None, train={"enabled": False})))
    out = tmp_path / "out"
    for quantizer in ("nf4", "none"):
        result = invoke("run", config, "-o", out, "--no-progress", "--set", f"quantizer.name={quantizer}")
        assert result.exit_code != 0
        assert not marker.exists(), f"unpickling ran code (quantizer {quantizer})"
        assert not out.exists()


def test_a_pickled_adapter_is_never_unpickled(tiny_llama_dir, tmp_path):
    """An adapter directory with adapter_model.bin (a pickle): loading it through the adapter
    plugin (what `qlora export` does with RUN/adapter) fails without running the pickle's code."""
    from transformers import AutoModelForCausalLM

    from qlora_plugins import AdapterContext

    adapter = new_registry().create("adapter", "lora", {"r": 2, "target_modules": ["q_proj"]})
    context = AdapterContext(task="causal_lm", quantized=False)
    directory = tmp_path / "adapter"
    adapter.save(adapter.attach(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), context), directory)
    (directory / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    write_pickle(directory / "adapter_model.bin", marker)
    with pytest.raises(Exception):
        adapter.load(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), directory, context)
    assert not marker.exists()


# --- trust_remote_code ---------------------------------------------------------------------

MISSING = "<not passed>"


@pytest.fixture(scope="module", params=[False, True], ids=["trust-false", "trust-true"])
def recorded_run(request, tmp_path_factory):
    """A quantize-and-export run (train off) with model.trust_remote_code set as the param,
    recording the trust_remote_code every transformers Auto class call received."""
    import transformers

    root = tmp_path_factory.mktemp("trust")
    config = root / "c.yaml"
    model = {"source": "tiny-llama", "trust_remote_code": request.param}
    config.write_text(yaml.safe_dump(base_config(model=model, data=None, train={"enabled": False})))
    calls: list[tuple[str, Any]] = []
    with pytest.MonkeyPatch.context() as mp:
        for cls_name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModel"):
            cls = getattr(transformers, cls_name)
            for method in ("from_pretrained", "from_config"):
                original = getattr(cls, method, None)
                if original is None:
                    continue

                def spy(*args: Any, _name: str = f"{cls_name}.{method}", _original: Any = original, **kwargs: Any) -> Any:
                    calls.append((_name, kwargs.get("trust_remote_code", MISSING)))
                    return _original(*args, **kwargs)

                mp.setattr(cls, method, spy)
        result = invoke("run", config, "-o", root / "run", "--no-progress")
    report = json.loads((root / "run" / "report.json").read_text()) if result.exit_code == 0 else None
    return request.param, result, calls, report


def test_trust_remote_code_reaches_transformers_only_when_configured(recorded_run):
    trust, result, calls, _ = recorded_run
    assert result.exit_code == 0, result.output
    called = {name for name, _ in calls}
    assert {"AutoTokenizer.from_pretrained", "AutoConfig.from_pretrained", "AutoModelForCausalLM.from_config"} <= called, calls
    if trust:
        ours = [value for name, value in calls if name in ("AutoTokenizer.from_pretrained", "AutoModelForCausalLM.from_config")]
        assert ours and all(value is True for value in ours), calls
    else:
        assert all(value in (False, MISSING) for _, value in calls), [c for c in calls if c[1] not in (False, MISSING)]


def test_the_report_says_whether_remote_code_was_trusted(recorded_run):
    trust, _, _, report = recorded_run
    assert report["model"]["trust_remote_code"] is trust


# --- configs cannot import Python ----------------------------------------------------------

SENTINEL = "qlora_sentinel_xyz"


@pytest.fixture
def sentinel_module(tmp_path, monkeypatch):
    """A module on sys.path that leaves a marker file when it is imported."""
    marker = tmp_path / "imported"
    site = tmp_path / "site"
    site.mkdir()
    (site / f"{SENTINEL}.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\nclass Plugin: pass\ndef plugin(*a): pass\n")
    monkeypatch.syspath_prepend(str(site))
    yield marker
    sys.modules.pop(SENTINEL, None)


IMPORT_LIKE_NAMES = [
    SENTINEL,
    f"{SENTINEL}:Plugin",
    f"{SENTINEL}.Plugin",
    "os.system",
    "os:system",
    "builtins:exec",
    "qlora_plugins.builtin_plugins.quantizer_none:NoQuantization",
    "subprocess.Popen",
]
PLUGIN_PATHS = {
    "quantizer.name": "unknown quantizer",
    "adapter.name": "unknown adapter",
    "optimizer.name": "unknown optimizer",
    "data.name": "unknown data format",
    "export.0.name": "unknown exporter",
    "model.source": "unknown model source",
}


@pytest.mark.parametrize("path", sorted(PLUGIN_PATHS))
def test_a_plugin_name_is_never_imported(path, sentinel_module, write_config):
    config = write_config(base_config())
    for name in IMPORT_LIKE_NAMES:
        result = invoke("validate", config, "--set", f"{path}={name}")
        assert result.exit_code == 2, (name, result.output)
        assert PLUGIN_PATHS[path] in result.stderr and f"'{name}'" in result.stderr, result.stderr
        assert "Traceback" not in result.output
    assert not sentinel_module.exists() and SENTINEL not in sys.modules


@pytest.mark.parametrize(
    "text",
    [
        f"model: !!python/object/apply:{SENTINEL}.plugin [1]\n",
        "model: !!python/object/apply:os.system ['true']\n",
        f"model: !!python/name:{SENTINEL}.Plugin\n",
        f"model: !!python/module:{SENTINEL}\n",
    ],
)
def test_yaml_tags_cannot_build_python_objects(text, sentinel_module, write_config):
    result = invoke("validate", write_config(text))
    assert result.exit_code == 2 and "invalid YAML" in result.stderr, result.output
    assert not sentinel_module.exists() and SENTINEL not in sys.modules


@pytest.mark.parametrize(
    "template", ["{instruction.__class__}", "{instruction.__class__.__mro__}", "{instruction[0]}", "{input_block.upper}"]
)
def test_templates_cannot_reach_python_attributes(template, write_config):
    """An instruction template may only name its placeholders: `{instruction.__class__...}`
    would otherwise format Python internals into the training data."""
    result = invoke("validate", write_config(base_config()), "--set", f"data.template='{template}'")
    assert result.exit_code == 2, result.output
    assert "data.template: " in result.stderr and "Traceback" not in result.output


# --- exporters stay inside their output directory ------------------------------------------

ESCAPES = ["../escape", "..", ".", "/tmp/escape", "a/b", ".hidden", "a\\b", "C:evil", ""]


@pytest.mark.parametrize("directory", ESCAPES)
def test_an_export_directory_option_cannot_leave_the_exports_directory(directory, write_config):
    config = write_config(base_config(export=[{"name": "merged", "directory": directory}]))
    result = invoke("validate", config)
    assert result.exit_code == 2, result.output
    assert "export[0].directory: " in result.stderr and "Traceback" not in result.output


def test_name_checks_refuse_every_escape(tmp_path):
    from qlora_plugins.core.exporting import check_artifact, check_name, safe_path
    from qlora_plugins.errors import ExportError

    for name in ESCAPES:
        with pytest.raises(ExportError):
            check_name(name)
    assert check_name("merged-bf16") == "merged-bf16"
    base = tmp_path / "exports"
    base.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (base / "link").symlink_to(tmp_path / "elsewhere")
    for relative in ("../x", "/etc/passwd", "link/file", "a/../../x"):
        with pytest.raises(ExportError):
            safe_path(base, relative)
    assert safe_path(base, "sub/file.safetensors") == base / "sub" / "file.safetensors"
    # what an exporter wrote may hold no link out of its directory and no pickle
    with pytest.raises(ExportError, match="link"):
        check_artifact(base, "x")
    (base / "link").unlink()
    (base / "weights.bin").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ExportError, match="no pickle"):
        check_artifact(base, "x")
