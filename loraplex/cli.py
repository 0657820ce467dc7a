"""The ``loraplex`` command: ``serve`` runs the HTTP server, ``generate`` runs one offline batch, ``prepare``
does a first start's one-off work ahead, ``migrate`` turns Ollama models into a config."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from loraplex import __version__
from loraplex.engine.core.config import (
    EndpointConfig,
    EngineConfig,
    LimitsConfig,
    ModelConfig,
    ServerConfig,
    load_config,
)
from loraplex.engine.core.errors import ConfigError, LoraplexError
from loraplex.engine.lora.gguf_adapter import is_gguf_file


def generate(args: argparse.Namespace) -> None:
    """One prompt on every endpoint, all in the same batch: the quickest proof that the engine works."""
    from loraplex.engine.core.engine import LLMEngine
    from loraplex.engine.core.sequence import Request, SamplingParams

    config = configure(args)
    engine = LLMEngine(config)
    messages = [{"role": "user", "content": args.prompt}]
    prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    token_ids = engine.encode_prompt(prompt)
    requests = [
        Request(f"{endpoint.name}-0", endpoint.name, list(token_ids), SamplingParams(max_tokens=args.max_tokens))
        for endpoint in config.endpoints
    ]
    start = time.perf_counter()
    results = engine.generate(requests)
    elapsed = time.perf_counter() - start
    for request in requests:
        outputs = results[request.request_id]
        text = "".join(o.text_delta for o in outputs).strip()
        print(f"--- {request.endpoint} ({outputs[-1].num_output_tokens} tokens, {outputs[-1].finish_reason.value})")
        print(text)
    total = sum(results[r.request_id][-1].num_output_tokens for r in requests)
    print(f"--- {len(requests)} endpoints in one batch: {total} tokens in {elapsed:.1f} s")


def serve(args: argparse.Namespace) -> None:
    from loraplex.server.app import run_server

    config = configure(args)
    if args.host:
        config.server.host = args.host
    if args.port:
        config.server.port = args.port
    run_server(config)


def prepare(args: argparse.Namespace) -> None:
    """What a first start would do once, done ahead (the README's set-up runs it): the GGUF model converted into
    the cache and the CPU kernels compiled, so ``serve`` is ready in seconds."""
    from loraplex.engine import kernels
    from loraplex.engine.model.loader import cache_root, resolve_model_dir

    config = configure(args)
    start = time.perf_counter()
    model_dir, name, _ = resolve_model_dir(config.model)
    print(f"model {name}: {model_dir}")
    built = kernels.build(config.model, cache_root(config.model))
    if built is not None:
        print("CPU kernels: " + ("ready" if built else "not built (the warning above says why); torch ops serve"))
    print(f"prepared in {time.perf_counter() - start:.0f} s")


def migrate(args: argparse.Namespace) -> None:
    """The old Ollama pods' models, from Ollama's models folder or their Modelfiles, as one loraplex config."""
    from loraplex import migrate as migration

    if bool(args.from_ollama) == bool(args.modelfile):
        raise ConfigError("give either --from-ollama DIR or --modelfile NAME=PATH ...")
    if args.from_ollama:
        sources = migration.read_ollama_models(Path(args.from_ollama).expanduser())
    else:
        sources = []
        for spec in args.modelfile:
            name, sep, path = spec.partition("=")
            if not sep or not name or not Path(path).is_file():
                raise ConfigError(f"--modelfile {spec!r}: write NAME=PATH to an existing Modelfile")
            sources.append(migration.read_modelfile(Path(path).expanduser().resolve(), name))
    out = Path(args.out)
    warnings = migration.write_config(sources, migration.parse_replicas(args.replicas), out)
    config = load_config(out)  # what was written loads: names, slots, paths
    print(f"wrote {out}: {', '.join(s.name for s in sources)} on one base")
    modelfiles = [Path(e.modelfile).name for e in config.endpoints if e.modelfile]
    if modelfiles:
        print(f"and beside it each endpoint's Modelfile (its old pod's settings): {', '.join(modelfiles)}")
    for warning in warnings:
        print(f"warning: {warning}")
    print(f"serve it with: loraplex serve --config {out}")


def configure(args: argparse.Namespace) -> EngineConfig:
    """The config file (default: the shipped one), then ``--model`` and ``--adapter`` on top, as ``vllm serve``
    takes a model and ``--lora-modules``. ``--model`` without ``--config`` serves that model's base alone (the
    shipped adapters belong to the shipped model); each ``--adapter NAME=PATH`` adds an endpoint NAME, or
    replaces the one of that name, with one guaranteed slot."""
    config = load_config(args.config)
    endpoints = list(config.endpoints)
    if args.model:
        path = Path(args.model).expanduser()
        if not path.exists():
            raise ConfigError(f"--model {args.model}: no such file or folder")
        config.model.path = str(path.resolve())
        if not args.config:
            endpoints = [EndpointConfig(name="base", aliases=[path.stem] if path.stem != "base" else [])]
    for spec in args.adapter:
        name, sep, adapter = spec.partition("=")
        if not sep or not name or not adapter:
            raise ConfigError(f"--adapter {spec!r}: write NAME=PATH, e.g. --adapter chatbot=./my-adapters/chatbot")
        where = Path(adapter).expanduser()
        if not (where.is_dir() or is_gguf_file(where)):
            raise ConfigError(f"--adapter {spec}: {adapter} is not a PEFT adapter folder or a GGUF LoRA file")
        endpoints = [e for e in endpoints if e.name != name]
        endpoints.append(EndpointConfig(name=name, adapter=str(where.resolve())))
    for spec in getattr(args, "modelfile", []):
        endpoints = [e for e in endpoints if e.name != spec.partition("=")[0]]
        endpoints.append(modelfile_endpoint(spec))
    return dataclasses.replace(config, endpoints=endpoints)  # validated again: names, slots


def modelfile_endpoint(spec: str) -> EndpointConfig:
    """``--modelfile NAME=PATH``: endpoint NAME with the Modelfile's ADAPTER (resolved against the Modelfile's
    folder; none: the base) and its SYSTEM, PARAMETER, TEMPLATE and MESSAGE lines as defaults."""
    from loraplex.server.modelfile import ModelfileError, parse_modelfile
    from loraplex.server.ollama_models import modelfile_adapter

    name, sep, path = spec.partition("=")
    modelfile = Path(path).expanduser()
    if not sep or not name or not modelfile.is_file():
        raise ConfigError(f"--modelfile {spec!r}: write NAME=PATH to an existing Modelfile")
    try:
        adapter = modelfile_adapter(modelfile, parse_modelfile(modelfile.read_text()))
    except ModelfileError as e:
        raise ConfigError(f"--modelfile {spec}: {e}") from e
    return EndpointConfig(name=name, adapter=str(adapter or ""), modelfile=str(modelfile.resolve()))


def settings_help() -> str:
    """Every [model], [limits] and [server] key with its default and the environment variable that sets it."""
    lines = ["settings (config file key = default; environment variable):"]
    for section, cls in (("model", ModelConfig), ("limits", LimitsConfig), ("server", ServerConfig)):
        defaults = cls()
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name} = {json.dumps(getattr(defaults, f.name))}"
            lines.append(f"  {key:<44} {f'LORAPLEX_{section}_{f.name}'.upper()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    parser.add_argument("--version", action="version", version=f"loraplex {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "serve",
        help="run the Ollama- and OpenAI-compatible HTTP server",
        description="Serve the base model and every adapter endpoint on Ollama's and OpenAI's APIs.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = sub.add_parser("generate", help="run one prompt on every endpoint in one batch, offline")
    r = sub.add_parser("prepare", help="convert the model and compile the CPU kernels now, not on the first start")
    for command in (p, g, r):
        command.add_argument("--config", help="TOML config (default: the shipped one)")
        command.add_argument("--model", help="base model: a Hugging Face folder or a .gguf file (replaces model.path)")
        command.add_argument(
            "--adapter",
            action="append",
            default=[],
            metavar="NAME=PATH",
            help="serve the LoRA adapter in PATH (a PEFT folder or a .gguf file) as endpoint NAME (repeatable)",
        )
    m = sub.add_parser("migrate", help="turn Ollama models or Modelfiles into one loraplex config")
    m.add_argument("--from-ollama", metavar="DIR", help="Ollama's models folder (manifests/ and blobs/)")
    m.add_argument("--modelfile", action="append", default=[], metavar="NAME=PATH", help="a Modelfile (repeatable)")
    m.add_argument("--replicas", action="append", default=[], metavar="NAME=N", help="old replica count = slots")
    m.add_argument(
        "--out",
        default="loraplex.toml",
        help="the config to write (default: loraplex.toml); each endpoint's Modelfile goes beside it",
    )
    m.set_defaults(func=migrate)
    p.add_argument(
        "--modelfile",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve an Ollama Modelfile as endpoint NAME: its ADAPTER on the base, its SYSTEM, PARAMETER, TEMPLATE "
        "and MESSAGE lines as the endpoint's defaults (repeatable)",
    )
    p.add_argument("--host", help="override server.host")
    p.add_argument("--port", type=int, help="override server.port")
    p.set_defaults(func=serve)
    g.add_argument("--prompt", default="Explain in two sentences what a LoRA adapter is.")
    g.add_argument("--max-tokens", type=int, default=64)
    g.set_defaults(func=generate)
    r.set_defaults(func=prepare)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except LoraplexError as e:
        sys.exit(f"loraplex: {e}")


if __name__ == "__main__":
    main()
