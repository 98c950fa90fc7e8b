"""The export pipeline, stage by stage: check, load, ONNX, validate, quantize, measure, write the bundle."""
from __future__ import annotations

import json
import logging
import sys
import time
from importlib import metadata
from pathlib import Path

from edge.export.errors import ExportError

STAGES = 6
GEN_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def log(message: str) -> None:
    print(f"edge export: {message}", file=sys.stderr, flush=True)


def stage(n: int, what: str) -> None:
    log(f"[{n}/{STAGES}] {what}")


def _require_extra() -> None:
    """Fail early, with the install command, when the export extra is missing."""
    for module in ("torch", "transformers", "optimum.exporters.onnx", "onnx", "onnx_ir", "onnxruntime"):
        try:
            __import__(module)
        except ImportError as e:
            raise ExportError(f"the exporter needs the export extra ({module} is missing): "
                              f"pip install 'edge-llm[export]' (on CPU-only machines install torch's CPU build first)") from e


def export(src: str, out: str, quant: str | None = None, block_size: int | None = None, force: bool = False,
           profile: str | None = None, graph: str = "auto", accuracy_level: int = 4,
           held_out_tokens: int | None = None) -> dict:
    """Export a checkpoint folder to a bundle at `out`; returns the manifest.

    profile: a device profile name or .toml path; its quantization is used where quant/block_size are not given,
    and the bundle records it as its target.
    graph: "fast" (fused ops, shared KV buffers: Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2/3), "optimum" (the
    traced graph, every family), or "auto": fast where the family is covered, else optimum.
    accuracy_level (int4): 4 asks for int8 activations, which onnxruntime uses where the CPU has the instructions
    and replaces by fp32 compute where not (edge/kernels.py); 0 always computes in fp32, for comparisons.
    held_out_tokens: score only this many tokens of the held-out text in the quantization check (default: all
    of it, over 2,000; the fast graph scores one token at a time, so a test suite may ask for fewer).
    """
    if accuracy_level not in (0, 4):
        raise ExportError(f"accuracy level {accuracy_level!r}: choose 4 (int8 activations where the CPU has them, "
                          f"the default) or 0 (fp32 compute everywhere)")
    target = _target(profile, quant, block_size, accuracy_level)
    quant = target["quant"]
    _require_extra()
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO
    from edge import presets
    from edge.export import bundle, convert, quantize, validate
    from edge.export import graph as fast_graph

    if quant not in presets.CHOICES:
        raise ExportError(f"unknown --quant {quant!r}; choose one of {', '.join(presets.CHOICES)}")
    if quant in presets.PRESETS:
        quantize.check_block_size(target["block_size"])  # before minutes of loading and tracing, not after
    out_path = Path(out)
    if out_path.exists() and not force:
        raise ExportError(f"{out_path} already exists; pass --force to replace it")
    started = time.time()
    stage(1, f"checking {src}")
    source = convert.resolve_source(src)
    config = convert.check_source(source)
    kind = _graph_kind(graph, convert.load_config(source))  # before the weights: refusals come early
    convert.check_rope(config, source, fast=kind == "fast", chosen=graph != "auto")
    stage(2, "loading the source model (transformers, fp32)")
    model, tokenizer = convert.load_model(source)
    if not tokenizer.is_fast:
        raise ExportError(f"{source}: the tokenizer has no fast (tokenizer.json) form; the runtime needs one")
    shape = convert.model_shape(model.config)
    if kind == "fast" and fast_graph.max_context(model.config) < shape["context_length"]:
        shape["context_length"] = fast_graph.max_context(model.config)
        log(f"context capped at {shape['context_length']} tokens (the fast graph's rotary tables are exact up to "
            f"there)")
    with bundle.staging(out_path, force) as scratch:
        raw_file, spec, reference = _onnx_stage(kind, model, shape, scratch)
        stage(4, "checking the ONNX graph against the source model")
        figures = {"source": validate.source_fidelity(model, tokenizer, reference, spec, shape)}
        log(_describe(figures["source"]))
        stage(5, f"quantizing ({quant})")
        figures.update(_quantize_stage(raw_file, target, scratch / "bundle", tokenizer, reference, spec, shape,
                                       held_out_tokens))
        stage(6, "writing the bundle")
        manifest = _manifest(convert.FAMILIES[config["model_type"]], config, model, tokenizer, source, shape, spec,
                             target, figures)
        manifest.update(_write_tokenizer(tokenizer, scratch / "bundle"))
        manifest = bundle.write_manifest(scratch / "bundle", manifest)
    log(f"done in {time.time() - started:.0f} s: {out_path}")
    return manifest


