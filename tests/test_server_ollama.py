"""The Ollama API through the real ``ollama`` client and raw HTTP, against a real server process."""

from __future__ import annotations

import json
import math

import httpx
import ollama
import pytest
from test_server_harness import PROMPT, ServerProcess, shared_server

GREEDY = {"temperature": 0, "num_predict": 4}


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    return shared_server()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> ollama.Client:
    return ollama.Client(host=server.url)


def check_final(response: ollama.GenerateResponse | ollama.ChatResponse, num_predict: int) -> None:
    """Counts and durations as Ollama reports them: nanoseconds, measured, consistent with each other."""
    assert response.done and response.done_reason == "length"
    assert response.eval_count == num_predict
    assert response.prompt_eval_count > 10  # the chat template adds a system turn
    assert response.prompt_eval_duration > 0 and response.eval_duration > 0
    assert response.load_duration >= 0
    parts = response.load_duration + response.prompt_eval_duration + response.eval_duration
    assert abs(response.total_duration - parts) < 1_000_000  # within 1 ms: the same timestamps
    assert response.created_at.endswith("Z")


def test_generate_non_streaming(client: ollama.Client) -> None:
    response = client.generate(model="chatbot", prompt=PROMPT, options=GREEDY)
    assert response.model == "chatbot" and response.response
    check_final(response, 4)
    assert len(response.context) == response.prompt_eval_count + response.eval_count


def test_generate_streaming(client: ollama.Client) -> None:
    chunks = list(client.generate(model="base", prompt=PROMPT, options=GREEDY, stream=True))
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].done
    check_final(chunks[-1], 4)
    whole = client.generate(model="base", prompt=PROMPT, options=GREEDY)
    assert "".join(c.response for c in chunks) == whole.response


