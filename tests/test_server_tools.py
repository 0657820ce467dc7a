"""Tool calls through the real clients (``openai``, ``ollama``, LangChain's ``ChatOpenAI`` and ``ChatOllama``)
against a real server process: a forced call (``required`` or a named function) always comes back as a call
whose arguments validate against the tool's parameters, streamed or not; ``auto`` with a question the default
model answers in words comes back as text; a conversation with earlier calls and results is rendered in the
documented format; bad tools are 400s that name the field while the server serves everyone else."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import ollama
import openai
import pytest
from langchain_ollama import ChatOllama
from langchain_openai import ChatOpenAI
from test_server_harness import ServerProcess, shared_server
from transformers import PreTrainedTokenizerBase

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 32},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    return shared_server()


def valid(name: str, arguments: dict) -> bool:
    jsonschema.validate(arguments, SCHEMAS[name])
    return True


@pytest.mark.parametrize("stream", [False, True])
def test_openai_required_and_named_choices_return_valid_calls(server: ServerProcess, stream: bool) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    for endpoint, choice, names in [
        ("chatbot", "required", {"get_weather", "add"}),
        ("code", {"type": "function", "function": {"name": "add"}}, {"add"}),
    ]:
        kwargs = dict(model=endpoint, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=64)
        if stream:
            chunks = list(client.chat.completions.create(**kwargs, stream=True))
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            calls = [call for d in deltas for call in d.tool_calls or []]
            content = "".join(d.content or "" for d in deltas)
            reason = chunks[-1].choices[0].finish_reason
        else:
            message = client.chat.completions.create(**kwargs).choices[0]
            calls, content, reason = message.message.tool_calls, message.message.content, message.finish_reason
        assert reason == "tool_calls" and not content, (calls, content)
        assert len(calls) == 1 and calls[0].id.startswith("call_") and calls[0].type == "function"
        assert calls[0].function.name in names
        assert valid(calls[0].function.name, json.loads(calls[0].function.arguments))


def test_auto_with_a_question_answered_in_words_returns_text(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    answer = client.chat.completions.create(
        model="chatbot",
        messages=[{"role": "user", "content": "Say hello to me."}],
        tools=TOOLS,
        tool_choice="auto",
        temperature=0,
        max_tokens=32,
    ).choices[0]
    assert answer.message.tool_calls is None and answer.message.content and answer.finish_reason != "tool_calls"


def test_a_conversation_with_calls_and_results_is_rendered_in_the_documented_format(
    server: ServerProcess, tokenizer: PreTrainedTokenizerBase
) -> None:
    """The default template ignores tools: the system message lists them, the earlier call is written as a
    ``<tool_call>`` and the result comes back as a user turn in ``<tool_response>`` tags."""
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    messages = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    answer = client.chat.completions.create(model="base", messages=messages, tools=[ADD], max_tokens=1)
    system = (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{json.dumps(ADD)}\n</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )
    expected = [
        {"role": "system", "content": system},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'},
        {"role": "user", "content": "<tool_response>\n5\n</tool_response>"},
    ]
    text = tokenizer.apply_chat_template(expected, add_generation_prompt=True, tokenize=False)
    assert answer.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_tools_return_message_tool_calls(server: ServerProcess, stream: bool) -> None:
    """Ollama's ``tools`` on /api/chat, with loraplex's ``tool_choice`` extension forcing the call (the default
    model does not call tools of its own accord): ``message.tool_calls`` with the arguments as an object."""
    body = {"model": "summarization", "messages": ASK, "tools": [WEATHER], "tool_choice": "required", "stream": stream}
    body["options"] = {"temperature": 0, "num_predict": 64}
    if stream:
        with httpx.stream("POST", f"{server.url}/api/chat", json=body, timeout=120) as response:
            lines = [json.loads(line) for line in response.iter_lines() if line]
        calls = [c for line in lines for c in line["message"].get("tool_calls", [])]
        assert lines[-1]["done"] and all(not line["message"]["content"] for line in lines)
    else:
        calls = httpx.post(f"{server.url}/api/chat", json=body, timeout=120).json()["message"]["tool_calls"]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
    assert valid("get_weather", calls[0]["function"]["arguments"])
    # the ollama client reads it, and sends the call and the result back in the next turn
    client = ollama.Client(host=server.url)
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": calls}]
    history.append({"role": "tool", "content": "18 degrees, sunny", "tool_name": "get_weather"})
    answer = client.chat(model="summarization", messages=history, tools=[WEATHER], options={"num_predict": 16})
    assert answer.done and answer.message.tool_calls is None


def test_langchain_bound_tools(server: ServerProcess) -> None:
    chat = ChatOpenAI(base_url=f"{server.url}/v1", api_key="x", model="code", temperature=0, max_tokens=64)
    message = chat.bind_tools([WEATHER], tool_choice="required").invoke("What is the weather in Oslo?")
    assert [call["name"] for call in message.tool_calls] == ["get_weather"]
    assert valid("get_weather", message.tool_calls[0]["args"])
    ollama_chat = ChatOllama(base_url=server.url, model="chatbot", temperature=0, num_predict=24)
    reply = ollama_chat.bind_tools([WEATHER]).invoke("Say hello to me.")
    assert reply.content and not reply.tool_calls


BAD = [
    (
        "/v1/chat/completions",
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
        "tools[0].function.parameters",
    ),
    (
        "/api/chat",
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
        "tools[0].function.parameters",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "5"}]}, "messages[0].tool_call_id"),
    (
        "/v1/chat/completions",
        {"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    (
        "/v1/chat/completions",
        {"tools": [ADD], "tool_choice": "required", "response_format": {"type": "json_object"}},
        "response_format",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "{"}}]}]},
        "messages[0].tool_calls",
    ),
]


def test_bad_tools_are_400s_naming_the_field_while_others_are_served(server: ServerProcess) -> None:
    client = ollama.Client(host=server.url)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.chat, model="code", messages=ASK, options={"num_predict": 32, "seed": 1})
        for path, fields, field in BAD:
            body = {"model": "chatbot", "messages": ASK, "stream": False} | fields
            response = httpx.post(server.url + path, json=body, timeout=60)
            assert response.status_code == 400, (fields, response.text)
            error = response.json()["error"]
            assert field in (error if isinstance(error, str) else f"{error['param']} {error['message']}"), error
        assert running.result(timeout=120).done
    assert server.metric("loraplex_kv_blocks_used") == 0
