"""Is int4 with int8 activations (accuracy level 4) faster than fp32 compute (level 0) on this CPU?

Exports one checkpoint twice (int4, levels 0 and 4), then times prefill and greedy decode of both in the same run,
interleaved, and prints the ratio. Absolute times on a shared machine are noise; the ratio is the figure.

    python benchmarks/accuracy_level.py [CHECKPOINT] [--tokens 64] [--rounds 3]

Without CHECKPOINT it builds a random-init 42M-parameter Llama (tests/families.py "mid"); speed does not depend
on the weights being trained.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    args = parse()
    import edge
    from edge.export.pipeline import export

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or build_mid(Path(tmp) / "mid")
        engines = {}
        for level in (0, 4):
            out = Path(tmp) / f"int4-level{level}"
            export(str(checkpoint), str(out), quant="int4", accuracy_level=level)
            engines[level] = edge.load(out, profile="cpu")
        prompt = engines[0].encode("The quick brown fox jumps over the lazy dog. " * 8)
        times = {level: [] for level in engines}
        for _ in range(args.rounds):
            for level, engine in engines.items():
                times[level].append(decode_rate(engine, prompt, args.tokens))
    rate = {level: statistics.median(t) for level, t in times.items()}
    print(f"decode tokens/s, median of {args.rounds}: level 0 (fp32 compute) {rate[0]:.1f}, "
          f"level 4 (int8 activations) {rate[4]:.1f}; level 4 / level 0 = x{rate[4] / rate[0]:.2f}")


def decode_rate(engine, prompt: list[int], tokens: int) -> float:
    stream = engine.stream(prompt, temperature=0, max_tokens=tokens)
    next(stream)  # prefill and the first token are not decode
    start, n = time.perf_counter(), 0
    for n, _ in enumerate(stream, start=1):
        pass
    return n / (time.perf_counter() - start)


def build_mid(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from families import MID, build_checkpoint

    return build_checkpoint(MID, folder)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="?", type=Path, help="a Hugging Face checkpoint folder")
    p.add_argument("--tokens", type=int, default=64, help="decode tokens per measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved measurements per level")
    return p.parse_args()


if __name__ == "__main__":
    main()
