"""A Llama-3-8B-shaped model with random weights, the real Llama 3 tokenizer, and random rank-16 adapters.

No Llama 3 weights can be downloaded here, and none are needed to measure serving: decode time depends on the
shapes (bytes read per step, FLOPs per token), not on the values. So the model is built from a config with the
8B shapes and initialised directly on the target device in bf16 (no 16 GB file is ever written or read).
The tokenizer is the real one, converted from the tiktoken file that the ``llama-models`` package ships.

The same code builds ``TINY``, a two-layer model with the real vocabulary, so the CPU tests exercise it.

    python benchmarks/gpu/llama3_8b.py --tiny --device cpu     # build, tokenize, forward once, print sizes
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from adapters.make_random import make_adapter  # noqa: E402
from loraplex.engine.model.loader import LoadedModel  # noqa: E402

LLAMA3_VOCAB = 128256  # 128,000 BPE tokens + 256 special tokens
BOS, EOT, EOS, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
# The Llama 3 special tokens, in id order from 128000 (as llama_models/llama3/tokenizer.py lists them).
SPECIAL_TOKENS = [
    BOS,
    EOS,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    PAD,
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    EOT,
    "<|python_tag|>",
    "<|image|>",
]
SPECIAL_TOKENS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(SPECIAL_TOKENS))]
PRE_TOKENIZE = (  # Llama 3's split pattern (pat_str in llama_models/llama3/tokenizer.py)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The numbers that decide a decoder's cost; ``LLAMA3_8B`` and ``TINY`` share everything else."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int = LLAMA3_VOCAB
    rope_theta: float = 500000.0
    max_position_embeddings: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """PEFT module name under a decoder layer -> (in_features, out_features), as make_adapter wants."""
        h, kv, ffn = self.hidden_size, self.num_kv_heads * self.head_dim, self.intermediate_size
        return {
            "self_attn.q_proj": (h, h),
            "self_attn.k_proj": (h, kv),
            "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (h, h),
            "mlp.gate_proj": (h, ffn),
            "mlp.up_proj": (h, ffn),
            "mlp.down_proj": (ffn, h),
        }

    @property
    def num_parameters(self) -> int:
        per_layer = sum(i * o for i, o in self.projection_shapes.values()) + 2 * self.hidden_size
        return self.num_layers * per_layer + 2 * self.vocab_size * self.hidden_size + self.hidden_size

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.itemsize

    def config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=128000,
            eos_token_id=[128001, 128008, 128009],
            initializer_range=0.02,
        )


LLAMA3_8B = ModelShape("llama3-8b-random", 4096, 32, 32, 8, 14336)
TINY = ModelShape("llama3-tiny-random", 64, 2, 4, 2, 128, max_position_embeddings=2048)


# ---- model --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def build_model(shape: ModelShape, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """Allocate the model on ``device`` in ``dtype`` and fill it with seeded random weights there.

    Built on the meta device, then ``to_empty`` allocates every tensor once on the target and each is filled in
    place: no CPU copy, no float32 detour, so the 8B model takes ~16 GB of GPU memory and about a second.
    """
    config = shape.config()
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:  # linear and embedding weights: normal(0, 0.02) as LlamaConfig.initializer_range says
            param.normal_(0.0, config.initializer_range, generator=generator)
    # Rotary inv_freq is a non-persistent buffer that to_empty left uninitialised: rebuild the module (a few KB).
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config).to(device)
    return model.eval().requires_grad_(False)


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---- tokenizer ----------------------------------------------------------------------------------------------------


def llama3_tokenizer_file() -> Path:
    """The tiktoken BPE file: ``$LLAMA3_TOKENIZER_MODEL`` if set (the GPU machine has no llama-models), else the
    one inside the ``llama-models`` package, found without importing it."""
    if os.environ.get("LLAMA3_TOKENIZER_MODEL"):
        return Path(os.environ["LLAMA3_TOKENIZER_MODEL"])
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Llama 3 tokenizer needs the llama-models package: pip install llama-models")
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llama-models")
    return path


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """The tiktoken format: one ``base64(token) rank`` per line (what tiktoken.load.load_tiktoken_bpe reads)."""
    ranks = {}
    for line in path.read_text().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def convert_llama3_tokenizer(tiktoken_file: Path) -> PreTrainedTokenizerFast:
    """transformers' tiktoken converter, fed by our reader so the ``tiktoken`` package is not needed."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return read_tiktoken_ranks(Path(tiktoken_url))

    backend = Converter(str(tiktoken_file), pattern=PRE_TOKENIZE, extra_special_tokens=SPECIAL_TOKENS).converted()
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOT, pad_token=PAD, model_max_length=131072
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def cache_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_CACHE") or Path.home() / ".cache" / "loraplex")


def load_llama3_tokenizer(tiktoken_file: Path | None = None) -> PreTrainedTokenizerBase:
    """The converted tokenizer, cached as tokenizer.json after the first conversion (~5 s; loads in ~1 s)."""
    from transformers import AutoTokenizer

    saved = cache_dir() / "tokenizers" / "llama3"
    if (saved / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(saved)
    tokenizer = convert_llama3_tokenizer(tiktoken_file or llama3_tokenizer_file())
    tmp = saved.with_name(f"llama3.partial-{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    with contextlib.suppress(OSError):  # another process saved it first
        tmp.rename(saved)
    return tokenizer


# ---- the engine's view ----------------------------------------------------------------------------------------


def load_random_llama3(
    shape: ModelShape, device: str, dtype: torch.dtype, seed: int = 0, tokenizer: PreTrainedTokenizerBase | None = None
) -> LoadedModel:
    """What ``LLMEngine(config, loaded=...)`` takes; config.model.device and dtype must be ``device`` and ``dtype``."""
    model = build_model(shape, device, dtype, seed)
    model.generation_config.eos_token_id = model.config.eos_token_id
    return LoadedModel(
        model=model, tokenizer=tokenizer or load_llama3_tokenizer(), path=Path(shape.name), name=shape.name
    )


def make_random_adapters(
    out_dir: Path, shape: ModelShape, names: tuple[str, ...] = ("a0", "a1", "a2"), rank: int = 16, seed: int = 100
) -> dict[str, Path]:
    """Rank-``rank`` PEFT adapters on all seven projections of every layer; written once, reused after."""
    paths = {}
    for i, name in enumerate(names):
        path = out_dir / f"{shape.name}-r{rank}-{name}"
        if not (path / "adapter_model.safetensors").is_file():
            make_adapter(
                path,
                r=rank,
                lora_alpha=2 * rank,
                targets=list(PROJECTIONS),
                use_rslora=False,
                seed=seed + i,
                num_layers=shape.num_layers,
                shapes=shape.projection_shapes,
            )
        paths[name] = path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    shape = TINY if args.tiny else LLAMA3_8B
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    start = time.perf_counter()
    tokenizer = load_llama3_tokenizer()
    print(f"tokenizer: {len(tokenizer)} tokens in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    model = build_model(shape, args.device, dtype)
    print(f"{shape.name}: {model_bytes(model) / 1e9:.2f} GB on {args.device} in {time.perf_counter() - start:.1f} s")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids.to(args.device)
    with torch.inference_mode():
        print("next-token logits:", model(ids).logits[0, -1].float().topk(3))


if __name__ == "__main__":
    main()
