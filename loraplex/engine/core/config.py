"""The whole configuration as dataclasses, read from one TOML file with environment overrides.

Each dataclass validates itself in ``__post_init__`` so a bad value fails at start-up with the key named,
not deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex.engine.core.errors import AdapterError, ConfigError
from loraplex.engine.lora.gguf_adapter import is_gguf_file

DEFAULT_CONFIG_PATH = Path(__file__).parents[2] / "default_config.toml"  # loraplex/default_config.toml
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "nf4", "int8")
TOOL_PARSERS = ("hermes", "llama3_json")  # how the model writes tool calls (server/tools.py)


@dataclass
class ModelConfig:
    """Which base model to load and how."""

    path: str = ""  # HF directory or .gguf file; "" = the embedded SmolLM2-135M-Instruct
    dtype: str = "float32"
    device: str = "cpu"
    quantization: str = "none"  # none | nf4 | int8 (bitsandbytes)
    # CPU threads for torch and the CPU kernels; 0 = the CPUs the container may use: its cgroup's CPU quota, else
    # the CPUs it may run on (model/threads.py)
    num_threads: int = 0
    cache_dir: str = ""  # where a GGUF is converted to safetensors; "" = ~/.cache/loraplex
    # float32 on the CPU: pre-pack projection weights, in the CPU kernels' panels or else for oneDNN (fast small
    # batches; kernels/cpu/linear.py)
    packed_weights: bool = True
    # CUDA: run decode-only steps eagerly instead of replaying captured CUDA graphs (model/cuda_graphs.py)
    enforce_eager: bool = False
    # float32 on the CPU: projections, LM head, RMSNorm, decode attention and decode rows' LoRA deltas through
    # kernels compiled on first use (kernels/cpu/extension.py); false, or a machine that cannot build them, uses
    # the portable torch ops
    cpu_kernels: bool = True
    # with the CPU kernels and a GGUF base: keep the projections (Q4_0, Q4_1) and tied embeddings (Q8_0) in the
    # file's own blocks where these reproduce the float32 weights exactly; the same outputs to the bit from about
    # a fifth of the memory (kernels/cpu/gguf_weights.py). False computes on the float32 weights
    gguf_weights: bool = True
    # with the CPU kernels and a Llama-architecture decoder: run each step's forward in fewer calls (q/k/v in one
    # kernel call, gate/up in another; model/decoder_step.py), the same hidden states to the bit. False runs
    # transformers' forward
    fused_forward: bool = True
    # CUDA: decode attention through the Triton kernel that reads the paged cache in place
    # (kernels/cuda/triton_decode.py) and RMSNorm in one Triton kernel (kernels/cuda/triton_norm.py), each checked
    # against torch at start; false, or no Triton, uses SDPA over the blocks gathered per step and transformers' norm
    triton_kernels: bool = True
    # how the model writes tool calls: "hermes" (<tool_call>{"name": ..., "arguments": ...}</tool_call>, also the
    # format the server asks for when the chat template cannot render tools) or "llama3_json" (Llama 3.1/3.2's
    # {"name": ..., "parameters": ...}); see server/tools.py
    tool_parser: str = "hermes"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype = {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"model.quantization = {self.quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"model.device = {self.device!r}; use 'cpu' or 'cuda[:N]'")
        if self.tool_parser not in TOOL_PARSERS:
            raise ConfigError(f"model.tool_parser = {self.tool_parser!r}; use one of {', '.join(TOOL_PARSERS)}")
        if self.num_threads < 0:
            raise ConfigError(f"model.num_threads = {self.num_threads}; use 0 (the CPU quota) or more")
        flags = ("packed_weights", "enforce_eager", "cpu_kernels", "gguf_weights", "fused_forward", "triton_kernels")
        for name in flags:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model.{name} = {getattr(self, name)!r}; use true or false")


@dataclass
class LimitsConfig:
    """Capacity and admission limits of one worker."""

    max_num_seqs: int = 64  # sequences running in one step, all endpoints together
    max_num_batched_tokens: int = 512  # tokens in one forward pass (prefill chunks + decodes)
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int = 1024  # KV blocks in the pool (x block_size = tokens of KV cache)
    max_model_len: int = 2048  # prompt + output tokens of one sequence
    max_loras: int = 4  # adapters resident in the slot tensors at once
    max_lora_rank: int = 16
    max_waiting: int = 256  # waiting-queue bound; past it requests are refused
    prefix_caching: bool = True  # reuse the KV blocks of a prompt prefix computed before (same adapter)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":  # annotations are strings here (postponed evaluation)
                if not isinstance(value, bool):
                    raise ConfigError(f"limits.{f.name} = {value!r}; use true or false")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"limits.{f.name} = {value!r}; use a positive integer")
        if self.max_model_len > self.num_kv_blocks * self.block_size:
            raise ConfigError(
                f"limits.max_model_len = {self.max_model_len} does not fit the KV pool of "
                f"{self.num_kv_blocks} blocks x {self.block_size} tokens; raise num_kv_blocks"
            )


@dataclass
class EndpointConfig:
    """One served model name: the base (no adapter) or one LoRA adapter, with its guaranteed slots."""

    name: str
    adapter: str = ""  # PEFT adapter directory; "" = the plain base model
    slots: int = 1  # concurrency guaranteed to this endpoint (the old replica count)
    aliases: list[str] = field(default_factory=list)  # more model names that reach this endpoint
    port: int = 0  # optional listener of its own (server); 0 = only the main listener
    # an Ollama Modelfile whose SYSTEM, PARAMETER, TEMPLATE and MESSAGE lines are this endpoint's defaults
    # (serve --modelfile NAME=PATH sets it); its ADAPTER, if any, must be ``adapter``
    modelfile: str = ""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"endpoints.name = {self.name!r}; use a non-empty name without '/'")
        if self.slots < 1:
            raise ConfigError(f"endpoints[{self.name}].slots = {self.slots}; use 1 or more")


@dataclass
class ServerConfig:
    """Where the HTTP server listens."""

    host: str = "127.0.0.1"
    port: int = 11434
    grace_period: float = 30.0  # seconds after SIGTERM for requests in flight to finish before exiting
    # Limits on what one caller controls (loraplex/server/limits.py); 0 turns a limit off where noted.
    request_timeout: float = 300.0  # seconds from arrival to the last token; past it the request is ended
    max_body_bytes: int = 1_048_576  # request body size; larger bodies get 413
    max_stop_sequences: int = 16  # entries in a request's stop list
    max_stop_length: int = 256  # characters in one stop string
    max_embed_tokens: int = 16_384  # tokens of all inputs of one /api/embed request together
    max_queued_per_endpoint: int = 0  # requests past an endpoint's slots before 503; 0 = max_waiting / endpoints
    max_requests_per_client: int = 0  # concurrent requests from one client address; 0 = no limit
    # where models made by /api/create and /api/copy are kept, to serve them again after a restart;
    # "" = $XDG_STATE_HOME/loraplex, else ~/.local/state/loraplex
    state_dir: str = ""

    def __post_init__(self) -> None:
        if self.grace_period < 0:
            raise ConfigError(f"server.grace_period = {self.grace_period}; use 0 or more seconds")
        if self.request_timeout <= 0:
            raise ConfigError(f"server.request_timeout = {self.request_timeout}; use a positive number of seconds")
        for name in ("max_body_bytes", "max_stop_sequences", "max_stop_length", "max_embed_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server.{name} = {getattr(self, name)}; use a positive integer")
        for name in ("max_queued_per_endpoint", "max_requests_per_client"):
            if getattr(self, name) < 0:
                raise ConfigError(f"server.{name} = {getattr(self, name)}; use 0 (default) or more")


ADMIN_ROUTES = ("auto", "admin", "off")


@dataclass
class AuthConfig:
    """Optional API keys (``Authorization: Bearer <key>``), read from files or environment variables only.

    No keys configured = no authentication. Admin keys are valid everywhere; ``admin_routes`` decides who may
    load / unload / create / delete adapters: "auto" = an admin key once admin keys exist, else the same rule
    as every other route; "admin" = an admin key always (none configured = refused); "off" = refused to all.
    """

    api_keys_env: str = "LORAPLEX_API_KEYS"  # comma-separated keys in this environment variable
    api_keys_file: str = ""  # one key per line ('#' starts a comment)
    admin_keys_env: str = "LORAPLEX_ADMIN_KEYS"
    admin_keys_file: str = ""
    admin_routes: str = "auto"
    public_paths: list[str] = field(default_factory=lambda: ["/health", "/ready", "/metrics"])  # never need a key

    def __post_init__(self) -> None:
        if self.admin_routes not in ADMIN_ROUTES:
            raise ConfigError(f"auth.admin_routes = {self.admin_routes!r}; use one of {', '.join(ADMIN_ROUTES)}")


@dataclass
class AdaptersConfig:
    """Adapters loaded at run time (``/v1/load_lora_adapter``, ``/api/create``)."""

    runtime_loading: bool = True  # False refuses every load / unload / create / delete
    roots: list[str] = field(default_factory=lambda: ["../adapters"])  # the only folders adapters load from

    def allowed_path(self, path: str) -> Path:
        """Resolve ``path`` (absolute, or relative to the first root) and refuse anything outside the roots.

        Symlinks are resolved first, so a link inside a root that points elsewhere is refused too.
        """
        if not self.runtime_loading:
            raise AdapterError("loading adapters at run time is turned off (adapters.runtime_loading = false)")
        roots = [Path(r).resolve() for r in self.roots]
        candidate = Path(path)
        if not candidate.is_absolute():
            if not roots:
                raise AdapterError("no adapter roots are configured (adapters.roots)")
            candidate = roots[0] / candidate
        resolved = candidate.resolve()
        if not any(resolved == root or root in resolved.parents for root in roots):
            allowed = ", ".join(str(r) for r in roots)
            raise AdapterError(f"adapter path {path!r} is outside the allowed roots ({allowed})")
        if not (resolved.is_dir() or is_gguf_file(resolved)):
            raise AdapterError(f"adapter path {path!r} is not a PEFT adapter directory or a GGUF LoRA file")
        return resolved


@dataclass
class EngineConfig:
    """Root of the configuration file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    endpoints: list[EndpointConfig] = field(default_factory=list)
    server: ServerConfig = field(default_factory=ServerConfig)
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)

    def __post_init__(self) -> None:
        names: set[str] = set()
        for endpoint in self.endpoints:
            for name in (endpoint.name, *endpoint.aliases):
                if name in names:
                    raise ConfigError(f"endpoint name or alias {name!r} is used twice")
                names.add(name)
        guaranteed = sum(e.slots for e in self.endpoints)
        if guaranteed > self.limits.max_num_seqs:
            raise ConfigError(
                f"endpoint slots add up to {guaranteed} but limits.max_num_seqs = "
                f"{self.limits.max_num_seqs}; raise max_num_seqs or lower the slots"
            )

    def endpoint(self, name: str) -> EndpointConfig | None:
        """The endpoint a model name (or alias) reaches, or None."""
        for endpoint in self.endpoints:
            if name == endpoint.name or name in endpoint.aliases:
                return endpoint
        return None


