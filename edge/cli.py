"""`edge`: one command for both sides. run/chat/verify use the runtime; export imports the exporter lazily."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge.presets import CHOICES, PRESETS

SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop")


MODEL_COMMANDS = {"run", "chat", "serve", "bench", "eval"}  # the ones that load weights (bench: in its child processes)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if argv is None and args.command in MODEL_COMMANDS:  # the command line itself, not a caller in-process
            _huge_pages_if_profile_wants(args.profile)
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as e:
        if e.name != "onnxruntime":
            raise
        print(f"edge: error: {_no_onnxruntime(getattr(args, 'root', '/'))}", file=sys.stderr)
        return 1
    except Exception as e:  # errors a user can act on: one line, no traceback
        if not _is_user_error(e):
            raise
        print(f"edge: error: {e}", file=sys.stderr)
        return 1


def _no_onnxruntime(root: str) -> str:
    """Why onnxruntime cannot be imported, where the device says (a 32-bit userland), else how to install it."""
    from edge.devices.detect import read_device, unsupported_userland

    return unsupported_userland(read_device(root)) or ("onnxruntime is not installed: pip install onnxruntime (or, "
                                                       "on a Jetson, NVIDIA's onnxruntime-gpu wheel)")


def _huge_pages_if_profile_wants(profile: str) -> None:
    """Before onnxruntime allocates the weights, re-execute under glibc's huge-page tunable where the profile asks
    for it (see edge.hugepages); child processes inherit it."""
    from edge import hugepages

    hugepages.reexec(_profile(profile).memory.huge_pages)


def _profile(spec: str):
    """The device profile a command will run under (detected for "auto"), before any model is loaded."""
    import onnxruntime as ort

    from edge.devices import resolve

    return resolve(spec, available=tuple(ort.get_available_providers())).profile


def _is_user_error(e: Exception) -> bool:
    from edge import BundleError
    from edge.memory import MemoryBudgetError

    # ValueError covers ContextError, ChatTemplateError, ProfileError, ExportError and bad parameters.
    return isinstance(e, (BundleError, MemoryBudgetError, FileExistsError, ValueError))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge", description="Run small LLMs on small boards.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate a continuation of a prompt (read from stdin when omitted)")
    _add_bundle(run)
    run.add_argument("prompt", nargs="?", help="the prompt; stdin when omitted")
    _add_sampling(run)
    shape = run.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE", help="the output is JSON that follows the schema in FILE")
    shape.add_argument("--grammar", metavar="FILE", help="the output follows the GBNF (llama.cpp's) or Lark grammar "
                                                         "in FILE")
    shape.add_argument("--regex", metavar="R", help="the output matches the regular expression R")
    run.set_defaults(func=cmd_run)

    chat = sub.add_parser("chat", help="interactive multi-turn chat with the model's chat template")
    _add_bundle(chat)
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument("--overflow", choices=["refuse", "drop-oldest"], default="refuse",
                      help="when the conversation outgrows the context: refuse the turn (default, with the numbers) "
                           "or drop the oldest exchanges after the system prompt")
    _add_sampling(chat)
    chat.set_defaults(func=cmd_chat)

    verify = sub.add_parser("verify", help="re-hash every file of a bundle against its manifest")
    verify.add_argument("bundle", help="a bundle folder, or 'demo'")
    verify.set_defaults(func=cmd_verify)

    export = sub.add_parser("export", help="Hugging Face checkpoint folder -> bundle (needs edge-llm[export])")
    export.add_argument("src", help="a local Hugging Face checkpoint folder (or a hub id, with a network)")
    export.add_argument("-o", "--output", required=True, help="the bundle folder to write")
    export.add_argument("--quant", choices=CHOICES, metavar="{" + ",".join(CHOICES) + "}",
                        help="fp32, fp16, or a quantization preset: "
                             + "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values())
                             + " (default: the profile's, else int4)")
    export.add_argument("--block-size", type=int, help="weights per scale (default: the profile's, else 32)")
    export.add_argument("--profile", help="the device profile to export for: its quantization, recorded as the target")
    export.add_argument("--accuracy-level", type=int, choices=[0, 4], default=4,
                        help="int4/int8 compute: 4 (default) uses int8 activations where the CPU has the instructions and "
                             "fp32 where not; 0 computes in fp32 everywhere (slower; for comparisons)")
    export.add_argument("--graph", default="auto", choices=["auto", "fast", "optimum"],
                        help="fast: fused ops and shared KV buffers (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2/3); "
                             "optimum: the traced graph (every family); auto (default): fast where covered")
    export.add_argument("--force", action="store_true", help="replace an existing output folder")
    export.set_defaults(func=cmd_export)

    serve = sub.add_parser("serve", help="a local OpenAI-compatible HTTP endpoint (chat and completions)")
    serve.add_argument("bundle", nargs="?", default="demo", help="a bundle folder, or 'demo' (default)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--uds", help="listen on this Unix socket instead of TCP")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set EDGE_API_KEY)")
    serve.add_argument("--api-key-file", help="read the key from this file, so it is not in the process list")
    serve.add_argument("--profile", default="auto", help="device profile name or .toml path (default: auto)")
    serve.add_argument("--context", type=int, help="context length to plan for (default: the profile's)")
    serve.add_argument("--threads", type=int, help="onnxruntime's intra-op threads (default: the profile's)")
    serve.add_argument("--max-queue", type=int, default=8, help="requests that may wait while one generates (8)")
    _add_prefix_cache(serve)
    serve.add_argument("--prefix-cache-file", type=Path, metavar="FILE",
                       help="save the prefix cache here at shutdown and restore it at start (checked against the "
                            "bundle), so that the first request after a reboot is warm")
    serve.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get on SIGTERM (10)")
    serve.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (1 MB)")
    serve.add_argument("--model-name", help="the model id /v1/models reports (default: the bundle folder's name)")
    serve.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                       help="let browser pages from this origin call the API (e.g. http://localhost:3000, or '*'); "
                            "repeat for several; default: the profile's, else none")
    serve.set_defaults(func=cmd_serve)

    evaluate = sub.add_parser("eval", help="perplexity of a bundle on a text, and with --reference what it loses "
                                           "against another bundle of the same model (ratio, top-1 agreement, KL)")
    evaluate.add_argument("bundle", help="a bundle folder, or 'demo'")
    evaluate.add_argument("--text", required=True, help="a UTF-8 text file to score (teacher-forced)")
    evaluate.add_argument("--reference", help="a bundle of the same model to compare with, usually its fp32 export")
    evaluate.add_argument("--window", type=int, help="tokens scored from one fresh context (default: the context)")
    evaluate.add_argument("--profile", default="auto", help="device profile name or .toml path (default: auto)")
    evaluate.add_argument("--json", action="store_true", help="print the figures as JSON")
    evaluate.set_defaults(func=cmd_eval)

    bench = sub.add_parser("bench", help="speed and memory of a bundle, each run in a fresh process",
                           epilog="To run onnxruntime-genai, optimum and llama.cpp beside it, use "
                                  "benchmarks/compare.py from a checkout of edge-llm.")
    bench.add_argument("bundle", help="a bundle folder, or 'demo'")
    bench.add_argument("--prompt-tokens", type=int, default=128)
    bench.add_argument("--new-tokens", type=int, default=128)
    bench.add_argument("--runs", type=int, default=5)
    bench.add_argument("--threads", type=int, default=0, help="intra-op threads (default: the profile's)")
    bench.add_argument("--profile", default="auto")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.add_argument("--prefix-cache-set", metavar="FILE",
                       help="instead: time to first token through edge serve with and without the prefix cache, for "
                            "the system prompt and conversation in FILE (benchmarks/prefix_cache.json in a checkout)")
    bench.add_argument("--speculate-set", metavar="FILE",
                       help="instead: greedy decode speed with speculative decoding and without, for the grounded and "
                            "open-ended prompts in FILE (benchmarks/speculate.json in a checkout; --new-tokens each)")
    bench.add_argument("--profile-ops", action="store_true",
                       help="one decode step's time split by part (each MatMul role, attention, norms, onnxruntime "
                            "between nodes, host) against the bytes each part reads, and the share of this "
                            "machine's read bandwidth reached")
    bench.set_defaults(func=cmd_bench)

    devices = sub.add_parser("devices", help="list the device profiles, or show one")
    devices.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    devices.add_argument("name", nargs="?", help="the profile to show")
    devices.set_defaults(func=cmd_devices)

    doctor = sub.add_parser("doctor", help="what board this is, which profile and providers, and warnings")
    doctor.add_argument("--root", default="/", help="read the device files under DIR (an SD-card image, a sysroot)")
    doctor.add_argument("--bundle", help="also check this bundle: memory estimate, target, kernels")
    doctor.add_argument("--profile", default="auto", help="a profile name or .toml instead of detection")
    doctor.add_argument("--context", type=int, help="context length to plan for (default: the profile's)")
    doctor.set_defaults(func=cmd_doctor)

    pack = sub.add_parser("pack", help="one offline archive for a board: bundle, profile, wheels, install script")
    pack.add_argument("bundle", type=Path, help="the bundle folder to pack")
    pack.add_argument("--target", required=True, help="the board's profile (edge devices lists them)")
    pack.add_argument("-o", "--output", type=Path, required=True, help="the archive to write (.tar)")
    pack.add_argument("--python", help="the board's python3, major.minor (default: the profile's [system] python)")
    pack.add_argument("--glibc", help="the board's glibc (default: the profile's [system] glibc)")
    pack.add_argument("--wheels", type=Path, help="a folder of wheels already fetched for the target (else pip "
                                                  "fetches them now)")
    pack.add_argument("--runtime-wheel", type=Path, help="edge-llm's own wheel (default: built from this checkout)")
    pack.add_argument("--memory-mb", type=int, help="the board's RAM, to check the bundle fits (default: the "
                                                    "profile's budget)")
    pack.add_argument("--sign", type=Path, metavar="KEY", help="sign the archive with this ed25519 private key (PEM)")
    pack.add_argument("--onnxruntime-wheel", type=Path, metavar="FILE",
                      help="GPU profiles (Jetson): pack this onnxruntime-gpu wheel (NVIDIA's, for the board's "
                           "JetPack); without it the board's own onnxruntime is used")
    pack.add_argument("--bundle-only", action="store_true",
                      help="just the bundle (and profile, unit): `edge install` reuses the installed environment")
    pack.set_defaults(func=cmd_pack)

    svc = sub.add_parser("service", help="run a bundle as a systemd service from this environment (no pack)")
    svc.add_argument("action", choices=["install", "uninstall", "status"])
    svc.add_argument("bundle", nargs="?", help="install: the bundle folder to serve")
    svc.add_argument("--profile", default="auto", help="device profile name or .toml path (default: auto)")
    svc.add_argument("--host", default="127.0.0.1")
    svc.add_argument("--port", type=int, default=8080)
    svc.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"), help="where the unit goes")
    svc.add_argument("--no-start", action="store_true", help="install: enable, do not start")
    svc.set_defaults(func=cmd_service)

    from edge.install import add_arguments

    install = sub.add_parser("install", help="install a pack as a new version under a prefix, with no network")
    add_arguments(install)
    install.set_defaults(func=cmd_install)
    return p


def _add_bundle(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="a bundle folder, or 'demo' for the small story model that ships with edge-llm")
    p.add_argument("--profile", default="auto", help="device profile name or .toml path (default: auto)")
    p.add_argument("--context", type=int, help="context length to plan for (default: the profile's, capped by the model)")
    p.add_argument("--threads", type=int, help="onnxruntime's intra-op threads (default: the profile's)")
    _add_prefix_cache(p)
    p.add_argument("--speculate", choices=("on", "off"),
                   help="draft the next tokens from the prompt and verify several per pass: faster where answers "
                        "copy their input, the same output either way (default: off)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="say on stderr which profile, providers and int4 kernels run, and how fast it went")


def _add_prefix_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix-cache", type=_prefix_cache_mb, metavar="off|MB",
                   help="memory for the keys and values of recent prompts, reused by prompts that start the same way "
                        "(default: the profile's, where the model leaves room); off: prefill every prompt whole")


def _prefix_cache_mb(value: str) -> float:
    if value.lower() in ("off", "0"):
        return 0
    try:
        mb = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'off' or a size in MB, not {value!r}") from None
    if not mb > 0:
        raise argparse.ArgumentTypeError(f"'off' or a size in MB above 0, not {value!r}")
    return mb


def _add_sampling(p: argparse.ArgumentParser) -> None:
    # Each flag maps one-to-one onto a GenerationParams field; unset flags fall back to the bundle's defaults.
    p.add_argument("--max-tokens", type=int, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, help="0 is greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="a stop string; repeat for several")


def _sampling(args) -> dict:
    return {name: getattr(args, name) for name in SAMPLING}


def _constraint(args) -> dict:
    """edge run's --json-schema, --grammar (files) and --regex, as the engine takes them."""
    fields = {}
    for name in ("json_schema", "grammar"):
        if getattr(args, name, None):
            fields[name] = Path(getattr(args, name)).read_text(encoding="utf-8")
    if getattr(args, "regex", None):
        fields["regex"] = args.regex
    return fields


