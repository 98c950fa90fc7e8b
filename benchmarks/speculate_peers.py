"""edge-llm's prompt-lookup speculation against onnxruntime-genai's n-gram speculation, on the same model, the same
prompt token ids and the same rounds (run from a checkout; genai is not part of the runtime):

    python benchmarks/speculate_peers.py BUNDLE HF_DIR [--cases benchmarks/speculate.json] [--runs 5] [--threads 2]
           [--new-tokens 128] [--genai-venv DIR] [--json]

genai is built from HF_DIR as benchmarks/compare.py builds it (int4, block 32, accuracy level 4) and tried at every
setting of ngram_size 2-4 x max_draft_tokens 4, 8, 16 (its other options at their defaults); per set, the setting
with the highest median decode speed over the prompts is its best. Each round runs edge-llm (plain and speculative,
alternated per prompt, in this process) and then one genai process (plain and every setting, alternated per prompt).
Decode speed counts from the first generated token to the last, greedy, as `edge bench --speculate-set` does.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from compare import child, genai_model

from edge import hugepages
from edge.bench import decode_rate, user
from edge.devices import resolve

GRID = [{"ngram_size": n, "max_draft_tokens": k} for n in (2, 3, 4) for k in (4, 8, 16)]

GENAI_SPECULATE_CHILD = r"""
import json, sys, time
import numpy as np
import onnxruntime_genai as og
folder, cases_file, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
cases = json.load(open(cases_file))
model = og.Model(folder)

def run(ids, options):
    params = og.GeneratorParams(model)
    # no min_length: genai drafts only once a turn is past its minimum length
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    if options:
        params.set_speculative_options(**options)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(ids, dtype=np.int32))
    generator.generate_next_token()  # samples the first token from the prefill's logits
    first, start = generator.token_count(), time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
    seconds = time.perf_counter() - start
    stats = generator.get_speculative_stats() if options else {}
    return {"rate": (generator.token_count() - first) / max(seconds, 1e-9),
            "tokens": [int(t) for t in generator.get_sequence(0)[len(ids):]],
            "proposed": stats.get("draft_tokens_proposed", 0), "accepted": stats.get("draft_tokens_accepted", 0)}

out = {}
for name, prompts in cases["prompts"].items():
    out[name] = [[run(ids, options) for options in cases["settings"]] for ids in prompts]
print(json.dumps(out))
"""


def edge_round(engine, prompts: dict[str, list[list[int]]], new_tokens: int) -> dict:
    """set -> per prompt -> [plain, speculative] figures, as the genai child reports them."""
    out = {}
    for name, sets in prompts.items():
        out[name] = []
        for ids in sets:
            pair = []
            for speculate in (False, True):
                records = list(engine.stream(prompt=ids, temperature=0, max_tokens=new_tokens, speculate=speculate,
                                             logprobs=False))  # as genai's loop: none computed
                pair.append({"rate": decode_rate(records), "tokens": [r.token for r in records],
                             "proposed": sum(r.drafted for r in records),
                             "accepted": sum(r.accepted for r in records)})
            out[name].append(pair)
    return out


def figures(rounds: list[dict], labels: list[str]) -> dict:
    """Per set and label: per-prompt median speed over the rounds, their median, and the acceptance."""
    out = {}
    for name in rounds[0]:
        prompts = len(rounds[0][name])
        out[name] = {}
        for i, label in enumerate(labels):
            speeds = [statistics.median(r[name][p][i]["rate"] for r in rounds) for p in range(prompts)]
            proposed = sum(r[name][p][i]["proposed"] for r in rounds for p in range(prompts))
            accepted = sum(r[name][p][i]["accepted"] for r in rounds for p in range(prompts))
            out[name][label] = {"per_prompt": speeds, "median": statistics.median(speeds),
                                "acceptance": accepted / proposed if proposed else None}
    return out


def summary(edge: dict, genai: dict) -> dict:
    """Per set: genai's best setting, and edge-llm's speculative speed over it (median and lowest of the
    per-prompt ratios), beside each engine's own gain over its plain decode."""
    out = {}
    for name in edge:
        settings = {k: v for k, v in genai[name].items() if k != "plain"}
        best = max(settings, key=lambda k: settings[k]["median"])
        ours, theirs = edge[name]["speculative"]["per_prompt"], settings[best]["per_prompt"]
        ratios = [a / b for a, b in zip(ours, theirs)]
        gain = lambda figs, label: statistics.median(  # noqa: E731
            a / b for a, b in zip(figs[label]["per_prompt"], figs["plain"]["per_prompt"]))
        out[name] = {"genai_best": best, "edge_over_genai": statistics.median(ratios), "lowest": min(ratios),
                     "edge_tok_s": edge[name]["speculative"]["median"], "genai_tok_s": settings[best]["median"],
                     "edge_gain": gain(edge[name], "speculative"), "genai_gain": gain(genai[name], best),
                     "plain_over_plain": statistics.median(
                         a / b for a, b in zip(edge[name]["plain"]["per_prompt"], genai[name]["plain"]["per_prompt"])),
                     "edge_acceptance": edge[name]["speculative"]["acceptance"],
                     "genai_acceptance": settings[best]["acceptance"]}
    return out


