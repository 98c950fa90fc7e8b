"""Fidelity figures written into the manifest: the ONNX graph against the source model, and quantized
graphs against the fp32 one, so that the user sees at export time what the conversion and quantization cost."""
from __future__ import annotations

from pathlib import Path

import numpy as np

PROMPT = "The capital of France is Paris. The capital of Italy is"
EVAL_TEXT = (Path(__file__).parent / "eval_text.txt").read_text(encoding="utf-8")
GREEDY_TOKENS = 16


def run_onnx(session, ids: list[int], shape: dict, split: int) -> np.ndarray:
    """Logits predicting positions split .. len(ids) (rows for positions split-1 .. n-1): ids[:split] in one
    pass, the rest through the KV cache, one token at a time where the graph returns only the last position.
    A loop of its own rather than edge's KVCache: the exporter never imports the runtime (the bundle is the
    only contract), and here the reference graph is checked before any bundle exists."""
    takes_positions = any(i.name == "position_ids" for i in session.get_inputs())
    last_only = session.get_outputs()[0].shape[1] == 1
    past = {f"past_key_values.{layer}.{kind}": np.zeros((1, shape["num_kv_heads"], 0, shape["head_dim"]), np.float32)
            for layer in range(shape["num_layers"]) for kind in ("key", "value")}
    names = [o.name for o in session.get_outputs()]
    chunks = [ids[:split]] + ([[t] for t in ids[split:]] if last_only else [ids[split:]] if ids[split:] else [])
    logits, offset = [], 0
    for chunk in chunks:
        feeds = {"input_ids": np.array([chunk], np.int64), "attention_mask": np.ones((1, offset + len(chunk)), np.int64),
                 **past}
        if takes_positions:
            feeds["position_ids"] = np.arange(offset, offset + len(chunk), dtype=np.int64)[None]
        outputs = dict(zip(names, session.run(names, feeds)))
        past = {name.replace("present", "past_key_values"): v for name, v in outputs.items() if name.startswith("present")}
        logits.append(outputs["logits"][0])
        offset += len(chunk)
    rows = np.concatenate(logits)
    return rows if last_only else rows[split - 1:]


def source_fidelity(model, tokenizer, session, shape: dict) -> dict:
    """Greedy-decode a fixed prompt with the source model, then compare ONNX logits at every position."""
    import torch

    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        full = model.generate(prompt, max_new_tokens=GREEDY_TOKENS, do_sample=False, min_new_tokens=GREEDY_TOKENS,
                              pad_token_id=tokenizer.pad_token_id or 0)
        want = model(full).logits[0].numpy()
    start = prompt.shape[1] - 1  # from the last prompt position on, each argmax chose a generated token
    got, want = run_onnx(session, full[0].tolist(), shape, split=prompt.shape[1]), want[start:]
    agree = (got.argmax(-1) == want.argmax(-1)).mean()
    return {"prompt": PROMPT, "tokens": int(full.shape[1]), "max_abs_logit_error": float(np.abs(got - want).max()),
            "greedy_agreement": float(agree)}


def quantization_loss(reference, quantized, ids: list[int], shape: dict) -> dict:
    """Perplexity of both graphs on the same text, their ratio, and the mean KL(reference || quantized)."""
    ref = _log_softmax(run_onnx(reference, ids, shape, split=1))[:-1]
    got = _log_softmax(run_onnx(quantized, ids, shape, split=1))[:-1]
    targets = np.array(ids[1:])
    rows = np.arange(len(targets))
    ppl_ref, ppl_got = (float(np.exp(-lp[rows, targets].mean())) for lp in (ref, got))
    kl = float((np.exp(ref) * (ref - got)).sum(-1).mean())
    return {"text_tokens": len(ids), "perplexity_fp32": ppl_ref, "perplexity": ppl_got,
            "perplexity_ratio": ppl_got / ppl_ref, "mean_kl": kl}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
