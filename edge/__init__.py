"""edge-llm's device runtime: load a bundle, generate text. Never imports torch, transformers or optimum.

The wheel installs one top-level name: the board profiles and the exporter are `edge.devices` and `edge.export`
there, while a checkout keeps them in the folders devices/ and export/ beside edge/. In a checkout (or an editable
install) a finder registered here imports them under the same names, so that the same imports work in both.
"""


def _checkout_subpackages() -> None:
    """In a checkout, a finder that imports edge.devices and edge.export from the folders beside edge/, on first
    use (so `import edge` alone loads neither)."""
    import importlib.abc
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    folders = {f"edge.{name}": os.path.join(os.path.dirname(here), name) for name in ("devices", "export")}
    if os.path.isdir(os.path.join(here, "devices")) or not all(
            os.path.isfile(os.path.join(f, "__init__.py")) for f in folders.values()):
        return  # installed from the wheel, or not a checkout

    class CheckoutFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name not in folders:
                return None
            return importlib.util.spec_from_file_location(name, os.path.join(folders[name], "__init__.py"),
                                                          submodule_search_locations=[folders[name]])

    if not any(type(f).__name__ == "CheckoutFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, CheckoutFinder())


_checkout_subpackages()

# The API is imported on first use (PEP 562), not here: `import edge.devices` or `edge.export` must not load
# onnxruntime, and `edge doctor` must be able to say why on a board where onnxruntime cannot be installed.
_API = {"BundleError": "edge.bundle", "ChatTemplateError": "edge.chat", "Engine": "edge.engine", "load": "edge.engine",
        "ContextError": "edge.generate", "ContextLengthError": "edge.generate", "GenerationParams": "edge.generate",
        "Record": "edge.generate", "ConstraintError": "edge.constraint"}


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'edge' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)


__version__ = "0.1.0"
__all__ = ["load", "Engine", "GenerationParams", "Record", "BundleError", "ContextError", "ContextLengthError",
           "ChatTemplateError", "ConstraintError"]
