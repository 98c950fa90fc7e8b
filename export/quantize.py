"""Shrink the fp32 ONNX decoder: the presets of edge/presets.py as MatMulNBits (4 or 8 bits per weight, our own
block rounding in export/blockwise.py), or fp16 storage.

optimum writes a tied embedding twice (the Gather table and a transposed copy for lm_head). Every method here
stores it once: fp32/fp16 compute lm_head from a Transpose of the table; presets quantize lm_head with MatMulNBits
and gathers embedding rows from the very same packed bytes with GatherBlockQuantized.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge.export.errors import ExportError

FP16_MAX = 65504.0


def quantize(model: onnx.ModelProto, method: str, block_size: int | None = None, accuracy_level: int = 4,
             grams: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """method: fp32, fp16 or a preset of edge/presets.py. accuracy_level: 0 computes in fp32; 4 quantizes
    activations to int8 for dot-product kernels. grams: the calibration's X^T X / T per MatMul node
    (export/calibrate.py); without them searched and GPTQ rounding fall back to weighting by the weights alone."""
    from edge.presets import CHOICES, PRESETS

    if method not in CHOICES:
        raise ExportError(f"unknown quantization {method!r}; choose one of {', '.join(CHOICES)}")
    if method in PRESETS:
        return to_preset(_head_copy(model), PRESETS[method], block_size, accuracy_level, grams)
    model = share_tied_embedding(model)
    return to_fp16(model) if method == "fp16" else model


def to_preset(model: onnx.ModelProto, preset, block_size: int | None, accuracy_level: int,
              grams: dict[str, np.ndarray] | None) -> onnx.ModelProto:
    """Every MatMul with a constant weight at the preset's bits; a tied embedding gathered from lm_head's bytes,
    an untied one quantized on its own."""
    from edge.presets import fitted_block, head_recipe, recipe

    block_size = block_size or preset.block_size
    check_block_size(block_size)
    hidden = _initializers(model)[_find_embedding(model).input[0]].dims[1]
    head_bits, head_block, _, _ = head_recipe(preset, True, block_size)
    head_block = fitted_block(hidden, head_block)
    share = _tied(model) if head_block else None
    if not share:
        model = share_tied_embedding(model)  # a tied table not block-divisible: lm_head reads it through a Transpose
    inits = _initializers(model)
    plan = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            bits, block, rounding, asymmetric = recipe(preset, node.name, bool(share), block_size)
            block = fitted_block(inits[node.input[1]].dims[0], block)
            if block:
                plan[node.name] = (bits, block, rounding, asymmetric)
    model = to_nbits(model, plan, accuracy_level, grams, preset.damping)
    if share:
        _gather_from_lm_head(model, head_block, bits=head_bits)
    elif head_bits == 8:
        _quantize_untied_embedding(model, head_block or block_size)
    else:
        model = _blockwise(model, bits=4, block_size=block_size, ops=("Gather",))
    return model


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _find_embedding(model: onnx.ModelProto):
    """The Gather node that reads token embeddings straight from input_ids."""
    inits = _initializers(model)
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[1] == "input_ids" and node.input[0] in inits:
            return node
    raise ExportError("the exported graph has no embedding Gather on input_ids")


def _find_lm_head(model: onnx.ModelProto, vocab: int):
    inits = _initializers(model)
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and inits[node.input[1]].dims[-1] == vocab \
                and "lm_head" in node.name:
            return node
    return None


def _tied(model: onnx.ModelProto):
    """(embedding Gather, lm_head MatMul) when lm_head's weight is exactly the transposed embedding, else None."""
    inits = _initializers(model)
    gather = _find_embedding(model)
    table = inits[gather.input[0]]
    head = _find_lm_head(model, table.dims[0])
    if head is None or list(inits[head.input[1]].dims) != list(reversed(table.dims)):
        return None
    same = np.array_equal(numpy_helper.to_array(inits[head.input[1]]), numpy_helper.to_array(table).T)
    return (gather, head) if same else None


