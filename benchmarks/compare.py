"""edge-llm against its peers, built from the same checkpoint, run in alternation in one session: ratios, not
absolute times, are what a shared machine can show. Run from a checkout (the peers are not part of the runtime):

    python benchmarks/compare.py BUNDLE HF_DIR [--peers genai,optimum,llamacpp] [--runs 5] [--threads 2]
           [--prompt-tokens 128] [--new-tokens 128] [--also LABEL=BUNDLE ...] [--genai-venv DIR] [--llamacpp-venv DIR]

Each peer runs one measurement per fresh process, like edge-llm's own runs, so that load time and peak RSS are
its own. None of them is a dependency of edge-llm:
- genai: onnxruntime-genai's builder (int4, block 32, accuracy level 4, CPU) and its generator, from a virtual
  environment of its own because its builder needs transformers 5.x (created on first use).
- optimum: optimum's ORTModelForCausalLM on optimum's exported graph, quantized with the same MatMulNBits recipe
  as ours (in this environment, from the export extra).
- llamacpp: llama.cpp q4_0 through llama-cpp-python, when an environment has it (it builds from source for ~26
  minutes, so it is never built here): the GGUF is converted and quantized in that environment
  (benchmarks/llamacpp.py). llamacpp-q4_k_m: the same with Q4_K_M. Where batched prompt evaluation crashes, the
  prefill falls back to one token at a time (said on stderr).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from edge import hugepages
from edge.bench import alternate, edge_runner, table
from edge.bundle import cache_dir
from edge.devices import resolve

CACHE = cache_dir("peers")


class PeerUnavailable(RuntimeError):
    """A peer that cannot run here; the comparison skips it and says why."""


GENAI_CHILD = r"""
import json, sys, time, resource
import numpy as np
import onnxruntime_genai as og
folder, prompt_tokens, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
start = time.perf_counter()
model = og.Model(folder)
load = time.perf_counter() - start
params = og.GeneratorParams(model)
params.set_search_options(max_length=prompt_tokens + new_tokens, min_length=prompt_tokens + new_tokens, do_sample=False)
generator = og.Generator(model, params)
vocab = json.load(open(folder + "/genai_config.json"))["model"]["vocab_size"]
prompt = np.random.default_rng(0).integers(3, min(vocab, 30000), size=prompt_tokens).astype(np.int32)
t0 = time.perf_counter()
generator.append_tokens(prompt)
first = time.perf_counter()
count = 0
while not generator.is_done() and count < new_tokens:
    generator.generate_next_token()
    count += 1
end = time.perf_counter()
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps({"load_s": load, "ttft_s": first - t0, "prefill_tok_s": prompt_tokens / (first - t0),
                  "decode_tok_s": count / (end - first), "peak_rss_mb": peak, "tokens": count}))
"""

OPTIMUM_CHILD = r"""
import json, sys, time
import numpy as np, torch
from optimum.onnxruntime import ORTModelForCausalLM
import onnxruntime as ort
folder, prompt_tokens, new_tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
options = ort.SessionOptions()
options.intra_op_num_threads = threads
start = time.perf_counter()
model = ORTModelForCausalLM.from_pretrained(folder, session_options=options, use_cache=True, use_io_binding=False)
load = time.perf_counter() - start
vocab = model.config.vocab_size
ids = torch.tensor([np.random.default_rng(0).integers(3, min(vocab, 30000), size=prompt_tokens)])
def run(n):
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t
first = run(1)
total = run(new_tokens)
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps({"load_s": load, "ttft_s": first, "prefill_tok_s": prompt_tokens / first,
                  "decode_tok_s": (new_tokens - 1) / max(total - first, 1e-9), "peak_rss_mb": peak,
                  "tokens": new_tokens}))
