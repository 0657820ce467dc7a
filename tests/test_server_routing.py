"""Which endpoint serves a request: listener, path prefix, model name. Proven by output: greedy tokens through
HTTP equal the engine's own offline greedy tokens for that endpoint, and the adapters change them."""

from __future__ import annotations

from pathlib import Path

import httpx
import ollama
import openai
import pytest
from test_server_harness import PROMPT, ServerProcess, shared_server, write_config

from loraplex.engine.core.config import load_config
from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.core.errors import ConfigError, UnknownEndpointError
from loraplex.engine.core.sequence import Request, SamplingParams
from loraplex.server.routing import SCOPE_KEY, EndpointRouter

MAX_TOKENS = 6
MESSAGES = [{"role": "user", "content": PROMPT}]
GREEDY = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": MAX_TOKENS}  # the engine's offline defaults


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> EndpointRouter:
    return EndpointRouter(load_config(write_config(tmp_path_factory.mktemp("cfg"), 11434, 11500)))


def test_names_aliases_and_tags(router: EndpointRouter) -> None:
    assert router.endpoint_of_name("chatbot") == "chatbot"
    assert router.endpoint_of_name("chatbot:latest") == "chatbot"
    assert router.endpoint_of_name("llama3") == "base"
    assert router.endpoint_of_name("smollm2:latest") == "base"
    assert router.endpoint_of_name("chatbot:7b") is None
    assert router.ports == [11434, 11500]


def test_prefix_and_listener(router: EndpointRouter) -> None:
    assert router.split_prefix("/chatbot/api/chat") == ("chatbot", "/api/chat")
    assert router.split_prefix("/llama3/v1/chat/completions") == ("base", "/v1/chat/completions")
    assert router.split_prefix("/api/chat") == (None, "/api/chat")
    assert router.split_prefix("/chatbot") == (None, "/chatbot")
    assert router.resolve({SCOPE_KEY: "code"}, "llama3") == "code"  # a fixed endpoint wins over the name
    assert router.resolve({}, "summarization:latest") == "summarization"
    with pytest.raises(UnknownEndpointError, match="use one of: base, chatbot, code, summarization"):
        router.resolve({}, "mistral")


def test_main_port_cannot_be_an_endpoint_port(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the main port"):
        EndpointRouter(load_config(write_config(tmp_path, 11500, 11500)))


@pytest.fixture(scope="module")
def offline() -> dict[str, str]:
    """The engine's own greedy text for the prompt, per endpoint, run in this process without HTTP."""
    server = shared_server()
    config = load_config(next(Path(server.folder.name).glob("*.toml")))
    engine = LLMEngine(config)
    prompt = engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = engine.encode_prompt(prompt)
    names = ["base", "chatbot", "code"]
    requests = [Request(n, n, list(ids), SamplingParams(max_tokens=MAX_TOKENS, temperature=0)) for n in names]
    results = engine.generate(requests)
    return {n: "".join(o.text_delta for o in results[n]) for n in names}


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    return shared_server()


def _ollama_chat(url: str, model: str) -> str:
    return ollama.Client(host=url).chat(model=model, messages=MESSAGES, options=GREEDY).message.content


def test_adapters_change_the_output(offline: dict[str, str]) -> None:
    assert offline["chatbot"] != offline["base"] and offline["code"] != offline["base"]


def test_model_name_on_main_listener(server: ServerProcess, offline: dict[str, str]) -> None:
    assert _ollama_chat(server.url, "chatbot") == offline["chatbot"]
    assert _ollama_chat(server.url, "chatbot:latest") == offline["chatbot"]
    assert _ollama_chat(server.url, "llama3") == offline["base"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    reply = client.chat.completions.create(model="code", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == offline["code"]


def test_endpoint_listener_serves_any_model_name(server: ServerProcess, offline: dict[str, str]) -> None:
    assert _ollama_chat(server.chatbot_url, "llama3") == offline["chatbot"]
    client = openai.OpenAI(base_url=f"{server.chatbot_url}/v1", api_key="x")
    reply = client.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == offline["chatbot"]
    tags = httpx.get(f"{server.chatbot_url}/api/tags").json()["models"]
    assert [t["model"] for t in tags] == ["chatbot:latest"]


def test_path_prefix(server: ServerProcess, offline: dict[str, str]) -> None:
    assert _ollama_chat(f"{server.url}/chatbot", "llama3") == offline["chatbot"]
    client = openai.OpenAI(base_url=f"{server.url}/code/v1", api_key="x")
    reply = client.chat.completions.create(model="llama3", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == offline["code"]
    assert [m["id"] for m in httpx.get(f"{server.url}/code/v1/models").json()["data"]] == ["code"]
