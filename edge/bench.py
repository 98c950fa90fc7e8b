"""`edge bench`: load time, prefill and decode speed, time to first token, host overhead per token and peak RSS
of one bundle, each run in a fresh process (so load time and peak RSS are its own), as median and min-max.

Speed is shown here and never by timed tests. Absolute numbers on a shared machine are noise: compare engines
in the same run and read the ratios. The peers (onnxruntime-genai, optimum, llama.cpp) are not part of the runtime:
benchmarks/compare.py runs them beside edge-llm from a checkout, with this module's alternate() and table().
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np

FIGURES = ("load_s", "prefill_tok_s", "decode_tok_s", "ttft_s", "host_ms_per_token", "peak_rss_mb")


def measure(bundle: str, prompt_tokens: int, new_tokens: int, threads: int, profile: str = "auto") -> dict:
    """One run in this process: load, prefill a fixed prompt, greedy-decode exactly new_tokens (no eos stop)."""
    import edge
    from edge.devices import resolve
    from edge import generate as gen

    started = time.perf_counter()
    chosen = resolve(profile).profile
    if threads:
        chosen = replace(chosen, cpu=replace(chosen.cpu, intra_op_threads=threads))
    engine = edge.load(bundle, profile=chosen, context_length=prompt_tokens + new_tokens + 8)
    load = time.perf_counter() - started
    vocab = engine.model.shape["vocab_size"]
    prompt = np.random.default_rng(0).integers(3, min(vocab, 30000), size=prompt_tokens).tolist()
    in_graph = _time_forward(engine.model)
    params = engine.params(temperature=0, max_tokens=new_tokens)
    t0 = time.perf_counter()
    stream = gen.stream(engine.model, engine.tokenizer, prompt, params, eos_ids=())
    next(stream)
    first = time.perf_counter()
    in_graph[0] = 0.0
    count = 1 + sum(1 for _ in stream)
    end = time.perf_counter()
    decoded = count - 1
    return {
        "load_s": load, "ttft_s": first - t0, "prefill_tok_s": prompt_tokens / (first - t0),
        "decode_tok_s": decoded / (end - first), "host_ms_per_token": 1000 * ((end - first) - in_graph[0]) / decoded,
        "peak_rss_mb": peak_rss_mb(), "tokens": count,
    }


def _time_forward(model) -> list[float]:
    """Wrap model.forward to add up the seconds spent inside onnxruntime."""
    spent = [0.0]
    forward = model.forward

    def timed(cache, tokens):
        start = time.perf_counter()
        try:
            return forward(cache, tokens)
        finally:
            spent[0] += time.perf_counter() - start
    model.forward = timed
    return spent


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) / 1024


def summarize(runs: list[dict]) -> dict:
    return {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                "max": max(r[k] for r in runs)} for k in FIGURES if all(k in r for r in runs)}


def run_child(args: list[str]) -> dict:
    """One measurement in a fresh interpreter; its last stdout line is the JSON result."""
    done = subprocess.run([sys.executable, "-m", "edge.bench", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark run failed: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def edge_runner(bundle: str, threads: int = 0, profile: str = "auto"):
    return lambda prompt_tokens, new_tokens: run_child([bundle, str(prompt_tokens), str(new_tokens), str(threads),
                                                        profile])


def alternate(runners: dict, prompt_tokens: int, new_tokens: int, runs: int) -> dict[str, dict]:
    """Run every engine once per round, round after round, so drift on a shared machine hits all alike."""
    results: dict[str, list] = {name: [] for name in runners}
    for _ in range(runs):
        for name, run in runners.items():
            results[name].append(run(prompt_tokens, new_tokens))
    return {name: summarize(runs_) for name, runs_ in results.items()}


def table(results: dict[str, dict], reference: str = "edge") -> str:
    """One row per figure, one column per engine, then each peer's ratio to the reference engine."""
    engines = list(results)
    peers = [e for e in engines if e != reference]
    head = ["figure"] + engines + [f"edge/{p}" for p in peers]
    rows = [head, ["---"] * len(head)]
    for figure in FIGURES:
        cells = [figure] + [_cell(results[e][figure]) if figure in results[e] else "n/a" for e in engines]
        cells += [f"x{results[reference][figure]['median'] / results[p][figure]['median']:.2f}"
                  if figure in results[p] and figure in results[reference] else "n/a" for p in peers]
        rows.append(cells)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def _cell(figure: dict) -> str:
    return f"{figure['median']:.3g} ({figure['min']:.3g}-{figure['max']:.3g})"


if __name__ == "__main__":  # a child run: BUNDLE PROMPT_TOKENS NEW_TOKENS THREADS PROFILE
    bundle, prompt_tokens, new_tokens, threads, profile = sys.argv[1:6]
    print(json.dumps(measure(bundle, int(prompt_tokens), int(new_tokens), int(threads), profile)))