def _head_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give a lm_head that reads the embedding through a Transpose (optimum's weight deduplication, which runs
    where accelerate is installed, writes it so) its own transposed copy back: the presets' recipes look for the
    tied pair as two tables, and store it once, quantized, when they find it."""
    gather = _find_embedding(model)
    table = gather.input[0]
    for node in model.graph.node:
        perm = [helper.get_attribute_value(a) for a in node.attribute if a.name == "perm"]
        if node.op_type != "Transpose" or list(node.input) != [table] or perm not in ([], [[1, 0]]):
            continue
        readers = [n for n in model.graph.node if node.output[0] in n.input]
        if len(readers) == 1 and readers[0].op_type == "MatMul" and "lm_head" in readers[0].name:
            weight = numpy_helper.to_array(_initializers(model)[table]).T
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), table + "_lm_head"))
            readers[0].input[1] = table + "_lm_head"
            model.graph.node.remove(node)
        break
    return model


def share_tied_embedding(model: onnx.ModelProto) -> onnx.ModelProto:
    tied = _tied(model)
    if tied is None:
        return model
    gather, head = tied
    copy_name, transposed = head.input[1], gather.input[0] + "_transposed"
    _remove_initializer(model, copy_name)
    head.input[1] = transposed
    _prepend(model, [helper.make_node("Transpose", [gather.input[0]], [transposed], perm=[1, 0],
                                      name="lm_head_from_embedding")])
    return model


def _prepend(model: onnx.ModelProto, nodes: list) -> None:
    """Put nodes first, keeping the graph's topological order (their inputs are all initializers)."""
    rest = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + rest)