"""


def child(python: str, *args) -> dict:
    """Run one measurement in a fresh interpreter; its last stdout line is the JSON result."""
    # as its users run it: without the huge-page tunable edge-llm adds for itself (set GLIBC_TUNABLES before
    # the comparison to give every engine the same)
    done = subprocess.run([python, *map(str, args)], capture_output=True, text=True,
                          env=hugepages.original_environment())
    if done.returncode != 0:
        raise RuntimeError(f"peer run failed: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def genai_runner(hf_dir: Path, threads: int, venv: str | None):
    python, out = genai_model(hf_dir, threads, venv)
    return lambda prompt_tokens, new_tokens: child(str(python), "-c", GENAI_CHILD, out, prompt_tokens, new_tokens)


def genai_model(hf_dir: Path, threads: int, venv: str | None) -> tuple[Path, Path]:
    """The genai environment's python and the folder of its model built from hf_dir (both made on first use).
    The builder keeps the logits of every position (no prune_lm_head), which its n-gram speculation needs."""
    python = Path(venv or CACHE / "genai") / "bin" / "python"
    if not python.exists():
        _make_genai_venv(python.parent.parent)
    out = CACHE / f"genai-{_key(hf_dir)}"
    if not (out / "genai_config.json").exists():
        build = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out), "-p", "int4",
                 "-e", "cpu", "-c", str(CACHE / "genai-hf-cache"), "--extra_options", "int4_block_size=32",
                 "int4_accuracy_level=4"]
        done = subprocess.run(build, capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(out, ignore_errors=True)
            raise PeerUnavailable(f"onnxruntime-genai's builder failed: {done.stderr.strip()[-600:]}")
    _set_genai_threads(out / "genai_config.json", threads)
    return python, out


def _make_genai_venv(folder: Path) -> None:
    print(f"compare: creating {folder} for onnxruntime-genai (transformers 5.x, torch)", file=sys.stderr)
    steps = [[sys.executable, "-m", "venv", str(folder)],
             [str(folder / "bin" / "pip"), "install", "-q", "torch==2.13.0"],  # the CPU build, before anything pulls CUDA
             [str(folder / "bin" / "pip"), "install", "-q", "onnxruntime-genai", "transformers>=5", "onnx", "onnx-ir"]]
    for step in steps:
        if subprocess.run(step).returncode != 0:
            raise PeerUnavailable(f"could not set up {folder}: {' '.join(step)} failed")


def _set_genai_threads(config: Path, threads: int) -> None:
    data = json.loads(config.read_text())
    options = data["model"]["decoder"].setdefault("session_options", {})
    if threads:
        options["intra_op_num_threads"] = threads
    else:
        options.pop("intra_op_num_threads", None)
    config.write_text(json.dumps(data, indent=2))


def optimum_runner(hf_dir: Path, threads: int):
    """optimum's graph quantized like ours (int4, block 32, accuracy level 4), driven by ORTModelForCausalLM."""
    try:
        import optimum.onnxruntime  # noqa: F401
    except ImportError as e:
        raise PeerUnavailable(f"optimum.onnxruntime is not installed ({e}); pip install 'edge-llm[export]'") from e
    out = CACHE / f"optimum-{_key(hf_dir)}"
    if not (out / "model.onnx").exists():
        from edge.export.pipeline import export

        export(str(hf_dir), str(out), quant="int4", graph="optimum", force=True)  # level 4, as every int4 export
        for name in ("config.json", "generation_config.json"):
            if (hf_dir / name).exists():
                shutil.copy(hf_dir / name, out / name)
    return lambda prompt_tokens, new_tokens: child(sys.executable, "-c", OPTIMUM_CHILD, out, prompt_tokens, new_tokens,
                                                   threads)


def llamacpp_runner(hf_dir: Path, threads: int, venv: str | None, ftype: str = "q4_0"):
    """llama.cpp (q4_0, or another of llamacpp.py's types) through llama-cpp-python, from the environment that has
    it (it compiles for ~26 minutes here, so it is never built here). Where its batched prompt evaluation crashes
    (seen with q4_0 on an AVX-512/AMX CPU), it prefills one token at a time from then on, and says so."""
    python = _llamacpp_python(venv)
    out = CACHE / f"llamacpp-{_key(hf_dir)}-{ftype}.gguf"
    script = str(Path(__file__).with_name("llamacpp.py"))
    if not out.exists():
        done = subprocess.run([python, script, "convert", str(hf_dir), str(out), ftype], capture_output=True,
                              text=True)
        if done.returncode != 0:
            out.unlink(missing_ok=True)
            raise PeerUnavailable(f"the GGUF conversion failed: {done.stderr.strip()[-600:]}")
    batch = [512]

    def run(prompt_tokens: int, new_tokens: int) -> dict:
        try:
            return child(python, script, "run", out, prompt_tokens, new_tokens, threads, batch[0])
        except RuntimeError as e:
            if batch[0] == 1:
                raise
            print(f"compare: llama.cpp {ftype}: batched prompt evaluation failed ({str(e)[-200:]}); its prefill "
                  f"is one token at a time from here on", file=sys.stderr)
            batch[0] = 1
            return run(prompt_tokens, new_tokens)
    return run


