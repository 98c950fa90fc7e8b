"""edge-llm's device runtime: load a bundle, generate text. Never imports torch, transformers or optimum."""
from edge.bundle import BundleError
from edge.chat import ChatTemplateError
from edge.engine import Engine, load
from edge.generate import ContextError, ContextLengthError, GenerationParams, Record

__version__ = "0.1.0"
__all__ = ["load", "Engine", "GenerationParams", "Record", "BundleError", "ContextError", "ContextLengthError",
           "ChatTemplateError"]
