"""What a preset's rounding alone costs: its weights (export/blockwise.py, the recipe of edge/presets.py) put into the
checkpoint in torch, activations kept in fp32, scored against the unquantized checkpoint on the exporter's held-out
text. Set beside the runtime's figures (`edge eval`, accuracy level 4), it splits a preset's loss into the weights'
share and the int8 activations' share. It also tries an offline rotation of the checkpoint (--rotate) before
rounding. Run from a checkout with the export extra:

    python benchmarks/weights_only.py HF_DIR [--preset int4] [--rotate] [--asymmetric] [--damping 1.0]
           [--rounding gptq|search|absmax] [--sampled-calibration TOKENS]

--rotate: QuaRot's computational invariance. Each RMSNorm's gain is folded into the projections it feeds, the
residual stream is turned by a random orthogonal matrix Q (embedding E -> EQ, input projections W -> WQ, output
projections W -> Q^T W), each head's values and the attention output's inputs by a random-signed Hadamard matrix,
and the final norm's gain becomes a small matrix Q^T diag(g) Q before the (tied) output table, which the rotated
embedding no longer carries. The model computes the same function (checked: the fp32 figures before rounding).
Llama-shaped families only (one norm before each sub-layer, no post-norms).

--sampled-calibration N: N tokens of the fp32 model's own sampled answers to a few chat prompts, added to
export/calibration_text.txt for GPTQ's statistics.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how bread rises.",
           "Give me advice on learning to play the guitar.", "Describe the history of the bicycle.",
           "Write a letter to a friend about moving to a new city.", "What are the rules of chess?",
           "Summarise the causes of the French Revolution.", "Write a Python function that sorts a list."]


def main() -> None:
    args = parse()
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from edge.export import calibrate, validate

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    # the held-out text in windows of the context, as the runtime scores it (a 4,096-token window's logits
    # already take 0.8 GB for a 49k vocabulary)
    window = min(4096, AutoConfig.from_pretrained(args.checkpoint).max_position_embeddings)
    ids = tokenizer(validate.EVAL_TEXT).input_ids
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    reference = scored_rows(model, ids, window)
    calibration = calibrate.calibration_ids(tokenizer)
    if args.sampled_calibration:
        calibration += sampled(model, tokenizer, args.sampled_calibration)
    if args.rotate:
        rotate(model, np.random.default_rng(args.seed))
        print("rotated, before rounding:", describe(against(reference, model, ids, window)))
    grams = gram_matrices(model, calibration, window)
    round_weights(model, args, grams)
    print(f"{args.preset}{' rotated' if args.rotate else ''}, weights only:",
          describe(against(reference, model, ids, window)))


def parse() -> argparse.Namespace:
    from edge.presets import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--preset", default="int4", choices=list(PRESETS))
    p.add_argument("--block-size", type=int, default=None, help="the preset's main block size (default: its own)")
    p.add_argument("--rotate", action="store_true")
    p.add_argument("--asymmetric", action="store_true", help="an integer zero point per block of the main bits")
    p.add_argument("--rounding", choices=("gptq", "search", "absmax"), help="every weight so (default: the preset's)")
    p.add_argument("--damping", type=float, default=None, help="GPTQ's damping (default: the preset's)")
    p.add_argument("--sampled-calibration", type=int, default=0, metavar="TOKENS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def scored_rows(model, ids: list[int], window: int) -> list[tuple[np.ndarray, list[int]]]:
    """(logits, targets) blocks, teacher-forced, one per window of fresh context (edge/fidelity.py's windows)."""
    import torch

    from edge import fidelity

    blocks = []
    with torch.no_grad():
        for w in fidelity.windows(ids, window):
            blocks.append((model(torch.tensor([w])).logits[0, :-1].numpy(), w[1:]))
    return blocks


def against(reference: list, model, ids: list[int], window: int) -> dict:
    """edge/fidelity.py's figures (the code `edge eval` runs) of the model against the reference's rows."""
    from edge import fidelity

    return fidelity.measure(scored_rows(model, ids, window), iter(reference))


def describe(f: dict) -> str:
    return f"x{f['perplexity_ratio']:.4f}, top-1 {f['top1_agreement']:.2%}, KL {f['mean_kl']:.4f}"


def sampled(model, tokenizer, tokens: int) -> list[int]:
    """The model's own answers to PROMPTS, sampled at temperature 1, top-p 0.95 (a fixed seed)."""
    import torch

    torch.manual_seed(0)
    out = []
    for prompt in PROMPTS:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        with torch.no_grad():
            answer = model.generate(torch.tensor([chat]), attention_mask=torch.ones(1, len(chat), dtype=torch.long),
                                    max_new_tokens=tokens // len(PROMPTS), do_sample=True, temperature=1.0,
                                    top_p=0.95)
        out += answer[0].tolist()
    return out


def gram_matrices(model, ids: list[int], window: int) -> dict[str, np.ndarray]:
    """Linear module name -> X^T X / T of its inputs over the calibration text, as export/calibrate.py computes
    them on the ONNX graph."""
    import torch

    sums, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            def hook(module, inputs, output, name=name):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.T @ x
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for s in range(0, len(ids), window):
            model(torch.tensor([ids[s:s + window]]))
    for h in hooks:
        h.remove()
    return {name: (total / len(ids)).numpy() for name, total in sums.items()}


def round_weights(model, args, grams: dict[str, np.ndarray]) -> None:
    """Every projection and the tied table as the preset's recipe rounds them (roles read from module names)."""
    import torch

    from edge.export import blockwise
    from edge.presets import PRESETS, fitted_block, recipe, roles

    preset = PRESETS[args.preset]
    preset = dataclasses.replace(preset, asymmetric=args.asymmetric or preset.asymmetric,
                                 rounding=args.rounding or preset.rounding,
                                 damping=preset.damping if args.damping is None else args.damping)
    block_size = args.block_size or preset.block_size
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or roles(name) is None:
                continue  # an untied embedding stays fp32 here; rounding lm_head rounds a tied table too
            bits, block, rounding, asymmetric = recipe(preset, name, tied, block_size)
            weight = module.weight.detach().numpy().T.astype(np.float32)  # [K, N], as MatMulNBits reads it
            block = fitted_block(weight.shape[0], block)
            if block is None:
                continue
            gram = grams.get(name)
            if rounding == "gptq":
                q = blockwise.quantize_compensated(weight, bits, block, gram, preset.damping, asymmetric)
            else:
                q = blockwise.quantize(weight, bits, block, np.diag(gram), rounding != "absmax", asymmetric)
            module.weight.copy_(torch.from_numpy(np.ascontiguousarray(q.dequantized().T)))


def rotate(model, rng: np.random.Generator) -> None:
    """Turn the residual stream by a random orthogonal Q and each head's values by a random-signed Hadamard R;
    the function the model computes stays the same (see the module's docstring)."""
    import torch

    config, inner = model.config, model.model
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q = torch.from_numpy(orthogonal(hidden, rng))
    with torch.no_grad():
        for layer in inner.layers:
            attention, mlp = layer.self_attn, layer.mlp
            _fold(layer.input_layernorm, (attention.q_proj, attention.k_proj, attention.v_proj), q)
            _fold(layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj), q)
            for out in (attention.o_proj, mlp.down_proj):
                out.weight.copy_((q.T @ out.weight.double()).float())
            r = torch.from_numpy(hadamard(head_dim, rng))
            v = attention.v_proj.weight.double().reshape(kv_heads, head_dim, hidden)
            attention.v_proj.weight.copy_(torch.einsum("ji,hjk->hik", r, v).reshape(-1, hidden).float())
            if attention.v_proj.bias is not None:  # Qwen2: the bias is part of each head's values
                bias = attention.v_proj.bias.double().reshape(kv_heads, head_dim)
                attention.v_proj.bias.copy_((bias @ r).reshape(-1).float())
            o = attention.o_proj.weight.double().reshape(hidden, heads, head_dim)
            attention.o_proj.weight.copy_(torch.einsum("dhj,jk->dhk", o, r).reshape(hidden, -1).float())
        table, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        table.copy_((table.double() @ q).float())
        if head is not table:  # untied: lm_head reads the stream the mix below puts back in the rotated basis
            head.copy_((head.double() @ q).float())
        gain = inner.norm.weight.double()
        mix = torch.nn.Linear(hidden, hidden, bias=False)
        mix.weight.copy_((q.T @ torch.diag(gain) @ q).T.float())
        inner.norm.weight.fill_(1)
        inner.norm = torch.nn.Sequential(inner.norm, mix)


def _fold(norm, projections, q) -> None:
    """The norm's gain into the projections it feeds, which then read the rotated stream."""
    gain = norm.weight.double()
    for projection in projections:
        projection.weight.copy_(((projection.weight.double() * gain[None, :]) @ q).float())
    norm.weight.fill_(1)


def orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]


def hadamard(n: int, rng: np.random.Generator) -> np.ndarray:
    """Sylvester's Hadamard matrix of a power-of-two size, random column signs, orthonormal."""
    if n & (n - 1):
        raise ValueError(f"head size {n} is not a power of two")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h * rng.choice([-1.0, 1.0], n)[None, :] / np.sqrt(n)


if __name__ == "__main__":
    main()
