"""The fast graph: the decoder built directly from the checkpoint's weights with onnxruntime's fused CPU ops.

Why build instead of rewriting optimum's export: optimum's traced graph spells attention and RMSNorm out in
dozens of primitive ops whose shapes vary by family and transformers version; pattern-matching them back into
fused ops is brittle. The decoder itself is a short, well-known recipe, so we write it out once:

    Gather (embedding) -> per layer: [Skip]SimplifiedLayerNormalization -> q/k/v MatMul (+bias; Qwen3 q/k RMSNorm)
    -> GroupQueryAttention (rotary fused, past/present KV in one buffer) -> o MatMul -> SkipSimplifiedLayerNorm
    -> gate/up MatMul, SiLU, down MatMul -> final norm -> lm_head on the last `logits_to_keep` positions only.

MatMul weights are plain fp32 initializers named like optimum's (`/lm_head/MatMul`, a Gather on `input_ids`),
so export.quantize turns them into MatMulNBits and shares the tied embedding exactly as for the slow graph.
Inputs: input_ids, attention_mask (past + new tokens), logits_to_keep ([1]), past_key_values.{i}.key/value;
outputs: logits of the last logits_to_keep positions, present.{i}.key/value. The runtime binds past and present of
a layer to the same buffer.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge.export.convert import model_shape
from edge.export.errors import ExportError

FUSED_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"}
WINDOWED_FAMILIES = {"mistral", "phi3"}  # no layer_types in their configs: sliding_window applies to every layer
# Gemma 2 and 3: RMSNorm weights stored as w where the norm multiplies by (1 + w), the embedding scaled by
# sqrt(hidden), and a norm after each sub-layer's output as well as before it ("sandwich" norms).
GEMMA_FAMILIES = {"gemma2", "gemma3_text"}
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
MAX_ROTARY_POSITIONS = 32768  # cos/sin tables beyond this cost memory no small board has context for


class Builder:
    """Accumulates nodes and initializers; each node gets a unique name and output names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, name: str | None = None,
           domain: str = "", **attrs) -> str | list[str]:
        self.count += 1
        name = name or f"/{op_type}_{self.count}"
        names = outputs if isinstance(outputs, list) else [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, domain=domain, **attrs))
        return names[0] if len(names) == 1 else names


def unsupported(config) -> str | None:
    """Why the fast graph cannot express this model, or None when it can."""
    if config.model_type not in FUSED_FAMILIES:
        return f"the fast graph does not cover {config.model_type} yet"
    head_dim = model_shape(config)["head_dim"]
    if head_dim % 16:
        return f"GroupQueryAttention needs a head size that is a multiple of 16, not {head_dim}"
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return "the fast graph rotates whole heads; partial_rotary_factor is not supported yet"
    if _activation(config) not in ACTIVATIONS:
        return f"the fast graph has no {_activation(config)} activation yet"
    if getattr(config, "use_bidirectional_attention", False):
        return "the fast graph is causal; use_bidirectional_attention is not supported"
    return None


def _activation(config) -> str:
    return getattr(config, "hidden_activation", None) or config.hidden_act


def max_context(config) -> int:
    """The longest context the fast graph's rotary tables are exact for. Phi-3's longrope switches every position
    to other frequencies past original_max_position_embeddings, which one fixed table cannot express."""
    scaling = getattr(config, "rope_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type")) == "longrope":
        original = scaling.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None) or config.max_position_embeddings
        return min(MAX_ROTARY_POSITIONS, original)
    return MAX_ROTARY_POSITIONS


def min_onnxruntime(config) -> str | None:
    """The oldest onnxruntime that runs this graph right, when newer than the runtime's floor: before 1.24
    GroupQueryAttention's local_window_size also counted the current token (microsoft/onnxruntime#25927), so a
    sliding window was one token wider than the model's (measured: 1.23.2 wrong, 1.24.4 exact)."""
    return "1.24" if any(_window(config, i) > 0 for i in range(config.num_hidden_layers)) else None


