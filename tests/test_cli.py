"""The `edge` command as users run it, the runtime's import hygiene, and the exporter's refusals."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_edge
from families import STORIES, shared

from edge.export.errors import ExportError
from edge.export.pipeline import export

ROOT = Path(__file__).resolve().parents[1]


def test_run_demo_streams_the_continuation():
    result = run_edge("run", "demo", "Once upon a time", "--max-tokens", "20")
    assert result.stdout.startswith(", there was a little girl")
    assert result.stdout == run_edge("run", "demo", "--max-tokens", "20", stdin="Once upon a time").stdout


def test_every_command_prints_its_help(capsys):
    """argparse formats help text with %: a stray one in a preset summary or a parameter's help breaks --help."""
    from edge.cli import parser

    commands = parser()._subparsers._group_actions[0].choices
    assert "export" in commands
    for name in commands:
        with pytest.raises(SystemExit) as done:
            parser().parse_args([name, "--help"])
        assert done.value.code == 0 and "usage" in capsys.readouterr().out


def test_run_flags_reach_the_sampler():
    args = ["run", "demo", "Once upon a time", "--max-tokens", "30", "--temperature", "1.0", "--top-k", "40",
            "--top-p", "0.9", "--min-p", "0.02", "--repetition-penalty", "1.1"]
    a = run_edge(*args, "--seed", "3").stdout
    assert a == run_edge(*args, "--seed", "3").stdout and a != run_edge(*args, "--seed", "4").stdout
    stopped = run_edge("run", "demo", "Once upon a time", "--max-tokens", "50", "--stop", "Lily").stdout
    assert stopped == ", there was a little girl named \n"


def test_chat_refuses_a_bundle_without_template():
    result = run_edge("chat", "demo", stdin="hello\n", check=False)
    assert result.returncode == 1 and "no chat template" in result.stderr


def test_chat_holds_a_conversation(exports):
    import edge

    bundle = exports.bundle("qwen3")
    too_long = "word " * 300  # more than the fixture's 256-token context: refused, and the chat goes on
    result = run_edge("chat", str(bundle), "--max-tokens", "5", "--seed", "0", stdin=f"Hello\n{too_long}\nAnd again\n")
    assert result.returncode == 0 and "context holds 256" in result.stderr
    engine, messages, replies = edge.load(bundle), [], []
    for line in ("Hello", "And again"):  # the same conversation without the refused turn
        messages.append({"role": "user", "content": line})
        replies.append(engine.generate(messages=messages, max_tokens=5, seed=0))
        messages.append({"role": "assistant", "content": replies[-1]})
    assert result.stdout == "".join(reply + "\n" for reply in replies)


def test_bad_bundle_is_one_clear_line(tmp_path):
    result = run_edge("run", "demo-typo", "hi", check=False)
    assert result.returncode == 1 and result.stderr.strip().startswith("edge: error:") and "Traceback" not in result.stderr


def test_runtime_never_imports_the_exporter_stack():
    code = ("import sys, edge, edge.cli\n"
            "e = edge.load('demo'); e.generate('Once', max_tokens=2)\n"
            "bad = [m for m in ('torch', 'transformers', 'optimum', 'onnx', 'edge.export', 'export') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_run_verbose_says_what_runs_and_how_fast():
    err = run_edge("run", "demo", "Once upon a time", "--max-tokens", "12", "--verbose").stderr
    assert "edge: profile: " in err and "providers: CPUExecutionProvider" in err
    assert "edge: kernels: fp32 compute with " in err and "(this fp32 bundle has no int4 matrix products)" in err
    assert "edge: 12 tokens; first after " in err and " tokens/s" in err


def test_accuracy_level_is_4_or_0(source, tmp_path):
    assert "invalid choice: 2" in run_edge("export", str(source), "-o", str(tmp_path / "b"), "--accuracy-level", "2",
                                           check=False).stderr
    with pytest.raises(ExportError, match="accuracy level 2: choose 4"):
        export(str(source), str(tmp_path / "b"), quant="int4", accuracy_level=2)
    assert not (tmp_path / "b").exists()


def test_runtime_dependencies_exclude_the_exporter_stack():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"]).lower()
    assert not any(heavy in runtime for heavy in ("torch", "transformers", "optimum"))
    assert project["scripts"]["edge"] == "edge.cli:main"


def partial_folders(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".partial-" in p.name]


@pytest.fixture
def source(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(shared(STORIES), copy)
    return copy


@pytest.mark.parametrize("damage, message", [
    (lambda src: (src / "model.safetensors").unlink(), "no weights"),
    (lambda src: [(src / n).unlink() for n in ("tokenizer.json", "tokenizer.model")], "no tokenizer"),
    (lambda src: (src / "config.json").unlink(), "no config.json"),
    (lambda src: _edit_config(src, model_type="gpt2", architectures=["GPT2LMHeadModel"]), "GPT2LMHeadModel.*not supported"),
    (lambda src: _edit_config(src, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "'dynamic' cannot be exported"),
    (lambda src: _edit_config(src, rope_scaling={"type": "longrope", "short_factor": [1] * 4, "long_factor": [2] * 4},
                              original_max_position_embeddings=128),  # head size 8: not for the fast graph
     "'longrope' cannot be exported faithfully on optimum's graph, and this model cannot use the fast graph"),
])
def test_export_refuses_clearly_and_writes_nothing(source, tmp_path, damage, message):
    damage(source)
    with pytest.raises(ExportError, match=message):
        export(str(source), str(tmp_path / "out"), quant="fp32")
    assert not (tmp_path / "out").exists() and not partial_folders(tmp_path)


def _edit_config(src: Path, **changes) -> None:
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))


def test_failed_export_keeps_the_existing_bundle(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(ROOT / "edge" / "demo" / "stories260K", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match="already exists"):
        export(str(source), str(out), quant="fp32")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr("edge.export.quantize.quantize", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export(str(source), str(out), quant="int4", force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not partial_folders(tmp_path)


def test_export_cli_says_what_to_do_without_the_extra(tmp_path):
    # A stand-in `optimum` that fails to import, as on a runtime-only install.
    fake = tmp_path / "fake"
    (fake / "optimum").mkdir(parents=True)
    (fake / "optimum" / "__init__.py").write_text("raise ImportError('No module named optimum')")
    result = subprocess.run([sys.executable, "-m", "edge.cli", "export", str(STORIES), "-o", str(tmp_path / "b")],
                            capture_output=True, text=True, env={"PYTHONPATH": str(fake), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "pip install 'edge-llm[export]'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "b").exists()