def _onnx_stage(kind: str, model, shape: dict, scratch: Path):
    """Stage 3: the fp32 graph, its input/output names, and a session on it as the reference for what follows."""
    import onnx
    import onnxruntime as ort

    from edge.export import convert
    from edge.export import graph as fast_graph

    how = "fused ops, built from the weights" if kind == "fast" else "optimum"
    stage(3, f"exporting to ONNX with a KV cache ({how})")
    raw_file = _to_onnx(kind, model, shape, scratch / "onnx")
    spec = convert.io_names(onnx.load(raw_file, load_external_data=False))
    spec.update({"graph": kind, "kv": "shared-buffer" if kind == "fast" else "growing",
                 "logits_positions": "last" if kind == "fast" else "all"})
    if kind == "fast" and fast_graph.min_onnxruntime(model.config):
        spec["min_onnxruntime"] = fast_graph.min_onnxruntime(model.config)
    return raw_file, spec, ort.InferenceSession(str(raw_file), providers=["CPUExecutionProvider"])


def _quantize_stage(raw_file: Path, target: dict, folder: Path, tokenizer, reference, spec: dict, shape: dict,
                    held_out_tokens: int | None) -> dict:
    """Stage 5: the bundle's model file, and for quantized ones what quantization cost against fp32 on the
    held-out text."""
    import onnx

    from edge.export import bundle, calibrate, quantize, validate
    from edge.presets import PRESETS

    model = onnx.load(raw_file)
    grams = None
    if target["quant"] in PRESETS and PRESETS[target["quant"]].rounding != "absmax":
        grams = calibrate.gram_matrices(model, calibrate.calibration_ids(tokenizer), spec, shape)
    model = quantize.quantize(model, target["quant"], target["block_size"], target["accuracy_level"], grams)
    files = bundle.save_model(model, folder)
    if target["quant"] == "fp32":
        return {}
    ids = tokenizer(validate.EVAL_TEXT).input_ids[:held_out_tokens]
    return {"quantization": _loss(folder / files[0], reference, spec, shape, ids)}


def _loss(file: Path, reference, spec: dict, shape: dict, ids: list[int]) -> dict:
    import onnxruntime as ort

    from edge.export import validate

    quantized = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    loss = validate.quantization_loss(reference, quantized, spec, shape, ids)
    log(_describe(loss))
    return loss


def _describe(figures: dict) -> str:
    if "perplexity_ratio" in figures:
        return (f"quantization, {figures['text_tokens']} held-out tokens: perplexity {figures['perplexity']:.3f} vs "
                f"fp32 {figures['perplexity_reference']:.3f} (x{figures['perplexity_ratio']:.4f}), top-1 agreement "
                f"{figures['top1_agreement']:.1%}, mean KL {figures['mean_kl']:.4f}")
    return (f"ONNX vs source: max |logit error| {figures['max_abs_logit_error']:.2e}, "
            f"greedy agreement {figures['greedy_agreement']:.0%} over {figures['tokens']} tokens")


