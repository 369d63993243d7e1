"""The evaluator plugin kind (issue 14): ``register_evaluators``, the builtin ``perplexity`` and
``lm_eval`` evaluators, ``qlora eval`` and the ``eval`` config section (base and fine-tuned side by
side in report.json and a table), and a third-party evaluator package installed with pip."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HELDOUT, LM_EVAL_TASK, REPO, install_example

from qlora_plugins import EvalContext, Evaluator, hookimpl
from qlora_plugins.api import RunReport
from qlora_plugins.evaluation import format_results, token_weighted_perplexity
from qlora_plugins.testing import make_registry, run_cli


def _manual_perplexity(model_dir: Path, lines: list[str]) -> tuple[float, int]:
    """exp(token-weighted mean NLL) with transformers' own loss, one line (+ EOS) at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    total, count = 0.0, 0
    for line in lines:
        ids = torch.tensor([tok(line)["input_ids"] + [tok.eos_token_id]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        total += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(total / count), count


def test_the_eval_section_runs_after_training_base_and_fine_tuned(trained_run):
    report = trained_run["report"]
    result = report["evaluations"]["perplexity"]
    assert set(result) == {"base", "fine_tuned", "seconds"}
    assert result["base"]["tokens"] == result["fine_tuned"]["tokens"] > 0 and result["base"]["sequences"] == 4
    assert result["base"]["perplexity"] != result["fine_tuned"]["perplexity"]  # the adapter changed the model
    on_disk = json.loads((trained_run["dir"] / "report.json").read_text())
    assert on_disk["evaluations"]["perplexity"]["fine_tuned"] == pytest.approx(result["fine_tuned"])
    assert [e["name"] for e in on_disk["plugins"]["evaluators"]] == ["perplexity"]
    assert "evaluations" in {f.name for f in __import__("attrs").fields(RunReport)}
    table = format_results(report["evaluations"])
    assert table.splitlines()[0].split() == ["evaluator", "metric", "base", "fine-tuned", "change"]
    assert any(line.split()[:2] == ["perplexity", "perplexity"] for line in table.splitlines())


def test_qlora_eval_perplexity_matches_transformers_loss_on_the_merged_export(trained_run, tmp_path):
    lines = HELDOUT.read_text().splitlines()[:3]
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n".join(lines) + "\n")
    result = run_cli("eval", trained_run["merged"], "-e", "perplexity", "--option", f"path={heldout}", "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)["perplexity"]
    expected, tokens = _manual_perplexity(trained_run["merged"], lines)
    assert figures["fine_tuned"]["tokens"] == tokens
    assert figures["fine_tuned"]["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert figures["base"]["perplexity"] != pytest.approx(expected, rel=1e-5)  # the base: loaded through nf4, no adapter
    assert figures["options"]["path"] == str(heldout)


def test_qlora_eval_on_a_run_uses_its_eval_section_and_records_the_results(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run["dir"], run_dir, ignore=shutil.ignore_patterns("exports", "checkpoints"))
    result = run_cli("eval", run_dir, "-e", "perplexity", "--no-base")
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["evaluator", "metric", "fine-tuned"]
    recorded = json.loads((run_dir / "report.json").read_text())["evaluations"]["perplexity"]
    assert "base" not in recorded and recorded["options"]["max_examples"] == 4  # from the run's eval section
    # the run's adapter, loaded back, measures what the run measured after training
    assert recorded["fine_tuned"]["perplexity"] == pytest.approx(
        trained_run["report"]["evaluations"]["perplexity"]["fine_tuned"]["perplexity"], rel=1e-5
    )


def test_perplexity_of_chat_rows_and_windows(trained_run):
    from qlora_plugins.inference import load_target

    target = load_target(trained_run["merged"], make_registry())
    tok, model = target.tokenizer, target.model
    ids = tok("a longer line of text to cut into windows")["input_ids"]
    whole = token_weighted_perplexity(model, [ids], window=len(ids))
    assert whole["tokens"] == len(ids) - 1
    cut = token_weighted_perplexity(model, [ids], window=8)
    assert cut["tokens"] == len(ids) - math.ceil(len(ids) / 8) and cut["perplexity"] != whole["perplexity"]
    from qlora_plugins.builtin_plugins.evaluator_perplexity import Perplexity, PerplexityOptions

    evaluator = Perplexity(PerplexityOptions(path="rows.jsonl"))
    rows = HELDOUT.parent / "rows_tmp_perplexity.jsonl"
    try:
        rows.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
        evaluator.options.path = rows.name
        figures = evaluator.evaluate(EvalContext(model, tok, "cpu", "causal_lm", "model", False, HELDOUT.parent))
        expected = tok("user: hi\nassistant: hello\n")["input_ids"] + [tok.eos_token_id]
        assert figures["tokens"] == len(expected) - 1
    finally:
        rows.unlink()


def _one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], result.stderr


def test_bad_input_is_one_line(trained_run, tmp_path, write_config, tiny_llama_dir, tiny_bert_dir):
    merged = trained_run["merged"]
    _one_line_error(run_cli("eval", tmp_path / "missing", "-e", "perplexity", "--option", "path=x.txt"), "does not exist")
    _one_line_error(run_cli("eval", tmp_path, "-e", "perplexity", "--option", "path=x.txt"), "is not a run directory")
    _one_line_error(run_cli("eval", merged, "-e", "perplexty", "--option", "path=x.txt"), "did you mean 'perplexity'")
    _one_line_error(run_cli("eval", tiny_llama_dir, "-e", "perplexity"), "path")
    _one_line_error(
        run_cli("eval", tiny_bert_dir, "-e", "perplexity", "--option", f"path={HELDOUT}"), "not seq_cls"
    )  # (an export gets it from its run's eval section)
    _one_line_error(run_cli("eval", merged, "-e", "perplexity", "--option", f"path={tmp_path / 'nope.txt'}"), "not found")
    _one_line_error(run_cli("eval", merged, "-e", "perplexity", "--option", f"path={HELDOUT}", "--option", "window=1"), "window")
    (tmp_path / "data.csv").write_text("a\n")
    _one_line_error(run_cli("eval", merged, "-e", "perplexity", "--option", f"path={tmp_path / 'data.csv'}"), "unsupported file type")
    lm_eval_missing = importlib.util.find_spec("lm_eval") is None
    _one_line_error(
        run_cli("eval", merged, "-e", "lm_eval", "--option", f"task={tmp_path / 'none.yaml'}"),
        "pip install 'qlora-plugins[eval]'" if lm_eval_missing else "task file not found",
    )
    config = write_config({"model": {"source": "tiny-llama"}, "train": {"enabled": False}, "eval": [{"name": "perplexity"}]})
    _one_line_error(run_cli("validate", config), "eval[0]")
    config = write_config(
        {"model": {"source": "tiny-llama"}, "train": {"enabled": False}, "eval": [{"name": "perplexity", "path": "missing.txt"}]}
    )
    _one_line_error(run_cli("run", config, "-o", tmp_path / "out"), "eval[0].path")
    assert not (tmp_path / "out").exists()  # checked before anything was written


class ConstantEvaluator(Evaluator):
    """Reports the label of the model it measured and a constant (a test plugin)."""

    name = "constant_test"

    def evaluate(self, context: EvalContext) -> dict:
        return {"value": 1.0 if context.label == "base" else 2.0, "label": context.label}


class BrokenEvaluator(Evaluator):
    """Raises (a test plugin)."""

    name = "broken_test"

    def evaluate(self, context: EvalContext) -> dict:
        raise RuntimeError("boom")


class EvaluatorPlugin:
    @staticmethod
    @hookimpl
    def register_evaluators(register):
        register(ConstantEvaluator)
        register(BrokenEvaluator)


def test_register_evaluators_hook_and_faults(trained_run):
    registry = make_registry([EvaluatorPlugin])
    assert not registry.broken
    assert registry.get("evaluator", "constant_test") is ConstantEvaluator
    result = run_cli("eval", trained_run["merged"], "-e", "constant_test", "--json", registry=registry)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)["constant_test"]
    assert figures["base"] == {"value": 1.0, "label": "base"} and figures["fine_tuned"] == {"value": 2.0, "label": "fine_tuned"}
    result = run_cli("eval", trained_run["merged"], "-e", "broken_test", registry=make_registry([EvaluatorPlugin]))
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "evaluator 'broken_test'" in errors[0] and "RuntimeError: boom" in errors[0]
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_lm_eval_on_a_local_multiple_choice_task(trained_run):
    pytest.importorskip("lm_eval")
    result = run_cli("eval", trained_run["merged"], "-e", "lm_eval", "--option", f"task={LM_EVAL_TASK}", "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)["lm_eval"]
    rows = [json.loads(line) for line in (LM_EVAL_TASK.parent / "tiny_mc.jsonl").read_text().splitlines()]
    assert figures["fine_tuned"]["qlora_tiny_mc/documents"] == len(rows)
    # the harness's accuracy is the argmax of the choices' log-likelihood, as computed here
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(trained_run["merged"]))
    model = AutoModelForCausalLM.from_pretrained(str(trained_run["merged"])).eval()
    hits = 0
    for row in rows:
        context = tok(f"Question: {row['question']}\nAnswer:")["input_ids"]
        scores = []
        for choice in row["choices"]:
            continuation = tok(" " + choice)["input_ids"]
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            scores.append(float(logp[len(context) - 1 :].gather(1, ids[0, len(context) :, None]).sum()))
        hits += max(range(len(scores)), key=scores.__getitem__) == row["answer"]
    assert figures["fine_tuned"]["qlora_tiny_mc/acc"] == pytest.approx(hits / len(rows))
    assert 0.0 <= figures["base"]["qlora_tiny_mc/acc"] <= 1.0


@pytest.fixture(scope="module")
def exact_match_site(tmp_path_factory) -> Path:
    return install_example(REPO / "examples" / "plugins" / "qlora-exact-match", tmp_path_factory.mktemp("exact-match"))


@pytest.mark.slow
def test_third_party_evaluator_package_installed_with_pip(exact_match_site, trained_run, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"prompt": "Hello", "answer": "zzz"}) + "\n" + json.dumps({"prompt": "Hi", "answer": ""}) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "QLORA_PLUGINS_DISABLE_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(exact_match_site), *filter(None, [os.environ.get("PYTHONPATH")])])
    code = "from qlora_plugins.cli import main; main()"
    args = ["eval", str(trained_run["merged"]), "-e", "exact_match", "--option", f"path={qa}", "--option", "max_new_tokens=4", "--json"]
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)["exact_match"]
    assert figures["fine_tuned"] == {"exact_match": 0.5, "questions": 2}  # "" always matches, "zzz" never
    listed = subprocess.run(
        [sys.executable, "-c", code, "plugins", "--kind", "evaluator"], capture_output=True, text=True, env=env, timeout=300
    )
    assert "exact_match  qlora-exact-match  0.1.0" in listed.stdout