def _remove_initializer(model: onnx.ModelProto, name: str) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            del model.graph.initializer[i]
            return


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights stored as float16 and cast back to float32 on load: half the bytes, fp32 compute on CPUs."""
    casts = []
    for tensor in model.graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) < 2:
            continue
        array = numpy_helper.to_array(tensor)
        if np.abs(array).max(initial=0) >= FP16_MAX:
            continue  # would overflow to inf; keep it in fp32
        name = tensor.name
        tensor.CopyFrom(numpy_helper.from_array(array.astype(np.float16), name + "_fp16"))
        casts.append(helper.make_node("Cast", [name + "_fp16"], [name], to=onnx.TensorProto.FLOAT, name=name + "_cast"))
    _prepend(model, casts)
    return model


def check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ExportError(f"--block-size must be a power of two >= 16, not {block_size}")


def to_nbits(model: onnx.ModelProto, plan: dict[str, tuple[int, int, str, bool]], accuracy_level: int,
             grams: dict[str, np.ndarray] | None = None, damping: float = 0.01) -> onnx.ModelProto:
    """Every MatMul named in plan (node name -> (bits, block size, rounding, asymmetric)) as MatMulNBits, rounded
    by export/blockwise.py."""
    from edge.export import blockwise

    inits = _initializers(model)
    for i, node in enumerate(list(model.graph.node)):
        if node.name not in plan:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        bits, block_size, rounding, asymmetric = plan[node.name]
        gram = (grams or {}).get(node.name)
        if rounding == "gptq" and gram is not None:
            q = blockwise.quantize_compensated(weight, bits, block_size, gram, damping, asymmetric)
        else:
            importance = None if gram is None else np.diag(gram)
            q = blockwise.quantize(weight, bits, block_size, importance, rounding != "absmax", asymmetric)
        k, n = weight.shape
        packed, scales = f"{node.input[1]}_Q{bits}", f"{node.input[1]}_scales"
        model.graph.initializer.extend([numpy_helper.from_array(q.packed, packed),
                                        numpy_helper.from_array(q.scales.reshape(-1), scales)])
        inputs = [node.input[0], packed, scales]
        if q.zero_points is not None:
            inputs.append(f"{node.input[1]}_zero_points")
            model.graph.initializer.append(numpy_helper.from_array(q.packed_zero_points(), inputs[-1]))
        replacement = helper.make_node("MatMulNBits", inputs, list(node.output),
                                       name=f"{node.name}_Q{bits}", domain="com.microsoft", K=k, N=n, bits=bits,
                                       block_size=block_size, accuracy_level=accuracy_level)
        model.graph.node.remove(node)
        model.graph.node.insert(i, replacement)
        if not any(node.input[1] in other.input for other in model.graph.node):
            _remove_initializer(model, node.input[1])
    return model


def _blockwise(model: onnx.ModelProto, bits: int, block_size: int, ops: tuple[str, ...],
               accuracy_level: int = 0) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=bits, op_types_to_quantize=ops,
                                          quant_axes=(("MatMul", 0), ("Gather", 1)), accuracy_level=accuracy_level or None)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def _gather_from_lm_head(model: onnx.ModelProto, block_size: int, bits: int) -> None:
    """Replace the fp32 embedding Gather with GatherBlockQuantized over lm_head's packed weight.

    MatMulNBits keeps B as [N, K / block, block * bits / 8] bytes (zero point 2^(bits-1)) and scales as
    [N, K / block]; the same bytes read as a [vocab, blocks, block] table, blocked along its last axis, are the
    embedding (checked exact against MatMulNBits in tests/test_quality.py).
    """
    gather = _find_embedding(model)
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name)
    packed, scales = head.input[1], head.input[2]
    vocab = next(helper.get_attribute_value(a) for a in head.attribute if a.name == "N")
    shape3 = scales + "_as_table"
    model.graph.initializer.append(numpy_helper.from_array(np.array([vocab, -1, 1], dtype=np.int64), shape3 + "_shape"))
    scale_table = helper.make_node("Reshape", [scales, shape3 + "_shape"], [shape3], name="embedding_scales")
    _gather_rows_from(model, gather, packed, shape3, block_size, bits, [scale_table])


def _quantize_untied_embedding(model: onnx.ModelProto, block_size: int) -> None:
    """An embedding table nothing else reads, as blockwise symmetric int8 rows (a quarter of fp32), in the layout
    MatMulNBits uses for 8 bits (unsigned, zero point 128) so that GatherBlockQuantized reads it as for a tied one.
    onnxruntime's quantizer only does this for 4 bits."""
    gather = _find_embedding(model)
    name = gather.input[0]
    if any(name in node.input for node in model.graph.node if node is not gather):
        return  # also lm_head's weight (tied, not block-divisible): it stays fp32 for the MatMul
    table = numpy_helper.to_array(_initializers(model)[name])
    if table.shape[1] % block_size:
        return
    blocks = table.reshape(table.shape[0], -1, block_size)
    scales = (np.abs(blocks).max(axis=2, keepdims=True) / 127).astype(np.float32)
    quantized = np.round(blocks / np.where(scales == 0, 1, scales)).clip(-127, 127) + 128
    model.graph.initializer.extend([numpy_helper.from_array(quantized.astype(np.uint8), name + "_Q8"),
                                    numpy_helper.from_array(scales, name + "_scales")])
    _gather_rows_from(model, gather, name + "_Q8", name + "_scales", block_size, bits=8)


def _gather_rows_from(model: onnx.ModelProto, gather, packed: str, scales: str, block_size: int, bits: int,
                      before: list | None = None) -> None:
    """Replace the fp32 embedding Gather with GatherBlockQuantized over a [vocab, blocks, block] table and its
    [vocab, blocks, 1] scales, then drop the fp32 table."""
    table, out = gather.input[0], gather.output[0]
    shape_out = table + "_row_shape"
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), shape_out))
    nodes = [
        *(before or []),
        helper.make_node("GatherBlockQuantized", [packed, "input_ids", scales], [out + "_blocks"], domain="com.microsoft",
                         bits=bits, block_size=block_size, gather_axis=0, quantize_axis=2, name="embedding_table"),
        helper.make_node("Reshape", [out + "_blocks", shape_out], [out], name="embedding_rows"),
    ]
    model.graph.node.remove(gather)
    _prepend(model, nodes)
    _remove_initializer(model, table)
