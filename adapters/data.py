"""Training and held-out data for the default adapters, built offline from what every Python install has.

    code           a stdlib function's signature and docstring, asked for in chat -> its source (docstring removed)
    summarization  a stdlib function's or class's source (docstring removed) -> the first line of its docstring
    chatbot        "What does `json.dumps` do?" -> the first paragraph of its docstring, phrased as an answer
    general        installed packages' long descriptions as plain text (held out only: never trained on)

Everything is parsed with ``ast`` (no stdlib module is imported) and ordered by a seeded shuffle, so the same
seed gives the same examples on any machine with the same Python version. The split is by top-level stdlib
module: a seeded hash sends about one module in ten to the held-out side, for every domain at once, so no
held-out module is ever trained on in any domain.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DOMAINS = ("chatbot", "code", "summarization", "general")
HELD_OUT_PERCENT = 10
# Big generated tables, tests and GUI code: little to learn, much to skew.
SKIP_PARTS = {
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "site-packages",
    "ensurepip",
    "pydoc_data",
}
GENERAL_CHARS = 700  # ~190 tokens of prose per general example
SOURCE_CHARS = 700  # summarization prompt: the head of a function's source; code: the longest answer
QUESTIONS = (
    "What does the Python {kind} `{qual}` do?",
    "Can you explain `{qual}` from the Python standard library?",
    "I'm reading some Python code that uses `{qual}`. What is it for?",
    "Briefly, what is `{qual}` in Python?",
)
MODULE_QUESTIONS = (
    "What is the Python module `{qual}` for?",
    "What does the standard-library module `{qual}` provide?",
)
CODE_PROMPT = "Write the Python function `{signature}` from the `{module}` module.\n\n{doc}"
SUMMARY_PROMPT = "Summarize what this Python {kind} does in one line.\n\n```python\n{source}\n```"


@dataclass(frozen=True)
class Example:
    """One training or evaluation example. ``prompt`` is empty for plain-text domains (loss on every token)."""

    prompt: str
    response: str
    module: str  # the top-level stdlib module (or package name) it came from: the unit of the split


def is_held_out(module: str, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(top-level module, path) for every stdlib source file worth learning from, sorted."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_PARTS & set(rel.parts) or rel.name.startswith("test_") or rel.parts[0].startswith(("_", "config-")):
            continue
        files.append((rel.parts[0].removesuffix(".py"), path))
    return files


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def code_examples(files: list[tuple[str, Path]]) -> list[Example]:
    """Requests to implement a function: a public function's signature and docstring -> its source.

    The answer is the function without its docstring, in a fenced Python block, as a code assistant replies.
    """
    examples = []
    for module, path, text, tree in _parsed(files):
        for node in _documented_nodes(tree):
            if not isinstance(node, ast.FunctionDef):
                continue
            source = _without_docstring(node, text)
            if len(source) > SOURCE_CHARS or source.count("\n") < 3:
                continue
            doc = _first_paragraph(ast.get_docstring(node))  # type: ignore[arg-type]
            if not 15 <= len(doc) <= 400:
                continue
            signature = f"def {node.name}({ast.unparse(node.args)})"
            prompt = CODE_PROMPT.format(module=_module_name(path), signature=signature, doc=doc)
            examples.append(Example(prompt, f"```python\n{source}\n```", module))
    return examples


def _documented_nodes(tree: ast.Module) -> list[ast.FunctionDef | ast.ClassDef]:
    """Public top-level functions and classes, and public methods of those classes, that have a docstring."""
    nodes: list[ast.FunctionDef | ast.ClassDef] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
            nodes.append(node)
            if isinstance(node, ast.ClassDef):
                nodes += [m for m in node.body if isinstance(m, ast.FunctionDef) and not m.name.startswith("_")]
    return [n for n in nodes if ast.get_docstring(n)]


def _without_docstring(node: ast.FunctionDef | ast.ClassDef, text: str) -> str:
    """The node's source with its docstring lines cut out, dedented to column 0."""
    lines = text.splitlines()[node.lineno - 1 : node.end_lineno]
    doc = node.body[0]
    start, end = doc.lineno - node.lineno, doc.end_lineno - node.lineno  # type: ignore[operator]
    kept = lines[:start] + lines[end + 1 :]
    indent = len(kept[0]) - len(kept[0].lstrip())
    return "\n".join(line[indent:] for line in kept)


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def summarization_examples(files: list[tuple[str, Path]]) -> list[Example]:
    examples = []
    for module, _, text, tree in _parsed(files):
        for node in _documented_nodes(tree):
            summary = ast.get_docstring(node).strip().splitlines()[0].strip()  # type: ignore[union-attr]
            if not 15 <= len(summary) <= 120 or not summary.endswith("."):  # a whole sentence on one line
                continue
            source = _without_docstring(node, text)
            if len(source) > SOURCE_CHARS:
                source = source[:SOURCE_CHARS].rsplit("\n", 1)[0] + "\n    ..."
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            examples.append(Example(SUMMARY_PROMPT.format(kind=kind, source=source), summary, module))
    return examples


