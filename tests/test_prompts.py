"""Ollama's ``template`` field: the template is checked on its own, and the request's text goes in as data."""

from __future__ import annotations

import ollama
import pytest
from test_server_harness import ServerProcess, shared_server

from loraplex.engine.core.errors import RequestError
from loraplex.server.prompts import render_go_template

TEMPLATE = "{{ if .System }}<sys>{{ .System }}</sys>\n{{ end }}<user>{{ .Prompt }}</user>\n{{ .Response }}<end>"
# (system, prompt): text that looks like Go or Jinja template source, which the model must see as written
LOOKALIKES = [
    ("", "In Jinja, what does {{ x }} print, and {% for i in xs %}?"),
    ("Close every {{ with a }}.", "Why does `}}` end an action?"),
    ("{{ .Prompt }}", "{{ .System }}"),
    ("{{ range .Messages }}{{ end }}", "{{ if .System }}unclosed {{"),
    ("{%- raw %}", "{{ .Response }} and then {{- .Prompt -}}"),
]
UNSUPPORTED = [
    ("{{ range .Messages }}{{ .Content }}{{ end }}", "range .Messages"),
    ("{{ .Prompt }}{{ if .Prompt }}!{{ end }}", "if .Prompt"),
    ("<user>{{ .Prompt", "unclosed action"),
    ("{{ .Prompt }}{{ end }}", "{{ end }} without"),
    ("{{ if .System }}{{ .System }}{{ .Prompt }}", "without {{ end }}"),
]


def expected(system: str, prompt: str) -> str:
    """TEMPLATE written out by hand."""
    return (f"<sys>{system}</sys>\n" if system else "") + f"<user>{prompt}</user>\n"


@pytest.mark.parametrize(("system", "prompt"), LOOKALIKES)
def test_request_text_is_inserted_verbatim(system: str, prompt: str) -> None:
    assert render_go_template(TEMPLATE, system, prompt) == expected(system, prompt)


def test_if_system_and_go_whitespace_trims() -> None:
    template = "{{- if .System }}\n  [{{ .System }}]\n{{- end }}\n\n{{- .Prompt -}}\n  ->{{ .Response }} after"
    assert render_go_template(template, "S", " P ") == "\n  [S] P ->"
    assert render_go_template(template, "", "P") == "P->"
    assert render_go_template("{{.Prompt}}{{if .System}}{{.System}}{{end}}", "S", "P") == "PS"


def test_only_the_template_before_response_is_rendered() -> None:
    assert render_go_template("{{ .Prompt }}:{{ .Response }}{{ range .Messages }}", "", "P") == "P:"
    assert render_go_template("{{ if .System }}{{ .System }}:{{ .Response }}{{ end }}", "S", "P") == "S:"


@pytest.mark.parametrize(("template", "words"), UNSUPPORTED)
@pytest.mark.parametrize("prompt", ["plain", "{{ x }}"])
def test_unsupported_template_is_refused_whatever_the_prompt(template: str, words: str, prompt: str) -> None:
    with pytest.raises(RequestError, match="template") as error:
        render_go_template(template, "", prompt)
    assert words in str(error.value)


@pytest.fixture(scope="module")
def client() -> ollama.Client:
    server: ServerProcess = shared_server()
    return ollama.Client(host=server.url)


@pytest.mark.parametrize(("system", "prompt"), LOOKALIKES)
def test_templated_generate_shows_the_model_the_text_verbatim(client: ollama.Client, system: str, prompt: str) -> None:
    """The prompt's token ids (the head of ``context``) equal those of the hand-written text sent raw."""
    options = {"temperature": 0, "num_predict": 3}
    templated = client.generate(model="base", prompt=prompt, system=system, template=TEMPLATE, options=options)
    raw = client.generate(model="base", prompt=expected(system, prompt), raw=True, options=options)
    assert templated.context[: templated.prompt_eval_count] == raw.context[: raw.prompt_eval_count]
    assert templated.response == raw.response


def test_unsupported_template_is_a_400_that_names_the_action(client: ollama.Client) -> None:
    template, words = UNSUPPORTED[0]
    with pytest.raises(ollama.ResponseError) as error:
        client.generate(model="base", prompt="{{ x }}", template=template, options={"num_predict": 1})
    assert error.value.status_code == 400
    assert words in error.value.error and "raw=true" in error.value.error
