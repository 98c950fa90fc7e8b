"""Device profiles: one TOML file per board, read into dataclasses and checked against their fields.

The dataclasses below are the schema: a key a profile may hold is a field here, with its type. Unknown keys,
wrong types and unknown providers are errors that name the file and the key.
"""
from __future__ import annotations

import sys
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path

from edge.presets import CHOICES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

HERE = Path(__file__).parent
PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
OPT_LEVELS = ("disable", "basic", "extended", "all")
QUANTS = CHOICES  # fp32, fp16 and the presets of edge/presets.py


class ProfileError(ValueError):
    """A profile file that is missing, unreadable or breaks the schema."""


@dataclass(frozen=True)
class Match:
    """How to recognise the board; any one hit on model, compatible or CPU part counts."""

    dt_model: tuple[str, ...] = ()  # substrings of /proc/device-tree/model
    dt_compatible: tuple[str, ...] = ()  # entries of /proc/device-tree/compatible, matched exactly
    cpu_parts: tuple[str, ...] = ()  # "CPU part" values of /proc/cpuinfo (e.g. "0xd0b", Cortex-A76)
    tegra_release: tuple[str, ...] = ()  # L4T major releases in /etc/nv_tegra_release (e.g. "R36")
    arch: str = ""  # machine architecture the profile is for: "aarch64" or "x86_64"; "" for any
    generic: bool = False  # the fallback for its architecture when no board matches
    needs_gpu: bool = False  # only chosen when onnxruntime offers CUDA (desktop GPUs have no device tree)


@dataclass(frozen=True)
class Provider:
    name: str  # an onnxruntime execution provider, most preferred first in the profile's list
    options: dict = field(default_factory=dict)  # provider options, passed to onnxruntime as given


@dataclass(frozen=True)
class Cpu:
    intra_op_threads: int = 0  # threads for one operator: the performance cores; 0 lets onnxruntime choose
    allow_spinning: bool = True  # busy-wait between ops: faster decode, more power and heat
    spinning_reason: str = ""  # why this profile chose as it did


@dataclass(frozen=True)
class Session:
    graph_optimization: str = "all"  # onnxruntime graph optimization level: disable, basic, extended, all
    optimized_model_cache: bool = False  # keep the optimized graph in ~/.cache/edge-llm/optimized for faster loads


@dataclass(frozen=True)
class Export:
    quant: str = "int4"  # what `edge export --profile` produces for this board
    block_size: int = 32  # int4 block size
    # No accuracy level: every int4 export asks for int8 activations (level 4) and onnxruntime computes in fp32
    # where the CPU lacks the int8 kernels (edge/kernels.py), so a board has nothing to choose.


@dataclass(frozen=True)
class Memory:
    budget_mb: int = 0  # most memory a model may take on this board; 0 = only what the machine has free
    reserve_mb: int = 256  # memory left for the system and other programs
    default_context: int = 4096  # context length used unless the caller asks for another (capped by the model)
    prefix_cache_mb: int = 64  # snapshots of recent prompts' keys and values (edge/prefix.py); 0 = no prefix cache.
    # SmolLM2-135M keeps 45 KB per token, so 64 MB holds about 1,400 tokens of prompts; Qwen2.5-0.5B 24 KB
    huge_pages: bool = False  # transparent huge pages for the weights (the CLI sets glibc's tunable): faster
    # decode where TLB misses cost, slower and more variable loads (the kernel compacts memory for 2 MB pages)


@dataclass(frozen=True)
class Server:
    cors_origins: tuple[str, ...] = ()  # browser origins `edge serve` lets call it (a kiosk UI's); --cors-origin
    # replaces them; "*" for any


@dataclass(frozen=True)
class System:
    """The board's stock OS, which `edge pack` fetches wheels for (the board has no network to fetch them)."""

    python: str = "3.11"  # its python3, major.minor (Raspberry Pi OS bookworm 3.11, trixie 3.13; JetPack 6 3.10)
    glibc: str = "2.36"  # its glibc (bookworm 2.36, trixie 2.41, Ubuntu 22.04 / JetPack 6 2.35)