def chatbot_examples(files: list[tuple[str, Path]], seed: int) -> list[Example]:
    rng = random.Random(seed)
    examples = []
    for module, path, _, tree in _parsed(files):
        qual_module = _module_name(path)
        doc = ast.get_docstring(tree)
        if doc and 40 <= len(_first_paragraph(doc)) <= 600 and path.name != "__main__.py":
            question = rng.choice(MODULE_QUESTIONS).format(qual=qual_module)
            answer = f"The `{qual_module}` module: {_first_paragraph(doc)}"
            examples.append(Example(question, answer, module))
        for node in _documented_nodes(tree):
            paragraph = _first_paragraph(ast.get_docstring(node))  # type: ignore[arg-type]
            if not 40 <= len(paragraph) <= 600:
                continue
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            qual = f"{qual_module}.{node.name}"
            question = rng.choice(QUESTIONS).format(kind=kind, qual=qual)
            signature = f"{node.name}({ast.unparse(node.args)})" if isinstance(node, ast.FunctionDef) else node.name
            if len(signature) > 80:
                signature = f"{node.name}(...)"
            answer = f"`{signature}` is a {kind} in the `{qual_module}` module. {paragraph}"
            examples.append(Example(question, answer, module))
    return examples


def general_examples(limit: int = 200) -> list[Example]:
    """Installed packages' long descriptions (README text), for checking adapters against general prose."""
    examples = []
    seen = set()
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: d.metadata["Name"] or ""):
        name = dist.metadata["Name"]
        description = dist.metadata.get_payload() or dist.metadata["Description"] or ""  # type: ignore[attr-defined]
        if not name or name.lower() in seen or len(description) < 400:
            continue
        seen.add(name.lower())
        examples.append(Example("", description.strip()[:GENERAL_CHARS], name.lower()))
    return examples[:limit]


def _module_name(path: Path) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = list(path.relative_to(root).with_suffix("").parts) if path.is_relative_to(root) else [path.stem]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def _parse(path: Path) -> tuple[str, ast.Module] | None:
    """Cached: chatbot and summarization parse the same files (callers must not mutate the tree)."""
    text = _read(path)
    if not text:
        return None
    try:
        return text, ast.parse(text)
    except SyntaxError:
        return None


def _parsed(files: list[tuple[str, Path]]) -> Iterator[tuple[str, Path, str, ast.Module]]:
    for module, path in files:
        if (parsed := _parse(path)) is not None:
            yield module, path, *parsed


def build(
    domain: str, seed: int = 0, files: list[tuple[str, Path]] | None = None
) -> tuple[list[Example], list[Example]]:
    """(train, held_out) for a domain, each in a seeded shuffled order. ``general`` has no train side."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {', '.join(DOMAINS)}")
    if domain == "general":
        examples = general_examples()
        random.Random(seed).shuffle(examples)
        return [], examples
    files = stdlib_files() if files is None else files
    if domain == "code":
        examples = code_examples(files)
    elif domain == "summarization":
        examples = summarization_examples(files)
    else:
        examples = chatbot_examples(files, seed)
    random.Random(seed).shuffle(examples)
    train = [e for e in examples if not is_held_out(e.module, seed)]
    held_out = [e for e in examples if is_held_out(e.module, seed)]
    return train, held_out
