"""Load and check a device profile: a TOML file naming providers, threads and session options."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

HERE = Path(__file__).parent
KNOWN_PROVIDERS = {"CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"}
OPT_LEVELS = ("disable", "basic", "extended", "all")
SCHEMA = {
    "name": str, "description": str, "providers": list,
    "cpu": {"intra_op_threads": int, "allow_spinning": bool},
    "session": {"graph_optimization": str},
}


class ProfileError(ValueError):
    """A profile file that is missing, unreadable or breaks the schema."""


@dataclass(frozen=True)
class Profile:
    name: str = "cpu"  # the profile's name, as `--profile` takes it
    description: str = ""  # one line for `edge devices`
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # execution providers, most preferred first
    intra_op_threads: int = 0  # 0: onnxruntime's choice (one per physical core)
    allow_spinning: bool = True  # busy-wait between ops: faster decode, more idle power
    graph_optimization: str = "all"  # onnxruntime graph optimization level
    source: str = field(default="", compare=False)  # the file it came from, for messages


def profile_names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.toml"))


def load_profile(name_or_path: str | Path = "cpu") -> Profile:
    """A bundled profile by name, or any TOML file by path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        if str(name_or_path) == "auto":  # board detection is issue 3; until then every board is a CPU
            path = HERE / "cpu.toml"
        else:
            path = HERE / f"{name_or_path}.toml"
    if not path.is_file():
        raise ProfileError(f"no device profile {str(name_or_path)!r}: choose one of {', '.join(profile_names())} or pass a .toml path")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ProfileError(f"{path}: cannot read profile: {e}") from e
    _check(data, SCHEMA, path, "")
    return _build(data, path)


def _check(data: dict, schema: dict, path: Path, prefix: str) -> None:
    for key, value in data.items():
        if key not in schema:
            raise ProfileError(f"{path}: unknown key {prefix + key!r}")
        want = schema[key]
        if isinstance(want, dict):
            if not isinstance(value, dict):
                raise ProfileError(f"{path}: {prefix + key!r} must be a table")
            _check(value, want, path, f"{prefix}{key}.")
        elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ProfileError(f"{path}: {prefix + key!r} must be {want.__name__}, not {type(value).__name__}")


def _build(data: dict, path: Path) -> Profile:
    providers = tuple(data.get("providers", ["CPUExecutionProvider"]))
    unknown = [p for p in providers if p not in KNOWN_PROVIDERS]
    if unknown:
        raise ProfileError(f"{path}: unknown provider(s) {unknown}; known: {sorted(KNOWN_PROVIDERS)}")
    level = data.get("session", {}).get("graph_optimization", "all")
    if level not in OPT_LEVELS:
        raise ProfileError(f"{path}: 'session.graph_optimization' must be one of {OPT_LEVELS}")
    cpu = data.get("cpu", {})
    return Profile(
        name=data.get("name", path.stem), description=data.get("description", ""), providers=providers,
        intra_op_threads=cpu.get("intra_op_threads", 0), allow_spinning=cpu.get("allow_spinning", True),
        graph_optimization=level, source=str(path),
    )
