"""Held-out loss of the base model and of each default adapter on every domain, plus one sample per endpoint.

    python -m adapters.eval                     # loraplex/adapters/<name>, writes benchmarks/results/adapter_eval.json
    python -m adapters.eval --adapters /tmp/trained --num-examples 16

Loss is the mean next-token NLL (nats) over the held-out examples' trained tokens: the response for the
chatbot, code and summarization domains (all chat), every token for ``general`` (installed packages'
descriptions as plain text, never trained on), which shows what each adapter costs outside its domain. It
reports and asserts nothing; the issue's bar is an adapter at least 15% below the base on its own domain.
It also rewrites the "Evaluation" section of each adapter's card.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peft import PeftModel
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from adapters import data
from adapters.make_random import SPECS
from adapters.train import ADAPTERS_DIR, collate, encode_all, load_base, token_nll

RESULTS = ADAPTERS_DIR.parent / "benchmarks" / "results" / "adapter_eval.json"
ROWS = ("base", *SPECS)
SAMPLE_DOMAIN = {"base": "chatbot", "chatbot": "chatbot", "code": "code", "summarization": "summarization"}


def mean_nll(model: PeftModel, encoded: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> float:
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        nll, n = token_nll(model, collate(encoded[start : start + batch_size], pad_id))
        total, count = total + nll.item(), count + n
    return total / count


def sample_prompt(example: data.Example, tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[int]]:
    """(prompt as shown, token ids): the user's message through the chat template."""
    messages = [{"role": "user", "content": example.prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return example.prompt, tokenizer(text, add_special_tokens=False)["input_ids"]


def sample_example(held_out: dict[str, list[data.Example]], endpoint: str) -> data.Example:
    return held_out[SAMPLE_DOMAIN[endpoint]][0]


def greedy(model: PeftModel, tokenizer: PreTrainedTokenizerBase, ids: list[int], max_new_tokens: int) -> str:
    output = model.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)


def evaluate(adapters_dir: Path, num_examples: int, seed: int, threads: int, max_new_tokens: int) -> dict:
    start = time.perf_counter()
    base, tokenizer = load_base(threads)
    model = PeftModel.from_pretrained(base, adapters_dir / "chatbot", adapter_name="chatbot")
    for name in SPECS:
        if name != "chatbot":
            model.load_adapter(adapters_dir / name, adapter_name=name)
    model.eval()
    held_out = {domain: data.build(domain, seed=seed)[1] for domain in data.DOMAINS}
    encoded = {d: encode_all(examples, tokenizer, 256, num_examples) for d, examples in held_out.items()}
    loss: dict[str, dict[str, float]] = {}
    samples = {}
    with torch.inference_mode():
        for row in tqdm(ROWS, desc="eval"):
            if row == "base":
                with model.disable_adapter():
                    loss[row] = {d: mean_nll(model, e, tokenizer.pad_token_id, 8) for d, e in encoded.items()}
                    shown, ids = sample_prompt(sample_example(held_out, row), tokenizer)
                    output = greedy(model, tokenizer, ids, max_new_tokens)
            else:
                model.set_adapter(row)
                loss[row] = {d: mean_nll(model, e, tokenizer.pad_token_id, 8) for d, e in encoded.items()}
                shown, ids = sample_prompt(sample_example(held_out, row), tokenizer)
                output = greedy(model, tokenizer, ids, max_new_tokens)
            samples[row] = {"domain": SAMPLE_DOMAIN[row], "prompt": shown, "output": output}
    reduction = {name: 100 * (1 - loss[name][name] / loss["base"][name]) for name in SPECS}
    return {
        "metric": "mean next-token NLL (nats) over the trained tokens of held-out examples",
        "seed": seed,
        "examples_per_domain": {d: len(e) for d, e in encoded.items()},
        "tokens_per_domain": {
            d: sum(sum(t != -100 for t in labels[1:]) for _, labels in e) for d, e in encoded.items()
        },
        "loss": loss,
        "own_domain_reduction_percent": reduction,
        "samples": samples,
        "greedy_new_tokens": max_new_tokens,
        "seconds": round(time.perf_counter() - start, 1),
    }


def markdown_table(results: dict) -> str:
    loss, reduction = results["loss"], results["own_domain_reduction_percent"]
    lines = [
        "| model | " + " | ".join(data.DOMAINS) + " |",
        "| --- |" + " ---: |" * len(data.DOMAINS),
    ]
    for row in ROWS:
        cells = []
        for domain in data.DOMAINS:
            cell = f"{loss[row][domain]:.3f}"
            if row == domain:
                cell = f"**{cell}** ({-reduction[row]:+.0f}%)"
            cells.append(cell)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_samples(results: dict) -> str:
    lines = []
    for endpoint, sample in results["samples"].items():
        prompt = sample["prompt"].strip().replace("\n", " ")
        prompt = prompt if len(prompt) <= 160 else prompt[:157] + "..."
        output = " ".join(sample["output"].split())
        lines.append(f"- **{endpoint}** ({sample['domain']} prompt `` {prompt} ``): {output}")
    return "\n".join(lines)


def update_cards(adapters_dir: Path, results: dict) -> None:
    """Replace each card's Evaluation section with this run's numbers."""
    for name in SPECS:
        card = adapters_dir / name / "README.md"
        if not card.is_file():
            continue
        head = card.read_text().split("## Evaluation")[0]
        loss, sample = results["loss"], results["samples"][name]
        cells = ", ".join(f"{d} {loss['base'][d]:.3f} -> {loss[name][d]:.3f}" for d in data.DOMAINS)
        section = (
            "## Evaluation\n\n"
            f"Held-out mean NLL, base -> this adapter (`python -m adapters.eval`): {cells}. On its own domain the "
            f"loss is {results['own_domain_reduction_percent'][name]:.1f}% lower than the base's.\n\n"
            f"Sample ({sample['domain']}, greedy): {' '.join(sample['output'].split())}\n"
        )
        card.write_text(head + section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=Path, default=ADAPTERS_DIR, help="folder holding <name>/ adapters")
    parser.add_argument("--num-examples", type=int, default=32, help="held-out examples per domain")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = evaluate(args.adapters, args.num_examples, args.seed, args.threads, args.max_new_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    update_cards(args.adapters, results)
    print(markdown_table(results))
    print()
    print(markdown_samples(results))


if __name__ == "__main__":
    main()