@dataclass(frozen=True)
class Profile:
    name: str = "cpu"  # the profile's name, as `--profile` takes it
    description: str = ""  # one line for `edge devices`
    notes: str = ""  # what a user of this board should know
    match: Match = Match()
    providers: tuple[Provider, ...] = (Provider("CPUExecutionProvider"),)
    cpu: Cpu = Cpu()
    session: Session = Session()
    export: Export = Export()
    memory: Memory = Memory()
    server: Server = Server()
    system: System = System()
    source: str = field(default="", compare=False)  # the file it came from, for messages

    @property
    def provider_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.providers)

    def with_threads(self, threads: int) -> Profile:
        """This profile with another intra-op thread count (--threads)."""
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        return replace(self, cpu=replace(self.cpu, intra_op_threads=threads))


def profile_names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.toml"))


def all_profiles() -> list[Profile]:
    return [load_profile(name) for name in profile_names()]


def load_profile(name_or_path: str | Path) -> Profile:
    """A bundled profile by name, or any TOML file by path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = HERE / f"{name_or_path}.toml"
    if not path.is_file():
        raise ProfileError(f"no device profile {str(name_or_path)!r}: choose one of {', '.join(profile_names())}, "
                           f"'auto', or a .toml path")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ProfileError(f"{path}: cannot read profile: {e}") from e
    profile = build(Profile, data, path, "")
    check_values(profile, path)
    return replace(profile, source=str(path))


RETIRED = {"export.accuracy_level": "every int4 export uses accuracy level 4, and onnxruntime computes in fp32 "
                                   "where the CPU lacks int8 kernels; delete the key (edge export --accuracy-level 0 "
                                   "still makes an fp32-compute bundle)"}


def build(cls, data: dict, path: Path, prefix: str):
    """An instance of dataclass `cls` from a TOML table, checking every key and type."""
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: {prefix.rstrip('.') or 'the file'} must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.name != "source"}
    values = {}
    for key, value in data.items():
        if prefix + key in RETIRED:
            raise ProfileError(f"{path}: {prefix + key!r} is no longer a profile setting: {RETIRED[prefix + key]}")
        if key not in known:
            raise ProfileError(f"{path}: unknown key {prefix + key!r} (known: {', '.join(sorted(known))})")
        values[key] = convert(hints[key], value, path, prefix + key)
    return cls(**values)


def convert(hint, value, path: Path, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if is_dataclass(hint):
        return build(hint, value, path, key + ".")
    if origin is tuple:
        if not isinstance(value, list):
            raise ProfileError(f"{path}: {key!r} must be a list")
        return tuple(convert(args[0], item, path, f"{key}[{i}]") for i, item in enumerate(value))
    want = origin or hint
    if not isinstance(value, want) or (want in (int, float) and isinstance(value, bool)):
        raise ProfileError(f"{path}: {key!r} must be {want.__name__}, not {type(value).__name__}")
    return value


def check_values(profile: Profile, path: Path) -> None:
    bad = [p.name for p in profile.providers if p.name not in PROVIDERS]
    if bad:
        raise ProfileError(f"{path}: 'providers' has unknown provider(s) {bad}; known: {', '.join(PROVIDERS)}")
    if not profile.providers:
        raise ProfileError(f"{path}: 'providers' must name at least one provider")
    checks = [
        ("session.graph_optimization", profile.session.graph_optimization in OPT_LEVELS, f"one of {OPT_LEVELS}"),
        ("export.quant", profile.export.quant in QUANTS, f"one of {QUANTS}"),
        ("memory.default_context", profile.memory.default_context > 0, "positive"),
        ("memory.prefix_cache_mb", profile.memory.prefix_cache_mb >= 0, ">= 0 (0 turns the prefix cache off)"),
        ("match.arch", profile.match.arch in ("", "aarch64", "x86_64"), "'aarch64', 'x86_64' or ''"),
    ]
    for key, ok, want in checks:
        if not ok:
            raise ProfileError(f"{path}: {key!r} must be {want}")
