"""Tool calls without a model: reading tools, parsing calls out of text (whole and streamed), and the prompt a
chat with tools becomes, for a template that renders tools and for the default model's, which does not."""

from __future__ import annotations

import json

import pytest
from transformers import PreTrainedTokenizerBase

from loraplex.server.errors import APIError
from loraplex.server.tools import CallStream, conversation, read

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}


def hermes(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_hermes_calls_are_parsed_out_of_the_text() -> None:
    tools = read([WEATHER, ADD], "auto", "hermes")
    text = f"Let me check.\n{hermes('get_weather', {'city': 'Paris'})}\n{hermes('add', {'a': 1, 'b': 2})}"
    content, calls = tools.parse(text)
    assert content == "Let me check."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    assert len({c.id for c in calls}) == 2
    # arguments written as JSON text, and a last call cut off by the token limit before its closing tag
    cut = '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}'
    assert [(c.name, c.arguments) for c in tools.parse(cut)[1]] == [("add", {"a": 1})]
    for text in ["Just text.", "<tool_call>not json</tool_call>", hermes("unknown", {}), hermes("add", [1])]:
        assert tools.parse(text) == (text, [])


def test_llama3_json_calls_are_parsed_out_of_the_text() -> None:
    tools = read([WEATHER, ADD], "auto", "llama3_json")
    one = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert [(c.name, c.arguments) for c in tools.parse(one)[1]] == [("get_weather", {"city": "Oslo"})]
    two = f'<|python_tag|>{one}; {{"name": "add", "parameters": {{"a": 2}}}}'
    assert tools.parse(two)[0] == "" and [c.name for c in tools.parse(two)[1]] == ["get_weather", "add"]
    for text in ["The weather is fine.", '{"city": "Oslo"}', one + " and more text", '{"name": "nope"}']:
        assert tools.parse(text) == (text, [])


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_a_streamed_answer_sends_content_as_it_comes_and_calls_whole(parser: str) -> None:
    tools = read([WEATHER], "auto", parser)
    call = (
        hermes("get_weather", {"city": "Rome"})
        if parser == "hermes"
        else '{"name": "get_weather", "parameters": {"city": "Rome"}}'
    )
    lead = "Checking <tool> a < b: " if parser == "hermes" else ""
    stream = CallStream(tools)
    sent = "".join(stream.feed(char) for char in lead + call)
    assert sent == lead
    content, calls = stream.finish()
    assert content.strip() == "" and [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Rome"})]
    # text that only looked like the start of a call is all sent, at the latest when the answer ends
    stream = CallStream(tools)
    looks = "<tool_c is not a tag" if parser == "hermes" else "{ not a call }"
    sent = "".join(stream.feed(char) for char in looks)
    assert sent + stream.finish()[0] == looks and stream.finish()[1] == []


@pytest.mark.parametrize(
    ("tools", "choice", "field", "says"),
    [
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
            None,
            "tools[0]",
            "schema",
        ),
        ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], None, "tools[0]", "not a JSON schema"),
        ([{"type": "function", "function": {"name": "no spaces"}}], None, "tools[0]", "name"),
        ([{"type": "retrieval"}], None, "tools[0]", "invalid"),
        ([WEATHER, WEATHER], None, "tools", "same name"),
        ([WEATHER], {"type": "function", "function": {"name": "add"}}, "tool_choice", "'add'"),
        ([WEATHER], "any", "tool_choice", "invalid"),
        ([WEATHER], {"type": "function", "function": "get_weather"}, "tool_choice", "invalid"),
        ([], "required", "tool_choice", "needs tools"),
    ],
)
def test_bad_tools_are_refused_by_field(tools: list, choice, field: str, says: str) -> None:
    with pytest.raises(APIError) as refused:
        read(tools, choice, "hermes")
    assert refused.value.status == 400 and refused.value.param.startswith(field) and says in refused.value.message


def test_none_sends_no_tools_and_forced_choices_have_a_grammar() -> None:
    assert read([WEATHER], "none", "hermes") is None
    assert read([WEATHER], "auto", "hermes").guide() is None
    required = json.loads(read([WEATHER, ADD], "required", "hermes").guide().spec)
    assert (
        required["format"]["begin"] == "<tool_call>\n"
        and len(required["format"]["content"]["json_schema"]["anyOf"]) == 2
    )
    named = json.loads(
        read([WEATHER, ADD], {"type": "function", "function": {"name": "add"}}, "llama3_json").guide().spec
    )
    assert named["properties"]["name"] == {"const": "add"} and "parameters" in named["required"]


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call_1"},
]


def test_the_default_template_gets_tools_in_the_system_message(tokenizer: PreTrainedTokenizerBase) -> None:
    """SmolLM2's template ignores ``tools``: they go into the system message, calls and results as Hermes text."""
    messages, template_tools = conversation(
        tokenizer, [{"role": "system", "content": "Be brief."}, *HISTORY], read([WEATHER], None, "hermes")
    )
    assert template_tools is None
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps(WEATHER) in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": hermes("get_weather", {"city": "Paris"})}
    assert messages[3] == {"role": "user", "content": "<tool_response>\n18 C, sunny\n</tool_response>"}


def test_a_template_that_knows_tools_renders_them_itself(tokenizer: PreTrainedTokenizerBase) -> None:
    knowing = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    knowing.chat_template = (
        "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.role }}{% endfor %}"
    )
    tools = read([WEATHER], "auto", "llama3_json")
    messages, template_tools = conversation(knowing, HISTORY, tools)
    assert messages == HISTORY and template_tools == [WEATHER]