def build(model, context_length: int) -> onnx.ModelProto:
    """The fused fp32 graph of a transformers Llama/Mistral/Qwen2/Qwen3/Phi-3/Gemma 2/Gemma 3 model (in eval mode,
    on the CPU)."""
    config = model.config
    reason = unsupported(config)
    if reason:
        raise ExportError(reason)
    shape, gemma, eps = model_shape(config), config.model_type in GEMMA_FAMILIES, config.rms_norm_eps
    weights = _unpacked({k: v.detach().float().numpy() for k, v in model.state_dict().items()}, shape)
    weights = _one_plus_norms(weights) if gemma else weights
    b = Builder()
    seqlens, total = _sequence_lengths(b)
    tables = _rotary_tables(b, model, context_length)
    residual, pending = _embedding(b, weights, config, gemma), None
    # One decoder layer per pass; `pending` is the last sub-layer's output, added to `residual` by the next norm.
    for i in range(shape["num_layers"]):
        layer = f"model.layers.{i}"
        normed, residual = _norm(b, pending, residual, weights[f"{layer}.input_layernorm.weight"], eps,
                                 f"/{layer}/input_layernorm")
        cos, sin = tables.get(_layer_type(config, i), tables["full_attention"])
        pending = _attention(b, normed, weights, i, shape, config, seqlens, total, cos, sin)
        if gemma:
            pending = _norm(b, None, pending, weights[f"{layer}.post_attention_layernorm.weight"], eps,
                            f"/{layer}/post_attention_layernorm")[0]
        ffn_norm = "pre_feedforward_layernorm" if gemma else "post_attention_layernorm"
        normed, residual = _norm(b, pending, residual, weights[f"{layer}.{ffn_norm}.weight"], eps,
                                 f"/{layer}/{ffn_norm}")
        pending = _mlp(b, normed, weights, i, ACTIVATIONS[_activation(config)])
        if gemma:
            pending = _norm(b, None, pending, weights[f"{layer}.post_feedforward_layernorm.weight"], eps,
                            f"/{layer}/post_feedforward_layernorm")[0]
    final, _ = _norm(b, pending, residual, weights["model.norm.weight"], eps, "/model/norm")
    # The logits of the last `logits_to_keep` positions: 1 for a step or a prefill chunk (the lm_head over one row),
    # more to verify drafted tokens in one pass (speculative decoding).
    start = b.op("Neg", ["logits_to_keep"], name="/model/last_start")
    last = b.op("Slice", [final, start, b.weight("last_end", np.array([2**62])),
                          b.weight("last_axis", np.array([1]))], name="/model/last_positions")
    _lm_head(b, last, weights, getattr(config, "final_logit_softcapping", None))
    return _model(b, shape, config)


def _embedding(b: Builder, weights: dict, config, gemma: bool) -> str:
    table = b.weight("model.embed_tokens.weight", weights["model.embed_tokens.weight"])
    hidden = b.op("Gather", [table, "input_ids"], name="/model/embed_tokens/Gather")
    if not gemma:
        return hidden
    scale = np.array(config.hidden_size**0.5, dtype=np.float32)  # transformers rounds it to the weights' dtype too
    return b.op("Mul", [hidden, b.weight("embed_scale", scale)], name="/model/embed_tokens/scale")


def _lm_head(b: Builder, last: str, weights: dict, softcap: float | None) -> None:
    """logits = last @ lm_head (tied: the embedding), then Gemma 2's cap * tanh(logits / cap) where it has one."""
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    out = ["/lm_head/MatMul/out0" if softcap else "logits"]
    logits = b.op("MatMul", [last, b.weight("lm_head.weight.T", head.T)], out, name="/lm_head/MatMul")
    if softcap:
        cap = b.weight("final_logit_softcap", np.array(softcap, dtype=np.float32))
        b.op("Mul", [b.op("Tanh", [b.op("Div", [logits, cap])]), cap], ["logits"], name="/lm_head/softcap")


def _one_plus_norms(weights: dict) -> dict:
    """Gemma's RMSNorm multiplies by (1 + w): fold the 1 in, so every norm is onnxruntime's plain one."""
    return {name: w + 1 if name.endswith("norm.weight") else w for name, w in weights.items()}


def _layer_type(config, i: int) -> str:
    types = getattr(config, "layer_types", None)
    return types[i] if types else "full_attention"


def _unpacked(weights: dict, shape: dict) -> dict:
    """Phi-3 stores q/k/v and gate/up packed; split them into the Llama names the builder packs again its own way."""
    q, kv = shape["num_heads"] * shape["head_dim"], shape["num_kv_heads"] * shape["head_dim"]
    for name in [n for n in weights if n.endswith(("qkv_proj.weight", "gate_up_proj.weight"))]:
        packed, prefix = weights.pop(name), name.rsplit(".", 2)[0]
        if name.endswith("qkv_proj.weight"):
            parts = dict(zip(("q_proj", "k_proj", "v_proj"), np.split(packed, [q, q + kv])))
        else:
            parts = dict(zip(("gate_proj", "up_proj"), np.split(packed, 2)))
        weights.update({f"{prefix}.{part}.weight": w for part, w in parts.items()})
    return weights


