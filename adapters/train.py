"""LoRA fine-tuning of the default base model on the CPU: one adapter per endpoint, from offline data.

    python -m adapters.train --adapter all              # the three default adapters into loraplex/adapters/<name>/
    python -m adapters.train --adapter code --steps 20 --out /tmp/adapters

Each adapter keeps the rank, alpha and targets of ``make_random.SPECS`` (the engine's tests rely on them).
Every example goes through the tokenizer's chat template and is trained on the response tokens only (plain
text, with no prompt, would be trained on every token). Weights are stored in float16 with an
``adapter_config.json`` that PEFT and ``loraplex.engine.lora.config.load_adapter`` both read, plus a short card.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapters import data
from adapters.make_random import SPECS

ADAPTERS_DIR = Path(__file__).resolve().parents[1] / "loraplex" / "adapters"  # shipped in the package
IGNORE = -100  # label of a token that carries no loss (prompt, padding)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 4
    lr: float = 2e-3
    warmup: int = 10
    max_len: int = 256  # tokens; longer chat examples are skipped, longer plain text is cut
    lora_dropout: float = 0.05
    seed: int = 0


# Sized for about ten minutes each on two shared CPU cores (see adapters/README.md for measured times).
DEFAULT_TRAIN = {
    "chatbot": TrainConfig(steps=60, batch_size=4, warmup=6),
    "code": TrainConfig(steps=80, batch_size=4, warmup=8),
    "summarization": TrainConfig(steps=50, batch_size=4, warmup=5),
}


def encode(
    example: data.Example, tokenizer: PreTrainedTokenizerBase, max_len: int
) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) with the prompt masked out, or None when a chat example does not fit ``max_len``."""
    if not example.prompt:
        ids = tokenizer(example.response, add_special_tokens=False)["input_ids"][:max_len]
        return ids, list(ids)
    messages = [{"role": "user", "content": example.prompt}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(response_ids) > max_len:
        return None
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids


def encode_all(
    examples: Iterable[data.Example], tokenizer: PreTrainedTokenizerBase, max_len: int, limit: int
) -> list[tuple[list[int], list[int]]]:
    """The first ``limit`` examples that fit, in order."""
    encoded = []
    for example in examples:
        if (pair := encode(example, tokenizer, max_len)) is not None:
            encoded.append(pair)
            if len(encoded) == limit:
                break
    return encoded


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padding is masked from attention and from the loss."""
    length = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), length), pad_id)  # [B, T]
    labels = torch.full((len(batch), length), IGNORE)  # [B, T]
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)  # [B, T]
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def token_nll(model: PreTrainedModel | PeftModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed next-token NLL over labelled tokens, their count).

    The LM head runs only where a label exists: on a 49k vocabulary that is most of the cost of a chat prompt.
    """
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    hidden = causal_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]  # [B, T-1]
    mask = targets != IGNORE
    logits = causal_lm.lm_head(hidden[:, :-1][mask])  # [N, V]
    return F.cross_entropy(logits.float(), targets[mask], reduction="sum"), int(mask.sum())


def lora_config(name: str, lora_dropout: float = 0.0) -> LoraConfig:
    spec = SPECS[name]
    return LoraConfig(
        r=spec["r"],
        lora_alpha=spec["lora_alpha"],
        target_modules=list(spec["targets"]),
        use_rslora=spec["use_rslora"],
        lora_dropout=lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    examples: list[data.Example],
    config: TrainConfig,
) -> tuple[PeftModel, list[float]]:
    """Wrap ``model`` with a fresh LoRA adapter of ``SPECS[name]`` and train it; returns it and the step losses."""
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(model, lora_config(name, config.lora_dropout))
    encoded = encode_all(examples, tokenizer, config.max_len, config.steps * config.batch_size)
    if not encoded:
        raise ValueError(f"no {name} example fits max_len {config.max_len}")
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    peft_model.train()
    losses = []
    progress = tqdm(range(config.steps), desc=f"train {name}")
    for step in progress:
        start = step * config.batch_size % len(encoded)
        batch = collate(encoded[start : start + config.batch_size], tokenizer.pad_token_id)
        total, count = token_nll(peft_model, batch)
        loss = total / max(count, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{loss.item():.3f}")
    peft_model.eval()
    return peft_model, losses


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def save_adapter(peft_model: PeftModel, name: str, out: Path, card: str = "") -> None:
    """Write float16 safetensors, a PEFT-readable config with the targets in SPECS order, and a card."""
    spec = SPECS[name]
    weights = get_peft_model_state_dict(peft_model)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().to(torch.float16).contiguous() for k, v in weights.items()},
        out / "adapter_model.safetensors",
        metadata={"format": "pt"},
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec["r"],
        "lora_alpha": spec["lora_alpha"],
        "target_modules": list(spec["targets"]),
        "lora_dropout": peft_model.peft_config["default"].lora_dropout,
        "bias": "none",
        "use_rslora": spec["use_rslora"],
        "use_dora": False,
        "modules_to_save": None,
        "base_model_name_or_path": "SmolLM2-135M-Instruct",
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if card:
        (out / "README.md").write_text(card)