def _load(args):
    import time

    import edge

    started = time.perf_counter()
    profile = args.profile
    if getattr(args, "threads", None):
        profile = _profile(profile).with_threads(args.threads)
    engine = edge.load(args.bundle, profile=profile, context_length=args.context,
                       prefix_cache_mb=getattr(args, "prefix_cache", None),
                       speculate=None if getattr(args, "speculate", None) is None else args.speculate == "on")
    if getattr(args, "verbose", False):
        _describe_engine(engine, time.perf_counter() - started)
    return engine


def _describe_engine(engine, load_s: float) -> None:
    from edge.devices import read_device
    from edge.kernels import describe, kernel_path, method_of

    quant = engine.bundle.manifest.get("quantization", {})
    path = kernel_path(read_device(), method_of(quant), quant.get("accuracy_level", 0),
                       engine.decoder.providers[0])
    for line in (f"bundle: {engine.bundle.path} ({quant.get('method', '?')}, accuracy level "
                 f"{quant.get('accuracy_level', '-')}), loaded in {load_s:.2f} s",
                 f"profile: {engine.profile.name}; providers: {', '.join(engine.decoder.providers)}; "
                 f"context: {engine.context_length}",
                 f"kernels: {describe(path)}"):
        print(f"edge: {line}", file=sys.stderr)


