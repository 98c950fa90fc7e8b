"""The one place that turns a device profile into an onnxruntime InferenceSession.

Providers fall back one by one to what this onnxruntime build really has, and the providers in use are read
back from the created session: `get_available_providers()` can list CUDA when its libraries are missing.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import onnxruntime as ort

from edge.devices import Profile
from edge.bundle import BundleError, cache_dir

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# GatherBlockQuantized with a `bits` attribute (the int4/int8 embedding shared with lm_head) arrived in 1.23:
# 1.22.0 and older refuse those bundles (checked in fresh environments with 1.20.1, 1.21.1, 1.22.0, 1.23.2, 1.24.4).
MIN_ONNXRUNTIME = (1, 23)
_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"edge: {message}", file=sys.stderr)


def onnxruntime_version() -> tuple[int, ...]:
    return tuple(int(part) for part in ort.__version__.split(".")[:2] if part.isdigit())


def too_old_for(minimum: str | None) -> bool:
    """Whether this onnxruntime is older than a bundle's onnx.min_onnxruntime."""
    return bool(minimum) and onnxruntime_version() < tuple(int(p) for p in minimum.split("."))


def require_onnxruntime(minimum: str | None, bundle: Path) -> None:
    # Newer than the floor only where the graph needs it: sliding-window attention is one token wider before
    # 1.24 (microsoft/onnxruntime#25927), which would give wrong text, not an error.
    if too_old_for(minimum):
        raise BundleError(f"{bundle}: this bundle needs onnxruntime >= {minimum} (its sliding-window attention is "
                          f"computed one token too wide by older versions); this is {ort.__version__}: "
                          f"pip install -U onnxruntime")


def session_options(profile: Profile) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: onnxruntime's warnings are for its developers, ours go to stderr
    options.graph_optimization_level = LEVELS[profile.session.graph_optimization]
    options.intra_op_num_threads = profile.cpu.intra_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if profile.cpu.allow_spinning else "0")
    return options


def usable(profile: Profile, have) -> list[tuple[str, dict]]:
    """The profile's providers that are in `have`, in order, with their options; CPU always last."""
    chosen = [(p.name, _options(p.options)) for p in profile.providers if p.name in have]
    if "CPUExecutionProvider" not in [name for name, _ in chosen]:
        chosen.append(("CPUExecutionProvider", {}))
    return chosen


def providers(profile: Profile) -> list[tuple[str, dict]]:
    """usable() for this onnxruntime build, saying once which providers it lacks."""
    have = set(ort.get_available_providers())
    dropped = [p.name for p in profile.providers if p.name not in have]
    if dropped:
        warn_once(f"profile {profile.name}: {', '.join(dropped)} not in this onnxruntime build "
                  f"({ort.__version__}, has {', '.join(sorted(have))}); falling back")
    return usable(profile, have)


def _options(options: dict) -> dict[str, str]:
    """onnxruntime reads provider options as strings; cache folders may start with ~."""
    def text(key, value):
        if isinstance(value, bool):
            return "1" if value else "0"
        return os.path.expanduser(str(value)) if key.endswith(("_path", "_dir")) else str(value)
    return {key: text(key, value) for key, value in options.items()}


def make_session(model: Path, profile: Profile, model_sha256: str = "") -> ort.InferenceSession:
    wanted = providers(profile)
    if not (profile.session.optimized_model_cache and model_sha256):
        return _create(model, session_options(profile), wanted)
    cached = _optimized_path(f"{model_sha256}:{profile.name}:{[n for n, _ in wanted]}")
    if cached.is_file():
        options = session_options(profile)
        options.graph_optimization_level = LEVELS["disable"]  # already optimized; skip the work
        try:
            return _create(cached, options, wanted)
        except Exception as e:  # e.g. cut short by a power loss on an SD card: rebuild it from the bundle
            warn_once(f"the optimized-model cache {cached.name} could not be loaded ({str(e)[:120]}); rebuilding it")
            _discard(cached)
    return _create_and_cache(model, profile, wanted, cached)


def make_profiled_session(model: Path, profile: Profile, folder: Path) -> tuple[ort.InferenceSession, Path]:
    """A session that records every node's kernel time (onnxruntime's profiler; `end_profiling()` writes the JSON
    into `folder` and returns its name), and the graph it runs as optimized, saved in `folder` so that its node
    names and weights can be read. For `edge bench --profile-ops` only."""
    options = session_options(profile)
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "ops")
    optimized = folder / "optimized.onnx"
    options.optimized_model_filepath = str(optimized)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return _create(model, options, providers(profile)), optimized


def _create(model: Path, options: ort.SessionOptions, wanted: list[tuple[str, dict]]) -> ort.InferenceSession:
    try:
        session = ort.InferenceSession(str(model), sess_options=options, providers=[n for n, _ in wanted],
                                       provider_options=[o for _, o in wanted])
    except Exception as e:
        if onnxruntime_version() < MIN_ONNXRUNTIME:
            raise RuntimeError(f"onnxruntime {ort.__version__} cannot load {model} ({str(e)[:200]}); edge-llm needs "
                               f"onnxruntime >= {'.'.join(map(str, MIN_ONNXRUNTIME))}") from e
        raise
    missing = [name for name, _ in wanted if name not in session.get_providers()]
    if missing:
        warn_once(f"{', '.join(missing)} could not start (libraries missing?); running on "
                  f"{', '.join(session.get_providers())}")
    return session


def _optimized_path(identity: str) -> Path:
    """Where the graph onnxruntime optimized for this model, profile, providers and onnxruntime version lives."""
    key = hashlib.sha256(f"{identity}:{ort.__version__}".encode()).hexdigest()[:24]
    return cache_dir("optimized") / f"{key}.onnx"


def _create_and_cache(model: Path, profile: Profile, wanted: list, cached: Path) -> ort.InferenceSession:
    """Optimize the bundle's graph and have onnxruntime save the result under a temporary name, renamed only once
    the session exists: a cache entry is whole or absent."""
    options = session_options(profile)
    partial = cached.with_suffix(".partial")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        options.optimized_model_filepath = str(partial)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         f"{cached.name}.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    except OSError:
        return _create(model, session_options(profile), wanted)  # a read-only home only costs the work next time
    session = _create(model, options, wanted)
    try:  # on disk before the rename, so that a power cut cannot leave a whole-looking entry of zeroed pages
        for path in (p for p in (cached.with_name(cached.name + ".data"), partial) if p.exists()):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        partial.replace(cached)
    except OSError:
        pass
    return session


def _discard(cached: Path) -> None:
    for path in (cached, cached.with_name(cached.name + ".data")):
        path.unlink(missing_ok=True)
