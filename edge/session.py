"""The one place that turns a device profile into an onnxruntime InferenceSession."""
from __future__ import annotations

import sys
from pathlib import Path

import onnxruntime as ort

from devices import Profile

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(profile: Profile) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[profile.graph_optimization]
    options.intra_op_num_threads = profile.intra_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if profile.allow_spinning else "0")
    return options


def available(profile: Profile) -> list[str]:
    """The profile's providers that this onnxruntime build has, in the profile's order; CPU always last resort."""
    have = set(ort.get_available_providers())
    chosen = [p for p in profile.providers if p in have]
    dropped = [p for p in profile.providers if p not in have]
    if dropped:
        print(f"edge: providers {dropped} are not in this onnxruntime build; using {chosen or ['CPUExecutionProvider']}",
              file=sys.stderr)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def make_session(model: Path, profile: Profile) -> ort.InferenceSession:
    return ort.InferenceSession(str(model), sess_options=session_options(profile), providers=available(profile))
