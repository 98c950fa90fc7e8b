"""edge.wheelhouse: the wheels a board needs, chosen the same way for the ARM64 test bed and the board installer."""
from __future__ import annotations

import zipfile

import pytest

from edge.wheelhouse import Target, check, download_command, host_pins, requirements


def test_every_manylinux_tag_up_to_the_boards_glibc():
    tags = Target("aarch64", "3.11", "2.36").platform_tags()
    assert tags[0] == "manylinux_2_36_aarch64" and tags[-2:] == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    assert len(tags) == 36 - 17 + 2
    with pytest.raises(ValueError, match="older than 2.17"):
        Target("aarch64", "3.11", "2.12").platform_tags()


def test_the_runtime_requirements_without_the_extras():
    reqs = requirements()
    names = {r.split(">")[0].split("=")[0].split(";")[0].strip() for r in reqs}
    assert {"onnxruntime", "numpy", "tokenizers", "starlette", "uvicorn"} <= names
    assert not names & {"torch", "transformers", "optimum-onnx", "pytest", "onnx"}


def test_the_download_is_pinned_to_this_environment_and_binary_only(tmp_path):
    pins = host_pins()
    assert any(p.startswith("numpy==") for p in pins) and not any(p.lower().startswith("edge-llm") for p in pins)
    command = download_command(Target("aarch64", "3.11", "2.36"), tmp_path, ["numpy"], tmp_path / "c.txt")
    assert "--only-binary=:all:" in command and command[command.index("--python-version") + 1] == "3.11"
    assert command.count("--platform") == 21 and command[command.index("-c") + 1] == str(tmp_path / "c.txt")


def wheel(folder, name: str, files: dict[str, str]):
    with zipfile.ZipFile(folder / name, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


@pytest.mark.parametrize("name, files, message", [
    ("numpy-2.0.tar.gz", None, "not wheels"),
    ("numpy-2.0-cp311-cp311-manylinux_2_28_x86_64.whl", {"numpy/__init__.py": ""}, "is not for aarch64"),
    ("llguidance-0.0.1-py3-none-any.whl", {"llguidance-0.0.1.dist-info/METADATA": ""}, "placeholder"),
])
def test_what_a_board_cannot_use_is_refused(tmp_path, name, files, message):
    target = Target("aarch64", "3.11", "2.36")
    wheel(tmp_path, "idna-3.0-py3-none-any.whl", {"idna/__init__.py": "", "idna-3.0.dist-info/METADATA": ""})
    assert [p.name for p in check(tmp_path, target)] == ["idna-3.0-py3-none-any.whl"]
    if files is None:
        (tmp_path / name).write_text("sdist")
    else:
        wheel(tmp_path, name, files)
    with pytest.raises(RuntimeError, match=message):
        check(tmp_path, target)
