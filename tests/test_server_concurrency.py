"""32 concurrent streams spread over the four endpoints all complete, and each greedy output equals the
engine's offline output for the same request."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
from test_server_harness import shared_server

from loraplex.engine.core.config import load_config
from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.core.sequence import Request, SamplingParams

ENDPOINTS = ["base", "chatbot", "code", "summarization"]
QUESTIONS = [
    "What is a list comprehension?",
    "Name a prime number above 50.",
    "Why do leaves change colour?",
    "Give me a word that rhymes with cat.",
    "How do I reverse a string in Python?",
    "What does HTTP stand for?",
    "Describe the sea in five words.",
    "What is 12 times 12?",
]
MAX_TOKENS = 8


def test_32_concurrent_streams_match_the_offline_engine() -> None:
    server = shared_server()
    cases = [(ENDPOINTS[i % 4], QUESTIONS[i % 8]) for i in range(32)]
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)

    async def stream(endpoint: str, question: str) -> str:
        chunks = await client.chat.completions.create(
            model=endpoint,
            messages=[{"role": "user", "content": question}],
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    async def all_streams() -> list[str]:
        return await asyncio.gather(*(stream(e, q) for e, q in cases))

    served = asyncio.run(all_streams())

    engine = LLMEngine(load_config(next(Path(server.folder.name).glob("*.toml"))))
    requests = []
    for i, (endpoint, question) in enumerate(cases):
        chat = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        requests.append(Request(f"r{i}", endpoint, engine.encode_prompt(chat), SamplingParams(max_tokens=MAX_TOKENS)))
    offline = engine.generate(requests)
    for i, text in enumerate(served):
        want = "".join(o.text_delta for o in offline[f"r{i}"])
        assert text == want, f"stream {i} ({cases[i][0]}): served {text!r}, offline {want!r}"
    assert server.metric("loraplex_num_requests_running") == 0
    assert server.metric("loraplex_kv_blocks_used") == 0
