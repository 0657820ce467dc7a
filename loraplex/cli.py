"""The ``loraplex`` command: ``serve`` runs the HTTP server, ``generate`` runs one offline batch."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from loraplex.engine.core.config import load_config
from loraplex.engine.core.errors import LoraplexError


def generate(args: argparse.Namespace) -> None:
    """One prompt on every endpoint, all in the same batch: the quickest proof that the engine works."""
    from loraplex.engine.core.engine import LLMEngine
    from loraplex.engine.core.sequence import Request, SamplingParams

    config = load_config(args.config)
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

    run_server(args.config, host=args.host, port=args.port)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the Ollama- and OpenAI-compatible HTTP server")
    p.add_argument("--config", help="TOML config (default: the shipped one)")
    p.add_argument("--host", help="override server.host")
    p.add_argument("--port", type=int, help="override server.port")
    p.set_defaults(func=serve)
    g = sub.add_parser("generate", help="run one prompt on every endpoint in one batch, offline")
    g.add_argument("--config", help="TOML config (default: the shipped one)")
    g.add_argument("--prompt", default="Explain in two sentences what a LoRA adapter is.")
    g.add_argument("--max-tokens", type=int, default=64)
    g.set_defaults(func=generate)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except LoraplexError as e:
        sys.exit(f"loraplex: {e}")


if __name__ == "__main__":
    main()
