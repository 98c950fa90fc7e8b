"""edge-llm's device runtime: load a bundle, generate text. Never imports torch, transformers or optimum.

The wheel installs one top-level name: the board profiles and the exporter are `edge.devices` and `edge.export`
there, while a checkout keeps them in the folders devices/ and export/ beside edge/. In a checkout (or an editable
install) they are registered under the same names here, so that the same imports work in both.
"""


def _checkout_subpackages() -> None:
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("devices", "export"):
        folder = os.path.join(os.path.dirname(here), name)
        if os.path.isdir(os.path.join(here, name)) or not os.path.isfile(os.path.join(folder, "__init__.py")):
            continue  # installed from the wheel, or not a checkout
        spec = importlib.util.spec_from_file_location(f"edge.{name}", os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        globals()[name] = module


_checkout_subpackages()

from edge.bundle import BundleError
from edge.chat import ChatTemplateError
from edge.engine import Engine, load
from edge.generate import ContextError, ContextLengthError, GenerationParams, Record

__version__ = "0.1.0"
__all__ = ["load", "Engine", "GenerationParams", "Record", "BundleError", "ContextError", "ContextLengthError",
           "ChatTemplateError"]
