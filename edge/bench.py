"""`edge bench`: load time, prefill and decode speed, time to first token, host overhead per token and peak RSS
of one bundle, each run in a fresh process (so load time and peak RSS are its own), as median and min-max.

Speed is shown here and never by timed tests. Absolute numbers on a shared machine are noise: compare engines
in the same run and read the ratios. The peers (onnxruntime-genai, optimum, llama.cpp) are not part of the runtime:
benchmarks/compare.py runs them beside edge-llm from a checkout, with this module's alternate() and table().
"""
from __future__ import annotations

import contextlib
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

FIGURES = ("load_s", "prefill_tok_s", "decode_tok_s", "ttft_s", "host_ms_per_token", "peak_rss_mb")


def measure(bundle: str, prompt_tokens: int, new_tokens: int, threads: int, profile: str = "auto") -> dict:
    """One run in this process: load, prefill a fixed prompt, greedy-decode exactly new_tokens (no eos stop)."""
    import edge
    import edge.engine  # noqa: F401 (imported before the clock, as the peers' benchmarks import theirs)
    from edge.devices import resolve

    started = time.perf_counter()
    chosen = resolve(profile).profile
    if threads:
        chosen = chosen.with_threads(threads)
    engine = edge.load(bundle, profile=chosen, context_length=prompt_tokens + new_tokens + 8)
    load = time.perf_counter() - started
    vocab = engine.bundle.manifest["model"]["vocab_size"]
    prompt = np.random.default_rng(0).integers(3, min(vocab, 30000), size=prompt_tokens).tolist()
    records = list(engine.stream(prompt, temperature=0, max_tokens=new_tokens, ignore_eos=True, cache_prompt=False,
                                 logprobs=False))  # as a server request that does not ask for them
    first, last = records[0], records[-1]
    decoded, decode_s = len(records) - 1, last.seconds - first.seconds
    in_graph = sum(r.compute_seconds for r in records[1:])
    return {
        "load_s": load, "ttft_s": first.seconds, "prefill_tok_s": prompt_tokens / first.seconds,
        "decode_tok_s": decoded / decode_s, "host_ms_per_token": 1000 * (decode_s - in_graph) / decoded,
        "peak_rss_mb": peak_rss_mb(), "tokens": len(records),
    }


def prefix_cache(bundle: str, cases_file: str, runs: int, threads: int = 0, profile: str = "auto") -> dict:
    """Time to first token through `edge serve` (max_tokens 1), with the prefix cache and without it
    (cache_prompt: false), in alternated rounds:
    - "system prompt": the file's long system prompt, cached by one earlier request, then a short question;
    - "turn 5": the file's conversation replayed turn by turn as a chat client sends it (the whole history each
      time, the hand-written answers in it), the fifth turn timed. Each round's conversation starts with its own
      tag, so no round finds an earlier round's in the cache."""
    cases = json.loads(Path(cases_file).read_text(encoding="utf-8"))
    system = [{"role": "system", "content": cases["system"]}]
    times: dict[str, dict[str, list]] = {case: {"warm": [], "cold": []} for case in ("system prompt", "turn 5")}
    with serving(bundle, threads, profile) as ask:
        ask(system + [user("Hello.")])  # the system prompt is cached from here on
        for r in range(runs):
            question = system + [user(cases["questions"][r % len(cases["questions"])])]
            times["system prompt"]["warm"].append(ask(question))
            times["system prompt"]["cold"].append(ask(question, cache_prompt=False))
            history = [{"role": "system", "content": f"Conversation {r + 1}. {cases['system']}"}]
            *earlier, (last,) = cases["conversation"]
            for said, answer in earlier:
                history.append(user(said))
                ask(history)
                history.append({"role": "assistant", "content": answer})
            times["turn 5"]["warm"].append(ask(history + [user(last)]))
            times["turn 5"]["cold"].append(ask(history + [user(last)], cache_prompt=False))
    return {case: _prefix_figures(t) for case, t in times.items()}


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def decode_rate(records: list) -> float:
    """Tokens per second of a stream's records from its first token to its last (the prefill left out)."""
    return (len(records) - 1) / max(records[-1].seconds - records[0].seconds, 1e-9)