def _section(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown key(s) in [{where}]: {', '.join(sorted(unknown))}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"[{where}]: {e}") from e


def _env_overrides(data: dict[str, Any]) -> None:
    """LORAPLEX_<SECTION>_<KEY> overrides a scalar, e.g. LORAPLEX_MODEL_DEVICE=cuda."""
    for section_name, cls in (("model", ModelConfig), ("limits", LimitsConfig), ("server", ServerConfig)):
        for f in dataclasses.fields(cls):
            variable = f"LORAPLEX_{section_name}_{f.name}".upper()
            value = os.environ.get(variable)
            if value is not None:
                kind = type(getattr(cls(), f.name))
                data.setdefault(section_name, {})[f.name] = _parse_env(kind, value, variable)


def _parse_env(kind: type, value: str, name: str) -> Any:
    if kind is not bool:
        return kind(value)
    if value.lower() not in ("1", "0", "true", "false"):
        raise ConfigError(f"{name} = {value!r}; use true or false")
    return value.lower() in ("1", "true")


def load_config(path: str | Path | None = None) -> EngineConfig:
    """Read a TOML config (the shipped default when ``path`` is None); adapter paths resolve against its folder."""
    path = Path(path) if path else DEFAULT_CONFIG_PATH
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    _env_overrides(data)
    unknown = set(data) - {"model", "limits", "endpoints", "server", "adapters", "auth"}
    if unknown:
        raise ConfigError(f"unknown section(s) in {path}: {', '.join(sorted(unknown))}")
    endpoints = []
    for raw in data.get("endpoints", []):
        endpoint = _section(EndpointConfig, raw, "endpoints")
        if endpoint.adapter and not Path(endpoint.adapter).is_absolute():
            endpoint.adapter = str((path.parent / endpoint.adapter).resolve())
        if endpoint.modelfile and not Path(endpoint.modelfile).is_absolute():
            endpoint.modelfile = str((path.parent / endpoint.modelfile).resolve())
        endpoints.append(endpoint)
    adapters = _section(AdaptersConfig, data.get("adapters", {}), "adapters")
    adapters.roots = [str((path.parent / root).resolve()) for root in adapters.roots]
    model = _section(ModelConfig, data.get("model", {}), "model")
    if model.path and not Path(model.path).is_absolute():
        candidate = path.parent / model.path
        if candidate.exists():
            model.path = str(candidate.resolve())
    return EngineConfig(
        model=model,
        limits=_section(LimitsConfig, data.get("limits", {}), "limits"),
        endpoints=endpoints,
        server=_section(ServerConfig, data.get("server", {}), "server"),
        adapters=adapters,
        auth=_section(AuthConfig, data.get("auth", {}), "auth"),
    )
