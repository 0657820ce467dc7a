"""Seeded stand-in adapters for the default endpoints, until trained ones replace them.

Each is a valid PEFT LoRA adapter for SmolLM2-135M-Instruct with non-zero weights, and they differ in rank,
targets and scaling on purpose, so the engine's mixed batches exercise every case:

    chatbot        r=16, q/k/v/o,            alpha 32
    code           r=8,  all seven projections, alpha 16
    summarization  r=4,  q/v,                alpha 8, rsLoRA

    python adapters/make_random.py [--out adapters] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# SmolLM2-135M: hidden 576, 3 KV heads x 64 = 192, intermediate 1536, 30 layers.
SHAPES = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (576, 192),
    "self_attn.v_proj": (576, 192),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (576, 1536),
    "mlp.up_proj": (576, 1536),
    "mlp.down_proj": (1536, 576),
}
SPECS = {
    "chatbot": dict(r=16, lora_alpha=32, targets=["q_proj", "k_proj", "v_proj", "o_proj"], use_rslora=False),
    "code": dict(r=8, lora_alpha=16, targets=[k.split(".")[1] for k in SHAPES], use_rslora=False),
    "summarization": dict(r=4, lora_alpha=8, targets=["q_proj", "v_proj"], use_rslora=True),
}


def make_adapter(
    out: Path,
    r: int,
    lora_alpha: int,
    targets: list[str],
    use_rslora: bool,
    seed: int,
    num_layers: int = 30,
    shapes: dict[str, tuple[int, int]] = SHAPES,
    std: float = 0.02,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(num_layers):
        for module, (fan_in, fan_out) in shapes.items():
            if module.split(".")[1] not in targets:
                continue
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            weights[f"{prefix}.lora_A.weight"] = torch.randn(r, fan_in, generator=generator) / fan_in**0.5
            weights[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, r, generator=generator) * std
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in weights.items()}, out / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "base_model_name_or_path": "SmolLM2-135M-Instruct",
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for i, (name, spec) in enumerate(SPECS.items()):
        make_adapter(args.out / name, seed=args.seed + i, **spec)
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