def speculation(bundle: str, cases_file: str, runs: int, threads: int = 0, profile: str = "auto",
                max_tokens: int = 128) -> dict:
    """Greedy decode speed of each prompt of the file's sets with speculative decoding and without, alternated
    in one process, timed through the records (from the first token to the last): per set, the median over
    prompts of each prompt's median ratio, the lowest prompt's, the acceptance and whether the texts matched."""
    import edge
    from edge.devices import resolve

    cases = json.loads(Path(cases_file).read_text(encoding="utf-8"))
    chosen = resolve(profile).profile
    engine = edge.load(bundle, profile=chosen.with_threads(threads) if threads else chosen, prefix_cache_mb=0)
    results = {}
    for name in ("grounded", "open_ended"):
        ratios, same, drafted, accepted, speeds = [], 0, 0, 0, {"plain": [], "speculative": []}
        for prompt in cases[name]:
            rates: dict[bool, list[float]] = {False: [], True: []}
            identical = True
            for _ in range(runs):
                texts = []
                for speculate in (False, True):
                    records = list(engine.stream(messages=[user(prompt)], temperature=0, max_tokens=max_tokens,
                                                 speculate=speculate, logprobs=False))
                    rates[speculate].append(decode_rate(records))
                    texts.append("".join(r.text for r in records))
                identical &= texts[0] == texts[1]
                drafted += sum(r.drafted for r in records)
                accepted += sum(r.accepted for r in records)
            same += identical
            plain, fast = statistics.median(rates[False]), statistics.median(rates[True])
            speeds["plain"].append(plain)
            speeds["speculative"].append(fast)
            ratios.append(fast / plain)
        results[name] = {"median_ratio": statistics.median(ratios), "lowest_ratio": min(ratios),
                         "plain_tok_s": statistics.median(speeds["plain"]),
                         "speculative_tok_s": statistics.median(speeds["speculative"]),
                         "acceptance": accepted / max(drafted, 1), "same_text": same, "prompts": len(ratios),
                         "min_ratio_prompt": ratios.index(min(ratios)),
                         "runs": runs}
    return results


def speculation_table(results: dict) -> str:
    rows = ["| set | prompts | decode plain | decode speculative | median ratio | lowest prompt | accepted drafts | "
            "same greedy text |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows += [f"| {name} | {r['prompts']} | {r['plain_tok_s']:.1f} tok/s | {r['speculative_tok_s']:.1f} tok/s | "
             f"x{r['median_ratio']:.2f} | x{r['lowest_ratio']:.2f} | {100 * r['acceptance']:.0f}% | "
             f"{r['same_text']} of {r['prompts']} |" for name, r in results.items()]
    return "\n".join(rows)


def _prefix_figures(times: dict[str, list]) -> dict:
    """Median time to first token warm and cold, their ratio, and the prompt and cached token counts."""
    warm, cold = (statistics.median(s for s, _ in times[k]) for k in ("warm", "cold"))
    usage = times["warm"][-1][1]
    return {"ttft_warm_s": warm, "ttft_cold_s": cold, "speedup": cold / warm, "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"], "runs": len(times["warm"])}


@contextlib.contextmanager
def serving(bundle: str, threads: int, profile: str):
    """`edge serve` in a child process on a free loopback port; yields ask(messages, **fields) -> (seconds, usage)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "edge.cli", "serve", bundle, "--port", str(port), "--profile", profile]
    server = subprocess.Popen(command + (["--threads", str(threads)] if threads else []),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, server)

        def ask(messages, **fields):
            body = json.dumps({"messages": messages, "max_tokens": 1, "temperature": 0, **fields}).encode()
            request = urllib.request.Request(f"{base}/v1/chat/completions", body,
                                             {"Content-Type": "application/json"})
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=300) as response:
                reply = json.loads(response.read())
            return time.perf_counter() - started, reply["usage"]
        yield ask
    finally:
        server.terminate()
        server.wait(30)


def _wait_healthy(base: str, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"edge serve exited: {server.stderr.read().decode(errors='replace')[-800:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("edge serve did not become healthy")


def prefix_table(results: dict) -> str:
    rows = ["| case | prompt tokens | cached | TTFT cached | TTFT uncached | speed-up |", "| --- | --- | --- | --- | --- | --- |"]
    rows += [f"| {case} | {r['prompt_tokens']} | {r['cached_tokens']} | {1000 * r['ttft_warm_s']:.1f} ms | "
             f"{1000 * r['ttft_cold_s']:.1f} ms | x{r['speedup']:.2f} |" for case, r in results.items()]
    return "\n".join(rows)


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