def test_stream_is_ndjson_by_default(server: ServerProcess) -> None:
    body = {"model": "base", "prompt": PROMPT, "options": GREEDY}
    with httpx.stream("POST", f"{server.url}/api/generate", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 4


def test_chat_streaming_and_not(client: ollama.Client) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": PROMPT}]
    whole = client.chat(model="code", messages=messages, options=GREEDY)
    assert whole.message.role == "assistant" and whole.message.content
    check_final(whole, 4)
    chunks = list(client.chat(model="code", messages=messages, options=GREEDY, stream=True))
    assert "".join(c.message.content for c in chunks) == whole.message.content
    check_final(chunks[-1], 4)


def test_options_are_honoured(client: ollama.Client) -> None:
    """num_predict bounds the output; a stop string cuts it; the same seed gives the same sample."""
    sampled = {"temperature": 1.0, "seed": 7, "num_predict": 6, "top_k": 40, "top_p": 0.9}
    first = client.generate(model="chatbot", prompt=PROMPT, options=sampled).response
    again = client.generate(model="chatbot", prompt=PROMPT, options=sampled).response
    assert first == again
    greedy = client.generate(model="base", prompt=PROMPT, options={"temperature": 0, "num_predict": 8})
    word = greedy.response.split()[1]
    cut = client.generate(model="base", prompt=PROMPT, options={"temperature": 0, "num_predict": 8, "stop": [word]})
    assert cut.done_reason == "stop" and word not in cut.response
    assert greedy.response.startswith(cut.response)


def test_raw_system_and_template(client: ollama.Client) -> None:
    raw = client.generate(model="base", prompt="The capital of France is", raw=True, options=GREEDY)
    assert raw.prompt_eval_count == 5  # the prompt alone, no chat template
    templated = client.generate(
        model="base",
        prompt="The capital of France is",
        template="{{ if .System }}{{ .System }} {{ end }}{{ .Prompt }}{{ .Response }}",
        options=GREEDY,
    )
    assert templated.response == raw.response
    with_system = client.generate(model="base", prompt=PROMPT, system="Answer in French.", options=GREEDY)
    default = client.generate(model="base", prompt=PROMPT, options=GREEDY)
    assert with_system.prompt_eval_count != default.prompt_eval_count


def test_keep_alive_and_num_ctx_accepted(client: ollama.Client) -> None:
    response = client.generate(model="base", prompt=PROMPT, keep_alive="5m", options=GREEDY | {"num_ctx": 256})
    assert response.eval_count == 4
    with pytest.raises(ollama.ResponseError) as error:
        client.generate(model="base", prompt=PROMPT, options={"num_ctx": 8})
    assert error.value.status_code == 400 and "context holds 8" in error.value.error


def test_preload_and_unload_requests_answer_as_ollama_does(client: ollama.Client, server: ServerProcess) -> None:
    """`ollama run` preloads with an empty prompt (or no messages); keep_alive 0 with nothing to generate
    unloads. Both answer done at once, nothing generated and nothing queued."""
    loaded = client.generate(model="chatbot", prompt="")
    assert (loaded.done, loaded.done_reason, loaded.response) == (True, "load", "")
    chat = client.chat(model="code", messages=[])
    assert (chat.done, chat.done_reason, chat.message.content) == (True, "load", "")
    for keep_alive in (0, "0", "0s", "0m"):
        assert client.generate(model="base", keep_alive=keep_alive).done_reason == "unload", keep_alive
    assert client.chat(model="base", messages=[], keep_alive=0).done_reason == "unload"
    assert client.generate(model="base", prompt="", keep_alive="5m").done_reason == "load"
    streamed = list(client.generate(model="summarization", prompt="", stream=True))
    assert len(streamed) == 1 and streamed[0].done_reason == "load"
    with pytest.raises(ollama.ResponseError) as error:
        client.generate(model="nope", prompt="")
    assert error.value.status_code == 404
    assert client.generate(model="base", prompt=PROMPT, options=GREEDY).eval_count == 4, "the model still serves"


def test_pull_of_a_served_model_succeeds_and_of_another_is_a_404(client: ollama.Client) -> None:
    assert client.pull("chatbot").status == "success"
    assert [p.status for p in client.pull("llama3", stream=True)] == ["pulling manifest", "success"]
    with pytest.raises(ollama.ResponseError) as error:
        client.pull("mistral:7b")
    assert error.value.status_code == 404 and "not served here" in error.value.error


def test_tags_ps_show_version(client: ollama.Client, server: ServerProcess) -> None:
    names = [m.model for m in client.list().models]
    assert names == ["base:latest", "chatbot:latest", "code:latest", "summarization:latest"]
    client.generate(model="chatbot", prompt=PROMPT, options={"num_predict": 1})
    running = client.ps().models  # the base, and the adapters resident in LoRA slots
    assert {"base:latest", "chatbot:latest"} <= {m.model for m in running} <= set(names)
    assert all(m.context_length == 512 for m in running)
    shown = client.show("chatbot:latest")
    assert shown.details.family == "llama" and shown.details.parameter_size.endswith("M")
    assert shown.details.quantization_level == "F32" and shown.details.parent_model
    assert shown.modelinfo["adapter.rank"] == 16 and "q_proj" in shown.modelinfo["adapter.target_modules"]
    assert "<|im_start|>" in shown.template and "ADAPTER" in shown.modelfile
    assert client.show("llama3").modelinfo.get("adapter.rank") is None
    version = httpx.get(f"{server.url}/api/version").json()
    assert version["version"]


def test_embed_and_legacy_embeddings(client: ollama.Client) -> None:
    response = client.embed(model="base", input=["The cat sat on the mat.", "A cat was sitting on a mat."])
    assert len(response.embeddings) == 2 and response.prompt_eval_count > 0
    for vector in response.embeddings:
        assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-4)
    single = client.embed(model="base", input="The cat sat on the mat.").embeddings[0]
    assert max(abs(a - b) for a, b in zip(single, response.embeddings[0], strict=True)) < 1e-4
    legacy = client.embeddings(model="chatbot", prompt="The cat sat on the mat.").embedding
    assert len(legacy) == len(single) and legacy != single  # the adapter changes the hidden states


def test_embeddings_while_generating_change_nothing(client: ollama.Client, server: ServerProcess) -> None:
    """Embedding forwards interleave with engine steps (other adapters, same model) without disturbing them."""
    options = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 8}
    alone = client.generate(model="chatbot", prompt=PROMPT, options=options).response
    embedded = []
    body = {"model": "chatbot", "prompt": PROMPT, "options": options}
    with httpx.stream("POST", f"{server.url}/api/generate", json=body, timeout=60) as response:
        parts = []
        for line in response.iter_lines():
            parts.append(json.loads(line)["response"])
            if len(embedded) < 3:
                embedded.append(client.embed(model="code", input="The cat sat on the mat.").embeddings[0])
    assert "".join(parts) == alone
    for vector in embedded[1:]:
        assert max(abs(a - b) for a, b in zip(vector, embedded[0], strict=True)) < 1e-5
