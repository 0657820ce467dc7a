"""Any integer seed, through both APIs of a real server: never a 500, and equal seeds sample equal tokens.

Clients send arbitrary integers (Ollama's default seed is -1, others draw 64-bit unsigned ones). A seed is
reduced modulo 2**64, the generator's range, so 2**64 samples as 0 does; in the Ollama API -1 (and only -1)
means a random seed, as in Ollama itself.
"""

from __future__ import annotations

import httpx
import pytest
from test_server_harness import PROMPT, ServerProcess, shared_server

from loraplex.engine.core.errors import RequestError
from loraplex.engine.core.sequence import SamplingParams

SEEDS = [-1, -2, 0, 2**63, 2**64, 10**30]
SAMPLED = {"temperature": 1.0, "top_p": 1.0}
NUM_TOKENS = 8


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    return shared_server()


def ollama_sample(server: ServerProcess, seed: int) -> httpx.Response:
    options = {**SAMPLED, "seed": seed, "top_k": 0, "num_predict": NUM_TOKENS}
    body = {"model": "chatbot", "prompt": PROMPT, "stream": False, "options": options}
    return httpx.post(f"{server.url}/api/generate", json=body, timeout=120)


def openai_sample(server: ServerProcess, seed: int) -> httpx.Response:
    body = {"model": "chatbot", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": NUM_TOKENS}
    return httpx.post(f"{server.url}/v1/chat/completions", json={**body, **SAMPLED, "seed": seed}, timeout=120)


def text(response: httpx.Response) -> str:
    data = response.json()
    return data["response"] if "response" in data else data["choices"][0]["message"]["content"]


def answers(sample, server: ServerProcess, seed: int) -> list[str]:
    """Two answers with ``seed``; each request answers 200."""
    responses = [sample(server, seed) for _ in range(2)]
    for response in responses:
        assert response.status_code == 200, f"seed {seed}: {response.status_code} {response.text}"
    return [text(r) for r in responses]


@pytest.mark.parametrize("sample", [ollama_sample, openai_sample], ids=["ollama", "openai"])
def test_any_integer_seed_samples_reproducibly(server: ServerProcess, sample) -> None:
    results = {seed: answers(sample, server, seed) for seed in SEEDS}
    for seed, (first, again) in results.items():
        if not (sample is ollama_sample and seed == -1):  # Ollama's "random seed"
            assert first == again, f"seed {seed} sampled twice gave different answers"
    assert results[2**64] == results[0], "seeds are reduced modulo 2**64"
    assert len({results[seed][0] for seed in (0, 2**63, 10**30)}) > 1, "distinct seeds are not all one seed"


def test_a_seed_that_is_not_an_integer_is_refused_with_its_name(server: ServerProcess) -> None:
    for response in (ollama_sample(server, 1.5), openai_sample(server, "seven")):
        assert response.status_code == 400, response.text
        assert "seed" in response.text


def test_the_engine_refuses_a_seed_that_is_not_an_integer() -> None:
    with pytest.raises(RequestError, match="seed"):
        SamplingParams(seed=1.5)