def _sequence_lengths(b: Builder) -> tuple[str, str]:
    """GroupQueryAttention's seqlens_k (tokens so far - 1) and total length, from the attention mask."""
    summed = b.op("ReduceSum", ["attention_mask", b.weight("mask_axis", np.array([1]))], keepdims=0,
                  name="/model/mask_sum")
    seqlens = b.op("Cast", [b.op("Sub", [summed, b.weight("one", np.array(1, dtype=np.int64))])], to=TensorProto.INT32,
                   name="/model/seqlens_k")
    length = b.op("Gather", [b.op("Shape", ["attention_mask"]), b.weight("axis1", np.array(1))], axis=0)
    total = b.op("Cast", [length], to=TensorProto.INT32, name="/model/total_sequence_length")
    return seqlens, total


def _rotary_tables(b: Builder, model, context_length: int) -> dict[str, tuple[str, str]]:
    """cos/sin tables by layer type: the model's rotary module for full attention, and Gemma 3's local one (another
    base frequency) for sliding-window layers."""
    tables = {"full_attention": _rotary_table(b, model.model.rotary_emb, context_length, "")}
    if getattr(model.model, "rotary_emb_local", None) is not None:
        tables["sliding_attention"] = _rotary_table(b, model.model.rotary_emb_local, context_length, "local_")
    return tables


def _rotary_table(b: Builder, rotary, context_length: int, prefix: str) -> tuple[str, str]:
    """cos/sin of position x inverse frequency, from the model's own rotary module (so every rope scaling type
    that transformers computes up front comes out exactly: default, linear, llama3, and longrope's short table
    with its attention scaling)."""
    inv_freq = rotary.inv_freq.detach().double().numpy()
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    positions = np.arange(min(context_length, MAX_ROTARY_POSITIONS), dtype=np.float64)
    angles = np.outer(positions, inv_freq)
    return (b.weight(f"{prefix}cos_cache", (np.cos(angles) * scaling).astype(np.float32)),
            b.weight(f"{prefix}sin_cache", (np.sin(angles) * scaling).astype(np.float32)))


def _norm(b: Builder, new: str | None, residual: str, gamma: np.ndarray, eps: float, name: str) -> tuple[str, str]:
    """RMSNorm of residual + new; returns (normed, the new residual). The first layer has nothing to add yet."""
    weight = b.weight(f"{name[1:].replace('/', '.')}.weight", gamma)
    if new is None:
        return b.op("SimplifiedLayerNormalization", [residual, weight], name=name, epsilon=eps, axis=-1), residual
    b.op("SkipSimplifiedLayerNormalization", [new, residual, weight], [f"{name}/output", "", "", f"{name}/sum"],
         name=name, domain="com.microsoft", epsilon=eps)
    return f"{name}/output", f"{name}/sum"


def _linear(b: Builder, x: str, weights: dict, prefix: str) -> str:
    """x @ W.T (+ bias), with the weight stored transposed as a MatMul initializer for the quantizer."""
    y = b.op("MatMul", [x, b.weight(f"{prefix}.weight.T", weights[f"{prefix}.weight"].T)], name=f"/{prefix}/MatMul")
    if f"{prefix}.bias" in weights:
        y = b.op("Add", [y, b.weight(f"{prefix}.bias", weights[f"{prefix}.bias"])], name=f"/{prefix}/Add")
    return y


