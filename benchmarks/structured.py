"""Structured output on a bundle: how often answers are complete and valid, and what the constraint costs per token.

    python benchmarks/structured.py validity BUNDLE [--seeds 20] [--temperature 0.8] [--threads 2]
    python benchmarks/structured.py cost BUNDLE [--runs 5] [--new-tokens 64] [--threads 2]

validity: `edge serve BUNDLE` in a child process, asked through the official openai client for each schema of
benchmarks/structured.json at each seed (max_tokens 256): counts of answers that end with finish_reason stop, parse,
and validate (jsonschema); json_object answers to the same prompts must parse.
cost: in this process, greedy, alternated rounds of the same prompt unconstrained (ignore_eos, so it runs the whole
length) and constrained by a fixed schema whose shortest answer is longer than --new-tokens, as served (the
grammar's forced tokens drafted) and one token per pass (the mask's own cost): the median milliseconds per token
from the first token to the last, and their ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
from pathlib import Path
from unittest import mock

import edge
from edge.bench import decode_rate, user
from edge.devices import resolve

CASES = json.loads((Path(__file__).with_name("structured.json")).read_text(encoding="utf-8"))["cases"]
# Long enough for any --new-tokens up to ~100: at least 24 strings of at least 2 characters.
LONG = {"type": "object", "properties": {"readings": {"type": "array", "minItems": 24, "maxItems": 64, "items": {
    "type": "object", "properties": {"sensor": {"type": "string", "minLength": 2, "maxLength": 12},
                                     "value": {"type": "number", "minimum": -100, "maximum": 100}},
    "required": ["sensor", "value"]}}}, "required": ["readings"]}
COST_PROMPT = "Write the readings of the sensors in the greenhouse as JSON."


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(base: str, server: subprocess.Popen, seconds: float = 120) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("edge serve did not become healthy (its output is above)")


def check_answers(bundle: str, seeds: int, temperature: float, threads: int) -> dict:
    """Per schema (and json_object): answers that stopped, parsed and validated, out of seeds."""
    import jsonschema
    import openai

    port = _port()
    command = [sys.executable, "-m", "edge.cli", "serve", bundle, "--port", str(port), "--prefix-cache", "off"]
    server = subprocess.Popen(command + (["--threads", str(threads)] if threads else []))
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(base, server)
        api = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        results = {}
        for case in CASES:
            for kind in ("json_schema", "json_object"):
                fmt = ({"type": "json_schema", "json_schema": {"name": "a", "schema": case["schema"], "strict": True}}
                       if kind == "json_schema" else {"type": "json_object"})
                tally = {"stop": 0, "parses": 0, "valid": 0, "seeds": seeds, "failures": []}
                for seed in range(seeds):
                    reply = api.chat.completions.create(model="x", messages=[user(case["prompt"])], max_tokens=256,
                                                        temperature=temperature, seed=seed, response_format=fmt)
                    choice = reply.choices[0]
                    tally["stop"] += choice.finish_reason == "stop"
                    try:
                        value = json.loads(choice.message.content)
                        tally["parses"] += 1
                        if kind == "json_schema":
                            jsonschema.validate(value, case["schema"])
                        tally["valid"] += isinstance(value, dict)
                    except (ValueError, jsonschema.ValidationError):
                        tally["failures"].append(choice.message.content[-120:])
                results[f"{case['name']} ({kind})"] = tally
        return results
    finally:
        server.terminate()
        server.wait(30)


def cost(bundle: str, runs: int, new_tokens: int, threads: int) -> dict:
    """Median ms per token unconstrained and constrained, alternated in one process."""
    chosen = resolve("auto").profile
    engine = edge.load(bundle, profile=chosen.with_threads(threads) if threads else chosen, prefix_cache_mb=0)
    messages = [user(COST_PROMPT)] if engine.chat_template is not None else None
    prompt = None if messages else COST_PROMPT
    engine.params(json_schema=LONG)  # compiled once, as a server does for a schema it sees again
    times: dict[str, list[float]] = {"free": [], "constrained": [], "one_per_pass": []}
    tokens = {}
    rounds = (("free", {"ignore_eos": True}), ("constrained", {"json_schema": LONG}),
              ("one_per_pass", {"json_schema": LONG}))
    for _ in range(runs + 1):  # the first round warms up and is dropped
        for label, fields in rounds:
            with _last_row_only(engine.decoder) if label == "one_per_pass" else contextlib.nullcontext():
                records = list(engine.stream(prompt, messages, temperature=0, max_tokens=new_tokens, **fields))
            times[label].append(1000 / decode_rate(records))
            tokens[label] = len(records)
    ms = {k: statistics.median(v[1:]) for k, v in times.items()}
    return {"ms_per_token_free": ms["free"], "ms_per_token_constrained": ms["constrained"],
            "ratio": ms["constrained"] / ms["free"], "ms_per_token_one_per_pass": ms["one_per_pass"],
            "ratio_one_per_pass": ms["one_per_pass"] / ms["free"], "tokens": tokens,
            "vocab": engine.decoder.shape["vocab_size"], "runs": runs}


def _last_row_only(decoder):
    """The decoder as one that returns only the last position's logits: constrained output one token per pass,
    without drafting the grammar's forced tokens (what the mask alone costs)."""
    return mock.patch.object(type(decoder), "verifies", property(lambda self: False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("validity", "cost"))
    parser.add_argument("bundle")
    parser.add_argument("--seeds", type=int, default=20, help="validity: seeds per schema (%(default)s)")
    parser.add_argument("--temperature", type=float, default=0.8, help="validity: sampling temperature")
    parser.add_argument("--runs", type=int, default=5, help="cost: alternated rounds (%(default)s)")
    parser.add_argument("--new-tokens", type=int, default=64, help="cost: tokens per generation (%(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (%(default)s; 0: the profile's)")
    args = parser.parse_args(argv)
    if args.mode == "validity":
        results = check_answers(args.bundle, args.seeds, args.temperature, args.threads)
        for name, t in results.items():
            print(f"{name}: stop {t['stop']}/{t['seeds']}, parses {t['parses']}/{t['seeds']}, "
                  f"valid {t['valid']}/{t['seeds']}" + (f"; failed: {t['failures'][:2]}" if t["failures"] else ""))
    else:
        print(json.dumps(cost(args.bundle, args.runs, args.new_tokens, args.threads), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