def _llamacpp_python(venv: str | None) -> str:
    """The interpreter with llama_cpp and gguf: --llamacpp-venv, else ~/.cache/edge-llm/peers/llamacpp, else ours."""
    candidates = [Path(venv) / "bin" / "python"] if venv else [CACHE / "llamacpp" / "bin" / "python",
                                                              Path(sys.executable)]
    probe = "import llama_cpp, gguf"
    for python in candidates:
        if python.exists() and subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0:
            return str(python)
    looked = ", ".join(map(str, candidates))
    raise PeerUnavailable(f"no environment with llama-cpp-python and gguf (looked in {looked}); "
                          f"make one with: python -m venv {CACHE / 'llamacpp'} && {CACHE / 'llamacpp'}/bin/pip install "
                          "llama-cpp-python gguf (llama-cpp-python compiles from source, ~26 minutes on 2 cores)")


def _key(hf_dir: Path) -> str:
    import hashlib

    config = (hf_dir / "config.json").read_bytes()
    return hashlib.sha256(str(hf_dir.resolve()).encode() + config).hexdigest()[:12]


def runners(hf_dir: str, peers: list[str], threads: int, genai_venv: str | None = None,
            llamacpp_venv: str | None = None) -> dict:
    """name -> run(prompt_tokens, new_tokens) for each peer that can run here; the others are reported."""
    makers = {"genai": lambda: genai_runner(Path(hf_dir), threads, genai_venv),
              "optimum": lambda: optimum_runner(Path(hf_dir), threads),
              "llamacpp": lambda: llamacpp_runner(Path(hf_dir), threads, llamacpp_venv),
              "llamacpp-q4_k_m": lambda: llamacpp_runner(Path(hf_dir), threads, llamacpp_venv, "q4_k_m")}
    ready = {}
    for name in peers:
        if name not in makers:
            raise ValueError(f"unknown peer {name!r}; choose from {', '.join(makers)}")
        try:
            ready[name] = makers[name]()
        except PeerUnavailable as e:
            print(f"compare: skipping {name}: {e}", file=sys.stderr)
    return ready


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="the edge-llm bundle to measure")
    parser.add_argument("hf_dir", help="the checkpoint the bundle was exported from; the peers are built from it")
    parser.add_argument("--peers", default="genai,optimum,llamacpp", help="which peers to run (%(default)s)")
    parser.add_argument("--also", action="append", default=[], metavar="LABEL=BUNDLE",
                        help="another edge-llm bundle to run in the same rounds (e.g. another export of the model)")
    parser.add_argument("--runs", type=int, default=5, help="alternated rounds (%(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads for every engine (0: their own)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--genai-venv", help="a virtual environment with onnxruntime-genai and transformers 5.x "
                                             "(created under ~/.cache/edge-llm/peers when missing)")
    parser.add_argument("--llamacpp-venv", help="a virtual environment with llama-cpp-python and gguf (default: "
                                                "~/.cache/edge-llm/peers/llamacpp, then this one; never built here)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    # as `edge bench` runs it: under glibc's huge-page tunable where the profile asks (edge.hugepages); the peers'
    # children get the environment the user started with
    hugepages.reexec(resolve("auto").profile.memory.huge_pages)
    engines = {"edge": edge_runner(args.bundle, args.threads)}
    for extra in args.also:
        label, _, bundle = extra.partition("=")
        engines[label] = edge_runner(bundle, args.threads)
    engines.update(runners(args.hf_dir, args.peers.split(",") if args.peers else [], args.threads, args.genai_venv,
                           args.llamacpp_venv))
    results = alternate(engines, args.prompt_tokens, args.new_tokens, args.runs)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
