"""What tests/test_arm64.py compares between x86 and an emulated ARM CPU, computed by the installed runtime alone
(no torch, no test packages: under emulation only the wheel and its dependencies are there).

usage: python arm64_probe.py JOBS.json OUT_DIR

JOBS.json: [{"name", "bundle", "prompt" (text, or "messages" for a chat), "greedy" (tokens), "text" (scored
teacher-forced), "score_tokens" (positions of it to score; 0: all)}]. For each job OUT_DIR gets NAME.npy (the
logits of every scored position) and one line of results.json: greedy token ids, load and run seconds, the
profile and the int4 kernel path this CPU gets.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import edge
from edge.devices import read_device, resolve
from edge.kernels import describe, kernel_path


def probe(job: dict, out: Path, threads: int) -> dict:
    profile = resolve("auto").profile
    profile = replace(profile, cpu=replace(profile.cpu, intra_op_threads=threads))
    started = time.perf_counter()
    engine = edge.load(job["bundle"], profile=profile, context_length=256)
    loaded = time.perf_counter()
    prompt = job.get("messages") and {"messages": job["messages"]} or {"prompt": job["prompt"]}
    greedy = [r.token for r in engine.stream(**prompt, temperature=0, max_tokens=job["greedy"])]
    generated = time.perf_counter()
    ids = engine.encode(job["text"])
    logits = engine.decoder.score(ids[:job["score_tokens"] + 1] if job.get("score_tokens") else ids)
    scored = time.perf_counter()
    np.save(out / f"{job['name']}.npy", logits.astype(np.float32))
    quant = engine.bundle.manifest["quantization"]
    path = kernel_path(read_device(), quant["method"], quant.get("accuracy_level", 0), engine.decoder.providers[0])
    return {"name": job["name"], "machine": platform.machine(), "profile": engine.profile.name, "greedy": greedy,
            "greedy_text": engine.tokenizer.decode(greedy), "kernels": describe(path), "compute": path.compute,
            "load_s": loaded - started, "greedy_s": generated - loaded, "score_s": scored - generated,
            "scored_tokens": int(logits.shape[0])}


def main(jobs_file: str, out_dir: str, threads: str = "2") -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = [probe(job, out, int(threads)) for job in json.loads(Path(jobs_file).read_text())]
    (out / "results.json").write_text("\n".join(json.dumps(r) for r in results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
