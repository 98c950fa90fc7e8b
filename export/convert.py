"""Checkpoint folder -> fp32 ONNX decoder with a KV cache, through optimum's ONNX exporter."""
from __future__ import annotations

import json
from pathlib import Path

from edge.export.errors import ExportError

# transformers model_type -> the family name written into the manifest
FAMILIES = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
    "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3",
}
# Rope types whose cos/sin tables do not depend on the sequence length, so a traced graph reproduces them.
# "dynamic" and "longrope" switch behaviour on the length at run time, which tracing freezes. The fast graph
# takes longrope up to original_max_position_embeddings, where it is one fixed table (see check_rope).
ROPE_TYPES = {"default", "linear", "llama3"}
FAST_ONLY_ROPE_TYPES = {"longrope"}
WEIGHTS = ("*.safetensors", "pytorch_model*.bin")


def check_source(src: Path) -> dict:
    """The checkpoint's config.json, after checking that everything the export needs is there."""
    if not src.is_dir():
        raise ExportError(f"{src}: no such folder (give a Hugging Face checkpoint folder)")
    if not (src / "config.json").is_file():
        raise ExportError(f"{src}: no config.json; this is not a Hugging Face checkpoint folder")
    if not any(any(src.glob(pattern)) for pattern in WEIGHTS):
        raise ExportError(f"{src}: no weights (*.safetensors or pytorch_model*.bin); download the full checkpoint")
    if not ((src / "tokenizer.json").is_file() or (src / "tokenizer.model").is_file()):
        raise ExportError(f"{src}: no tokenizer (tokenizer.json or tokenizer.model); copy the model's tokenizer files in")
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    check_config(config, src)
    return config


def check_config(config: dict, src: Path) -> None:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        arch = ", ".join(config.get("architectures") or ["?"])
        raise ExportError(f"{src}: architecture {arch} (model_type {model_type!r}) is not supported; "
                          f"supported model types: {', '.join(sorted(FAMILIES))}")


def check_rope(config: dict, src: Path, fast: bool, chosen: bool = False) -> None:
    """Refuse rope scalings the chosen graph cannot reproduce exactly; `chosen`: the user picked the graph."""
    rope = config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    allowed = ROPE_TYPES | (FAST_ONLY_ROPE_TYPES if fast else set())
    if rope_type not in allowed:
        where = ""
        if not fast and rope_type in FAST_ONLY_ROPE_TYPES:
            where = (" on optimum's graph (use --graph auto or fast)" if chosen else
                     " on optimum's graph, and this model cannot use the fast graph")
        raise ExportError(f"{src}: rope_scaling type {rope_type!r} cannot be exported faithfully{where} (its tables "
                          f"change with the sequence length); supported: {', '.join(sorted(allowed))}")


def load_config(src: Path):
    """The checkpoint's transformers config (no weights): what the graph choice needs."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(src)


def resolve_source(src: str) -> Path:
    """A local folder as is; otherwise a hub id, downloaded where a network exists."""
    path = Path(src)
    if path.exists() or src.count("/") != 1:
        return path
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(src))
    except Exception as e:  # no network, unknown repo, gated model...
        raise ExportError(f"{src}: not a local folder, and downloading it from the hub failed: {e}") from e


def load_model(src: Path):
    """The source model in fp32 on the CPU, and its tokenizer, through transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # eager attention is transformers' reference: its sdpa path drops Gemma 2's attention logit softcapping
    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    return model, tokenizer


def to_onnx(model, out: Path) -> Path:
    """Export with optimum; returns the model.onnx path. Fidelity is checked by export.validate, not here."""
    from optimum.exporters.onnx.convert import onnx_export_from_model

    onnx_export_from_model(model, out, task="text-generation-with-past", do_validation=False)
    return out / "model.onnx"


def model_shape(config) -> dict:
    heads = config.num_attention_heads
    return {
        "num_layers": config.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "context_length": config.max_position_embeddings,
    }


def io_names(model_proto) -> dict:
    """The graph's input/output names in the manifest's terms (optimum's naming, checked, not assumed)."""
    inputs = {i.name for i in model_proto.graph.input}
    outputs = {o.name for o in model_proto.graph.output}
    spec = {
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   "position_ids": "position_ids" if "position_ids" in inputs else None,
                   "logits_to_keep": "logits_to_keep" if "logits_to_keep" in inputs else None},
        "past_key": "past_key_values.{layer}.key", "past_value": "past_key_values.{layer}.value",
        "present_key": "present.{layer}.key", "present_value": "present.{layer}.value",
        "logits": "logits", "kv_dtype": "float32",
    }
    need_in = {"input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.0.value"}  # both graphs
    need_out = {"logits", "present.0.key", "present.0.value"}
    if not need_in <= inputs or not need_out <= outputs:
        raise ExportError(f"the exported graph has unexpected inputs {sorted(inputs)} / outputs {sorted(outputs)}")
    return spec