DOMAIN_TEXT = {
    "chatbot": "questions about standard-library functions, classes and modules, answered from the first paragraph "
    "of their docstrings (signature + paragraph), through the chat template",
    "code": "a standard-library function's signature, module and docstring paragraph, asked for through the chat "
    "template, answered with the function's source (docstring removed) in a fenced Python block",
    "summarization": "a standard-library function's or class's source with its docstring removed, through the chat "
    "template, answered with the docstring's first line",
}


def model_card(name: str, config: TrainConfig, losses: list[float], seconds: float, num_train: int) -> str:
    spec = SPECS[name]
    scaling = "rsLoRA, alpha/sqrt(r)" if spec["use_rslora"] else "alpha/r"
    head, tail = sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:])
    return f"""# {name} adapter for SmolLM2-135M-Instruct

- **Data**: {DOMAIN_TEXT[name]}. Built by `adapters/data.py` (seed {config.seed}) from this Python's standard
  library; about one top-level module in ten is held out and never trained on ({num_train} training examples
  available, {config.steps * config.batch_size} seen).
- **Training**: {config.steps} steps, batch {config.batch_size}, max {config.max_len} tokens, AdamW lr {config.lr}
  (warm-up {config.warmup}, cosine to 10%), dropout {config.lora_dropout}, on the CPU in {seconds / 60:.1f} min.
  Training loss {head:.3f} (first 10 steps) -> {tail:.3f} (last 10).
- **LoRA**: r={spec["r"]}, lora_alpha={spec["lora_alpha"]} ({scaling}), targets {", ".join(spec["targets"])};
  weights stored in float16.
- **Rebuild**: `python -m adapters.train --adapter {name}`; evaluate with `python -m adapters.eval`.

## Evaluation

Run `python -m adapters.eval` to fill this in.
"""


def load_base(num_threads: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplex.engine.core.config import load_config
    from loraplex.engine.model.loader import resolve_model_dir

    torch.set_num_threads(num_threads)
    model_dir = resolve_model_dir(load_config().model)[0]
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(
        model_dir
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", choices=[*SPECS, "all"], default="all")
    parser.add_argument("--out", type=Path, default=ADAPTERS_DIR, help="adapters are written to OUT/<name>")
    parser.add_argument("--steps", type=int, help="override the per-adapter default")
    parser.add_argument("--lr", type=float, help="override the per-adapter default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads; on 2 cores shared with other work 1 was fastest"
    )
    args = parser.parse_args()
    for name in SPECS if args.adapter == "all" else [args.adapter]:
        config = DEFAULT_TRAIN[name]
        config = TrainConfig(
            **{**asdict(config), "seed": args.seed, "steps": args.steps or config.steps, "lr": args.lr or config.lr}
        )
        model, tokenizer = load_base(args.threads)
        train_examples, _ = data.build(name, seed=config.seed)
        start = time.perf_counter()
        peft_model, losses = train(model, tokenizer, name, train_examples, config)
        seconds = time.perf_counter() - start
        card = model_card(name, config, losses, seconds, len(train_examples))
        save_adapter(peft_model, name, args.out / name, card)
        print(f"{name}: {config.steps} steps in {seconds / 60:.1f} min, loss {losses[0]:.3f} -> {losses[-1]:.3f}")


if __name__ == "__main__":
    main()