def _write_tokenizer(tokenizer, folder: Path) -> dict:
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    entries = {"tokenizer": {"file": "tokenizer.json", "special_tokens": special}, "chat_template": None}
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one is for chat
        template = template.get("default") or next(iter(template.values()))
    if template:
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
        entries["chat_template"] = "chat_template.jinja"
    return entries


def _graph_kind(graph: str, config) -> str:
    from edge.export import graph as fast_graph

    reason = fast_graph.unsupported(config)
    if graph == "fast" and reason:
        raise ExportError(f"--graph fast: {reason}; use --graph optimum")
    if graph not in ("auto", "fast", "optimum"):
        raise ExportError(f"--graph must be auto, fast or optimum, not {graph!r}")
    if graph == "auto" and reason:
        log(f"fast graph not available ({reason}): using optimum's graph")
    return "optimum" if graph == "optimum" or reason else "fast"


def _to_onnx(kind: str, model, shape: dict, folder: Path) -> Path:
    import onnx

    from edge.export import convert
    from edge.export import graph as fast_graph

    if kind == "optimum":
        return convert.to_onnx(model, folder)
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "model.onnx"
    onnx.save_model(fast_graph.build(model, shape["context_length"]), file, save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    return file


def _target(profile: str | None, quant: str | None, block_size: int | None, accuracy_level: int) -> dict:
    """What to produce: the profile's choices (or the defaults), overridden by explicit flags."""
    from edge.devices import ProfileError, load_profile
    from edge.devices.profiles import Export

    try:
        chosen = load_profile(profile) if profile else None
    except ProfileError as e:
        raise ExportError(str(e)) from e
    prefs = chosen.export if chosen else Export()
    quant = quant or prefs.quant
    return {"profile": chosen.name if chosen else None, "quant": quant, "block_size": block_size or prefs.block_size,
            "accuracy_level": accuracy_level if quant not in ("fp32", "fp16") else 0}


def _manifest(family: str, config: dict, model, tokenizer, source: Path, shape, spec, target: dict, figures) -> dict:
    return {
        "family": family,
        "architecture": (config.get("architectures") or [model.__class__.__name__])[0],
        "source": source.name,
        "model": shape,
        "onnx": {"file": "model.onnx", **spec},
        "quantization": _quantization(target),
        "target": {"profile": target["profile"]} if target["profile"] else None,
        "generation": _generation(model, tokenizer, source),
        "validation": figures,
        "created_by": {name: _version(name) for name in
                       ("edge-llm", "optimum-onnx", "transformers", "torch", "onnx", "onnxruntime")},
    }


def _quantization(target: dict) -> dict:
    """The manifest's record of the preset: what the runtime (kernel path, memory estimate) and a reader need."""
    from edge.presets import PRESETS, mlp_block_size

    preset = PRESETS.get(target["quant"])
    if preset is None:
        return {"method": target["quant"]}
    return {"method": "int8" if preset.bits == 8 else "int4", "preset": preset.name, "bits": preset.bits,
            "head_bits": preset.head_bits, "raised": list(preset.raised), "block_size": target["block_size"],
            **({"mlp_block_size": mlp_block_size(preset, target["block_size"])} if preset.mlp_block else {}),
            "symmetric": not preset.asymmetric, "rounding": preset.rounding,
            "accuracy_level": target["accuracy_level"]}


def _generation(model, tokenizer, source: Path) -> dict:
    """eos ids from the generation config, the model config and the tokenizer; the explicit sampling defaults."""
    eos = set()
    for value in (model.generation_config.eos_token_id, model.config.eos_token_id, tokenizer.eos_token_id):
        eos.update(value if isinstance(value, list) else [value] if value is not None else [])
    explicit = {}
    if (source / "generation_config.json").is_file():
        explicit = json.loads((source / "generation_config.json").read_text(encoding="utf-8"))
    defaults = {k: explicit[k] for k in GEN_KEYS if k in explicit}
    if explicit.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return {"eos_token_ids": sorted(eos), "defaults": defaults}


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"
