"""What each quantization loses against the fp32 bundle of the same model, beside llama.cpp's own quantizations of
the same checkpoint, on the exporter's held-out text: size, perplexity ratio, top-1 agreement, mean KL, and
(with --runs) decode tok/s in alternated fresh processes. Run from a checkout:

    python benchmarks/quality.py FP32_BUNDLE LABEL=BUNDLE ... [--hf HF_DIR --llamacpp q4_0,q4_k_m,q8_0]
           [--text export/eval_text.txt] [--runs 5] [--threads 2] [--json OUT.json]

Every figure is teacher-forced against the fp32 bundle's logits (edge/fidelity.py, the code `edge eval` runs).
llama.cpp's GGUFs are written from the checkpoint in f16 and quantized by llama.cpp's own quantizer in
llama-cpp-python's environment (benchmarks/llamacpp.py; see compare.py for where it looks), which also
evaluates them one token at a time; its logits come back as a .npy file.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import edge
from edge import fidelity
from edge.bench import alternate, edge_runner
from edge.bundle import open_bundle

HERE = Path(__file__).parent
TEXT = HERE.parent / "export" / "eval_text.txt"


def model_mb(bundle: Path) -> float:
    """The bytes of the model files: model.onnx and its external data, not the tokenizer."""
    opened = open_bundle(bundle, verify="none")
    return sum((bundle / f).stat().st_size for f in opened.model_files()) / 1e6


def bundle_row(label: str, bundle: Path, reference, text: str) -> dict:
    engine = edge.load(bundle)
    quant = engine.bundle.manifest.get("quantization", {})
    figures = engine.evaluate(text, reference)
    return {"label": label, "MB": model_mb(bundle), "accuracy_level": quant.get("accuracy_level", "-"),
            "preset": quant.get("preset", quant.get("method")), **figures}


def llamacpp_row(ftype: str, hf_dir: Path, reference, text: str, threads: int) -> dict:
    sys.path.insert(0, str(HERE))
    from compare import CACHE, _key, _llamacpp_python

    python, script = _llamacpp_python(None), str(HERE / "llamacpp.py")
    gguf = CACHE / f"llamacpp-{_key(hf_dir)}-{ftype}.gguf"
    if not gguf.exists():
        subprocess.run([python, script, "convert", str(hf_dir), str(gguf), ftype], check=True)
    windows = fidelity.windows(reference.encode(text), reference.context_length)
    with tempfile.TemporaryDirectory() as tmp:
        ids, out = Path(tmp) / "ids.json", Path(tmp) / "logits.npy"
        ids.write_text(json.dumps(windows))
        subprocess.run([python, script, "logits", str(gguf), str(ids), str(out), str(threads)], check=True)
        logits = np.load(out, mmap_mode="r")
        starts = np.cumsum([0] + [len(w) - 1 for w in windows])
        got = ((logits[a:b], w[1:]) for a, b, w in zip(starts, starts[1:], windows))
        want = (block for w in windows for block in _merged(reference.decoder.scored_rows(w)))
        figures = fidelity.measure(got, want)
    return {"label": f"llama.cpp {ftype}", "MB": gguf.stat().st_size / 1e6, "accuracy_level": "-",
            "preset": ftype, **figures}


def _merged(blocks):
    """The reference's row blocks of one window as one block, to pair with llama.cpp's window of rows."""
    rows, targets = zip(*blocks)
    yield np.concatenate(rows), [t for block in targets for t in block]


def markdown(rows: list[dict]) -> str:
    lines = ["| bundle | accuracy level | size (MB) | perplexity ratio | top-1 agreement | mean KL | decode tok/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        speed = f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "-"
        lines.append(f"| {r['label']} | {r['accuracy_level']} | {r['MB']:.1f} | x{r['perplexity_ratio']:.3f} | "
                     f"{r['top1_agreement']:.1%} | {r['mean_kl']:.4f} | {speed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reference", help="the fp32 bundle of the model")
    p.add_argument("bundles", nargs="+", metavar="LABEL=BUNDLE")
    p.add_argument("--text", default=str(TEXT), help="the held-out text (default: the exporter's)")
    p.add_argument("--hf", help="the checkpoint folder, for llama.cpp's GGUFs")
    p.add_argument("--llamacpp", default="", help="llama.cpp quantizations to add, e.g. q4_0,q4_k_m,q8_0")
    p.add_argument("--runs", type=int, default=0, help="alternated decode runs per bundle (0: no speed column)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    text = Path(args.text).read_text(encoding="utf-8")
    reference = edge.load(args.reference)
    labelled = [b.split("=", 1) for b in args.bundles]
    rows = [bundle_row(label, Path(path), reference, text) for label, path in labelled]
    if args.runs:
        speeds = alternate({label: edge_runner(path, args.threads) for label, path in labelled}, 128, 128, args.runs)
        for row in rows:
            row["decode_tok_s"] = speeds[row["label"]]["decode_tok_s"]["median"]
    for ftype in filter(None, args.llamacpp.split(",")):
        rows.append(llamacpp_row(ftype, Path(args.hf), reference, text, args.threads))
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
