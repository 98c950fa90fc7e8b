"""Fidelity figures written into the manifest: the ONNX graph against the source model, and quantized
graphs against the fp32 one, so that the user sees at export time what the conversion and quantization cost."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge import fidelity
from edge.decoder import for_session

PROMPT = "The capital of France is Paris. The capital of Italy is"
EVAL_TEXT = (Path(__file__).parent / "eval_text.txt").read_text(encoding="utf-8")
GREEDY_TOKENS = 16


def rows(session, spec: dict, shape: dict, ids: list[int], split: int):
    """edge.fidelity.scored_rows through the runtime's own adapter for the graph kind (edge/decoder.py:
    onnxruntime and numpy only), so that the exporter scores a graph exactly as the runtime will run it."""
    yield from for_session(session, spec, shape, len(ids)).scored_rows(ids, split)


def run_onnx(session, spec: dict, shape: dict, ids: list[int], split: int) -> np.ndarray:
    """Logits predicting positions split .. len(ids) (rows for positions split-1 .. n-1)."""
    return np.concatenate([logits for logits, _ in rows(session, spec, shape, ids + [0], split)])


def source_fidelity(model, tokenizer, session, spec: dict, shape: dict) -> dict:
    """Greedy-decode a fixed prompt with the source model, then compare ONNX logits at every position."""
    import torch

    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        full = model.generate(prompt, max_new_tokens=GREEDY_TOKENS, do_sample=False, min_new_tokens=GREEDY_TOKENS,
                              pad_token_id=tokenizer.pad_token_id or 0)
        want = model(full).logits[0].numpy()
    start = prompt.shape[1] - 1  # from the last prompt position on, each argmax chose a generated token
    got, want = run_onnx(session, spec, shape, full[0].tolist(), split=prompt.shape[1]), want[start:]
    agree = (got.argmax(-1) == want.argmax(-1)).mean()
    return {"prompt": PROMPT, "tokens": int(full.shape[1]), "max_abs_logit_error": float(np.abs(got - want).max()),
            "greedy_agreement": float(agree)}


def quantization_loss(reference, quantized, spec: dict, shape: dict, ids: list[int]) -> dict:
    """edge.fidelity's figures of the quantized graph against the fp32 one on the held-out text, in windows of
    the model's context."""
    windows = fidelity.windows(ids, shape["context_length"])
    got = (block for w in windows for block in rows(quantized, spec, shape, w, split=1))
    want = (block for w in windows for block in rows(reference, spec, shape, w, split=1))
    return fidelity.measure(got, want)