def _attention(b: Builder, x: str, weights: dict, i: int, shape: dict, config, seqlens: str, total: str,
               cos: str, sin: str) -> str:
    prefix = f"model.layers.{i}.self_attn"
    if f"{prefix}.q_norm.weight" in weights:  # Qwen3: RMSNorm over each head before rotary, so q/k stay apart
        q, k, v = (_linear(b, x, weights, f"{prefix}.{p}_proj") for p in "qkv")
        q = _head_norm(b, q, weights[f"{prefix}.q_norm.weight"], shape["num_heads"], config.rms_norm_eps,
                       f"{prefix}.q_norm")
        k = _head_norm(b, k, weights[f"{prefix}.k_norm.weight"], shape["num_kv_heads"], config.rms_norm_eps,
                       f"{prefix}.k_norm")
        qkv = [q, k, v]
    else:  # one MatMul for q, k and v: a single pass over the activations, one kernel launch instead of three
        qkv = [_packed_linear(b, x, weights, [f"{prefix}.{p}_proj" for p in "qkv"], f"{prefix}.qkv_proj"), "", ""]
    scalar = getattr(config, "query_pre_attn_scalar", None)  # Gemma: scores scale by this, not the head size
    extra = {"scale": float(scalar) ** -0.5} if scalar else {}
    if getattr(config, "attn_logit_softcapping", None):
        extra["softcap"] = float(config.attn_logit_softcapping)
    out, _, _ = b.op("GroupQueryAttention", [*qkv, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens,
                                             total, cos, sin],
                     [f"/{prefix}/output", f"present.{i}.key", f"present.{i}.value"],
                     name=f"/{prefix}/GroupQueryAttention", domain="com.microsoft", num_heads=shape["num_heads"],
                     kv_num_heads=shape["num_kv_heads"], do_rotary=1, rotary_interleaved=0,
                     local_window_size=_window(config, i), **extra)
    return _linear(b, out, weights, f"{prefix}.o_proj")


def _window(config, i: int) -> int:
    """GroupQueryAttention's local_window_size for layer i: the sliding window where it applies, else -1."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return -1
    if getattr(config, "layer_types", None):  # Qwen2/3, Gemma: per layer (Qwen2 only with use_sliding_window)
        return int(window) if config.layer_types[i] == "sliding_attention" else -1
    return int(window) if config.model_type in WINDOWED_FAMILIES else -1


def _packed_linear(b: Builder, x: str, weights: dict, parts: list[str], name: str) -> str:
    """One MatMul (+ bias) for several projections of the same input, outputs side by side."""
    weight = np.concatenate([weights[f"{p}.weight"] for p in parts], axis=0)
    y = b.op("MatMul", [x, b.weight(f"{name}.weight.T", weight.T)], name=f"/{name}/MatMul")
    if all(f"{p}.bias" in weights for p in parts):
        bias = np.concatenate([weights[f"{p}.bias"] for p in parts])
        y = b.op("Add", [y, b.weight(f"{name}.bias", bias)], name=f"/{name}/Add")
    return y


def _head_norm(b: Builder, x: str, gamma: np.ndarray, heads: int, eps: float, name: str) -> str:
    split = b.op("Reshape", [x, b.weight(f"{name}.split", np.array([0, 0, heads, gamma.shape[0]]))])
    normed = b.op("SimplifiedLayerNormalization", [split, b.weight(f"{name}.weight", gamma)], epsilon=eps, axis=-1)
    return b.op("Reshape", [normed, b.weight(f"{name}.join", np.array([0, 0, heads * gamma.shape[0]]))])


def _mlp(b: Builder, x: str, weights: dict, i: int, activation: str) -> str:
    # gate and up as one MatMul then a Split: one weight pass and kernel launch fewer per layer; measured faster
    # and smaller than two MatMuls (edge bench, SmolLM2-135M shape, alternated runs: decode x1.08, RSS -20 MB).
    prefix = f"model.layers.{i}.mlp"
    both = _packed_linear(b, x, weights, [f"{prefix}.gate_proj", f"{prefix}.up_proj"], f"{prefix}.gate_up_proj")
    half = weights[f"{prefix}.up_proj.weight"].shape[0]
    gate, up = b.op("Split", [both, b.weight(f"{prefix}.split", np.array([half, half]))], 2, axis=-1,
                    name=f"/{prefix}/split")
    if activation == "gelu_tanh":  # Gemma's gelu_pytorch_tanh is exactly onnxruntime's FastGelu
        act = b.op("FastGelu", [gate], domain="com.microsoft")
    else:
        act = b.op("Mul", [gate, b.op("Sigmoid", [gate])])
    return _linear(b, b.op("Mul", [act, up]), weights, f"{prefix}.down_proj")


def _model(b: Builder, shape: dict, config) -> onnx.ModelProto:
    kv = ["batch_size", shape["num_kv_heads"], "past_sequence_length", shape["head_dim"]]
    present = ["batch_size", shape["num_kv_heads"], "total_sequence_length", shape["head_dim"]]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_length"]),
              helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch_size", "logits_length", shape["vocab_size"]])]
    for i in range(shape["num_layers"]):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, present))
    graph = helper.make_graph(b.nodes, f"edge-{config.model_type}", inputs, outputs, b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="edge-llm")
    model.ir_version = 8
    return model