def table(results: dict) -> str:
    rows = ["| set | edge-llm speculative | genai best (setting) | edge / genai (lowest prompt) | edge gain | "
            "genai gain | plain edge / plain genai | accepted edge / genai |", "| --- " * 8 + "|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['edge_tok_s']:.1f} tok/s | {r['genai_tok_s']:.1f} tok/s ({r['genai_best']}) | "
                    f"x{r['edge_over_genai']:.2f} (x{r['lowest']:.2f}) | x{r['edge_gain']:.2f} | "
                    f"x{r['genai_gain']:.2f} | x{r['plain_over_plain']:.2f} | "
                    f"{100 * r['edge_acceptance']:.0f}% / {100 * (r['genai_acceptance'] or 0):.0f}% |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="the edge-llm bundle (its graph must take logits_to_keep)")
    parser.add_argument("hf_dir", help="the checkpoint the bundle was exported from; genai's model is built from it")
    parser.add_argument("--cases", default=str(Path(__file__).with_name("speculate.json")),
                        help="the grounded and open-ended prompt sets (%(default)s)")
    parser.add_argument("--runs", type=int, default=5, help="alternated rounds (%(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for both engines (%(default)s)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--genai-venv", help="a virtual environment with onnxruntime-genai and transformers 5.x")
    parser.add_argument("--json", action="store_true", help="print every figure as JSON")
    args = parser.parse_args(argv)
    hugepages.reexec(resolve("auto").profile.memory.huge_pages)
    import edge

    engine = edge.load(args.bundle, profile=resolve("auto").profile.with_threads(args.threads), prefix_cache_mb=0)
    cases = json.loads(Path(args.cases).read_text(encoding="utf-8"))
    prompts = {name: [engine.encode(messages=[user(p)]) for p in cases[name]] for name in ("grounded", "open_ended")}
    python, folder = genai_model(Path(args.hf_dir), args.threads, args.genai_venv)
    labels = ["plain"] + [f"n{s['ngram_size']}k{s['max_draft_tokens']}" for s in GRID]
    edge_rounds, genai_rounds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        request = Path(tmp) / "cases.json"
        request.write_text(json.dumps({"prompts": prompts, "settings": [None] + GRID}))
        for round_ in range(args.runs):
            print(f"speculate_peers: round {round_ + 1} of {args.runs}", file=sys.stderr)
            edge_rounds.append(edge_round(engine, prompts, args.new_tokens))
            genai_rounds.append(child(str(python), "-c", GENAI_SPECULATE_CHILD, folder, request, args.new_tokens))
    edge_figures, genai_figures = figures(edge_rounds, ["plain", "speculative"]), figures(genai_rounds, labels)
    results = summary(edge_figures, genai_figures)
    if args.json:
        print(json.dumps({"summary": results, "edge": edge_figures, "genai": genai_figures}, indent=2))
    else:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
