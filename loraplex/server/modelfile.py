"""Reading an Ollama Modelfile into its instructions, with Ollama's quoting: one place for ``/api/create`` and
``loraplex migrate``, which differ only in which instructions they take."""

from __future__ import annotations

from collections.abc import Iterator

INSTRUCTIONS = ("FROM", "ADAPTER", "SYSTEM", "PARAMETER", "TEMPLATE", "MESSAGE", "LICENSE", "REQUIRES")


def instructions(text: str) -> Iterator[tuple[int, str, str]]:
    """(line number, INSTRUCTION in upper case, argument unquoted) per instruction; comments and blank lines
    skipped. A ``\"\"\"...\"\"\"`` argument may span lines."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        number, line = i + 1, lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        instruction, _, argument = line.partition(" ")
        argument = argument.strip()
        if argument.count('"""') == 1:  # a multi-line string: read to its end
            while i < len(lines) and '"""' not in lines[i]:
                argument += "\n" + lines[i]
                i += 1
            if i < len(lines):
                argument += "\n" + lines[i]
                i += 1
        yield number, instruction.upper(), unquote(argument)


def unquote(value: str) -> str:
    for quote in ('"""', '"'):
        if len(value) >= 2 * len(quote) and value.startswith(quote) and value.endswith(quote):
            return value[len(quote) : -len(quote)]
    return value