def _print_stream(records) -> str:
    """Write each record's text as it comes; return the whole text."""
    parts = []
    for record in records:
        parts.append(record.text)
        sys.stdout.write(record.text)
        sys.stdout.flush()
    return "".join(parts)


def cmd_run(args) -> int:
    import time

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    engine = _load(args)
    started, stamps = time.perf_counter(), []
    records = engine.stream(prompt, logprobs=False, **_sampling(args), **_constraint(args))  # it prints text only
    _print_stream(_stamped(records, stamps))
    sys.stdout.write("\n")
    if args.verbose and stamps:
        decode = f", then {(len(stamps) - 1) / (stamps[-1] - stamps[0]):.1f} tokens/s" if len(stamps) > 1 else ""
        print(f"edge: {len(stamps)} tokens; first after {stamps[0] - started:.3f} s{decode}", file=sys.stderr)
    return 0


def _stamped(records, stamps: list[float]):
    """The records as they come, noting when each arrived."""
    import time

    for record in records:
        stamps.append(time.perf_counter())
        yield record


def cmd_chat(args) -> int:
    from edge import ChatTemplateError, ContextError

    engine = _load(args)
    if engine.chat_template is None:
        raise ChatTemplateError(f"{engine.bundle.path} has no chat template, so it cannot chat; use `edge run`")
    conversation = engine.conversation(system=args.system, overflow=args.overflow)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        try:  # the conversation keeps its token ids: each turn prefills only what is new
            _print_stream(conversation.say(line.rstrip("\n"), logprobs=False, **_sampling(args)))
        except (ContextError, ChatTemplateError) as e:  # the conversation goes on without this turn
            print(f"edge: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        if args.verbose and conversation.last is not None:
            print(f"edge: {len(conversation.ids)} tokens in the conversation, {conversation.last.cached_tokens} of "
                  f"this turn's prompt reused", file=sys.stderr)


def cmd_verify(args) -> int:
    from edge.bundle import open_bundle
    from edge.engine import resolve

    bundle = open_bundle(resolve(args.bundle), verify="all")
    print(f"{bundle.path}: {len(bundle.manifest['files'])} files verified (format {bundle.manifest['format_version']})")
    return 0


def cmd_export(args) -> int:
    try:
        from edge.export.pipeline import export
    except ImportError as e:
        print(f"edge: error: the exporter is not installed ({e}); pip install 'edge-llm[export]'", file=sys.stderr)
        return 1
    export(args.src, args.output, quant=args.quant, block_size=args.block_size, force=args.force, profile=args.profile,
           graph=args.graph, accuracy_level=args.accuracy_level)
    return 0


def cmd_serve(args) -> int:
    import os

    import uvicorn

    from edge.engine import resolve
    from edge.server import Server, ServerSettings, make_app

    key = args.api_key or os.environ.get("EDGE_API_KEY")
    if args.api_key_file:
        key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key and not args.uds:
        print(f"edge: warning: listening on {args.host} without an API key: anyone who can reach it can use it",
              file=sys.stderr)
    settings = ServerSettings(api_key=key or None, max_queue=args.max_queue, max_body=args.max_body,
                              model_name=args.model_name or resolve(args.bundle).resolve().name,
                              cors_origins=_cors_origins(args), prefix_cache_file=args.prefix_cache_file)
    if "*" in settings.cors_origins and not key:
        print("edge: warning: CORS origin '*' without an API key: any web page opened on this machine can use "
              "the model", file=sys.stderr)
    app = make_app(lambda: _load(args), settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, uds=args.uds, timeout_graceful_shutdown=args.grace,
                            log_level="info", access_log=False)
    Server(config).run()
    return 0


def _cors_origins(args) -> tuple[str, ...]:
    """--cors-origin flags, else the profile's [server] cors_origins; checked here, before the server starts."""
    from edge.cors import check_origins

    if args.cors_origin:
        return check_origins(args.cors_origin)
    profile = _profile(args.profile)
    try:
        return check_origins(profile.server.cors_origins)
    except ValueError as e:
        raise ValueError(f"{profile.source}: server.cors_origins: {e}") from None


def cmd_eval(args) -> int:
    import json

    import edge

    path = Path(args.text)
    if not path.is_file():
        raise ValueError(f"--text {path}: no such file")
    text = path.read_text(encoding="utf-8")
    engine = edge.load(args.bundle, profile=args.profile)
    reference = edge.load(args.reference, profile=args.profile) if args.reference else None
    figures = engine.evaluate(text, reference, window=args.window)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    lines = [f"{figures['text_tokens']} tokens scored: perplexity {figures['perplexity']:.4f}"]
    if reference is not None:
        lines += [f"reference perplexity {figures['perplexity_reference']:.4f}: ratio x{figures['perplexity_ratio']:.4f}",
                  f"top-1 agreement {figures['top1_agreement']:.2%}, mean KL {figures['mean_kl']:.5f}"]
    print("\n".join(lines))
    return 0


def cmd_bench(args) -> int:
    import json

    from edge.bench import alternate, edge_runner, table
    from edge.engine import resolve

    if args.profile_ops:
        from edge import budget

        figures = budget.measure(str(resolve(args.bundle)), args.profile, args.threads, args.prompt_tokens,
                                 args.new_tokens)
        print(json.dumps(figures, indent=2) if args.json else budget.table(figures))
        return 0
    if args.speculate_set:
        from edge.bench import speculation, speculation_table

        results = speculation(str(resolve(args.bundle)), args.speculate_set, args.runs, args.threads, args.profile,
                              args.new_tokens)
        print(json.dumps(results, indent=2) if args.json else speculation_table(results))
        return 0
    if args.prefix_cache_set:
        from edge.bench import prefix_cache, prefix_table

        results = prefix_cache(str(resolve(args.bundle)), args.prefix_cache_set, args.runs, args.threads, args.profile)
        print(json.dumps(results, indent=2) if args.json else prefix_table(results))
        return 0
    runners = {"edge": edge_runner(str(resolve(args.bundle)), args.threads, args.profile)}
    results = alternate(runners, args.prompt_tokens, args.new_tokens, args.runs)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


def cmd_devices(args) -> int:
    from edge.devices import all_profiles, load_profile

    if args.action == "show":
        if not args.name:
            raise ValueError("edge devices show NAME: name a profile (edge devices lists them)")
        print(Path(load_profile(args.name).source).read_text(encoding="utf-8"), end="")
        return 0
    for p in all_profiles():
        print(f"{p.name:18} {'/'.join(n.replace('ExecutionProvider', '') for n in p.provider_names):14} "
              f"{p.export.quant:5} {p.description}")
    return 0


def cmd_pack(args) -> int:
    from edge.pack import pack

    manifest = pack(args.bundle, args.target, args.output, args.python, args.glibc, args.wheels, args.runtime_wheel,
                    args.memory_mb, args.sign, args.bundle_only, args.onnxruntime_wheel)
    target = manifest["target"]
    print(f"edge pack: {args.output}: {len(manifest['members'])} members for {manifest['profile']} "
          f"({target['machine']}, Python {target['python']}, glibc {target['glibc']})"
          + (", signed" if args.sign else ""))
    return 0


def cmd_service(args) -> int:
    from edge import service

    if args.action == "install":
        if not args.bundle:
            raise ValueError("edge service install BUNDLE: name the bundle to serve")
        unit = service.install(Path(args.bundle), args.profile, args.host, args.port, args.unit_dir,
                               not args.no_start)
        print(f"edge service: {unit} installed and enabled" + ("" if args.no_start else " and started"))
    elif args.action == "uninstall":
        service.uninstall(args.unit_dir)
        print("edge service: stopped, disabled and removed")
    else:
        state, health = service.status(args.port)
        print(f"edge service: systemd says {state}; /health says {health}")
        return 0 if state == "active" and health == "ok" else 3
    return 0


def cmd_install(args) -> int:
    from edge.install import run

    return run(args)


def cmd_doctor(args) -> int:
    from edge.doctor import report

    lines, warnings = report(args.root, args.bundle, args.profile, args.context)
    print("\n".join(lines))
    for warning in warnings:
        print(f"warning: {warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
