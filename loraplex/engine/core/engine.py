"""The engine: one base model, every endpoint's adapter resident, one continuous-batching step at a time.

``step()`` reads as the sentence it is: schedule, prepare tensors, forward, sample, postprocess.
This class is single-threaded; ``async_engine.AsyncEngine`` runs it in a loop thread for the server.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from loraplex.engine import kernels
from loraplex.engine.core.block_manager import BlockManager
from loraplex.engine.core.config import EngineConfig
from loraplex.engine.core.detokenizer import Detokenizer
from loraplex.engine.core.errors import AdapterError, QueueFullError, RequestError, UnknownEndpointError
from loraplex.engine.core.scheduler import ScheduledChunk, Scheduler
from loraplex.engine.core.sequence import FinishReason, Request, Sequence, SequenceStatus, TokenLogprob
from loraplex.engine.lora.config import LoRAAdapter
from loraplex.engine.lora.manager import LoRAManager
from loraplex.engine.model.attention import register_paged_attention
from loraplex.engine.model.decoder_step import LlamaDecoderStep
from loraplex.engine.model.grammar import Grammars
from loraplex.engine.model.kv_cache import KVCache
from loraplex.engine.model.loader import LoadedModel, cache_root, load_model, return_freed_memory
from loraplex.engine.model.runner import ModelRunner
from loraplex.engine.model.sampling import Sampler, SamplerOutput

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """What one step produced for one request: its new token and text, and whether it is done."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    error: str | None = None
    embedding: list[float] | None = None  # an embed request's vector, in its finished output
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked for them
    # Monotonic timestamps (seconds) for the server's durations.
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    prefill_done_time: float | None = None
    finish_time: float | None = None


@dataclass
class EngineStats:
    """Counters the server exports."""

    num_waiting: int = 0
    num_running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    preemptions_total: int = 0
    steps_total: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    prefix_cache_queries_total: int = 0  # tokens of admitted sequences looked up in the prefix cache
    prefix_cache_hits_total: int = 0  # of those, tokens whose K/V were reused


@dataclass
class _Tracked:
    seq: Sequence
    detokenizer: Detokenizer
    generator: torch.Generator
    pooled: torch.Tensor | None = None  # an embed request's hidden states summed so far, float32 [hidden]
    matcher: object | None = None  # a guided request's grammar state (xgrammar's GrammarMatcher)


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        limits = config.limits
        loaded = loaded or load_model(config.model)
        self.model, self.tokenizer, self.model_name = loaded.model, loaded.tokenizer, loaded.name
        self.model_path = loaded.path
        dtype = getattr(torch, config.model.dtype)
        # LoRA layers go on before the first forward pass (bitsandbytes 4-bit repacks weights on it).
        self.lora = LoRAManager(self.model, limits.max_loras, limits.max_lora_rank, dtype)
        cpu_kernels = kernels.prepare_weights(self.model, config.model, cache_root(config.model), loaded.gguf_path)
        return_freed_memory()
        self.endpoint_adapters: dict[str, str | None] = {}  # endpoint -> adapter name (None = base)
        # Prefix-cache salt per adapter: a version number too, so an adapter loaded again under the same name
        # never reuses K/V its predecessor computed.
        self.cache_salts: dict[str, bytes] = {}
        self.adapter_versions = itertools.count(1)
        for endpoint in config.endpoints:
            self.endpoint_adapters[endpoint.name] = endpoint.name if endpoint.adapter else None
            if endpoint.adapter:
                self.lora.adapters[endpoint.name] = self.lora.read(endpoint.name, endpoint.adapter)
                self._new_cache_salt(endpoint.name)
        self.retired_adapters: set[str] = set()  # unloaded, but still used by unfinished requests
        self.model.set_attn_implementation(register_paged_attention())
        text_config = self.model.config.get_text_config()
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        self.block_manager = BlockManager(limits.num_kv_blocks, limits.block_size)
        self.kv_cache = KVCache(
            text_config.num_hidden_layers,
            limits.num_kv_blocks,
            limits.block_size,
            text_config.num_key_value_heads,
            head_dim,
            dtype,
            config.model.device,
        )
        self.scheduler = Scheduler(
            limits, {e.name: e.slots for e in config.endpoints}, self.block_manager, self.lora.slots
        )
        self.runner = ModelRunner(self.model, self.lora, self.kv_cache, self.block_manager)
        kernels.attach_decode(self.runner, self.lora, self.model, config.model, cpu_kernels, head_dim)
        if cpu_kernels and config.model.fused_forward:
            self.runner.decoder_step = LlamaDecoderStep.build(self.model.get_decoder())
        # Graphs only over plain weights: bitsandbytes kernels were never captured and checked on a GPU here.
        if self.runner.device.type == "cuda" and not config.model.enforce_eager and config.model.quantization == "none":
            self.runner.use_decode_graphs(limits.max_num_seqs, limits.max_model_len, capture=True)
        self.eos_token_ids = self._eos_token_ids()
        self.sampler = Sampler(frozenset(self.eos_token_ids))
        self.grammars = Grammars(self.tokenizer, text_config.vocab_size, sorted(self.eos_token_ids))
        self.tracked: dict[str, _Tracked] = {}
        self.stats = EngineStats(kv_blocks_total=limits.num_kv_blocks)

    def _eos_token_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # ---- public API -------------------------------------------------------------------------------------

    def resolve_endpoint(self, model: str) -> str:
        """The endpoint a model name or alias reaches; raises UnknownEndpointError listing what exists."""
        endpoint = self.config.endpoint(model)
        name = endpoint.name if endpoint is not None else model
        if name not in self.endpoint_adapters:
            served = ", ".join(list(self.endpoint_adapters))  # list() copies atomically; loads run on the loop thread
            raise UnknownEndpointError(f"model {model!r} is not served here; use one of: {served}")
        return name

    def add_adapter(self, adapter: LoRAAdapter, slots: int = 0) -> None:
        """Serve an adapter read with ``lora.read`` as an endpoint of its own name (engine thread only).

        It becomes resident when a request first needs it; ``slots`` is its guaranteed concurrency.
        """
        configured = self.config.endpoint(adapter.name)
        if adapter.name in self.endpoint_adapters or (configured and configured.name in self.endpoint_adapters):
            raise AdapterError(f"adapter {adapter.name!r}: the name is already served; unload it first")
        if adapter.name in self.retired_adapters:
            raise AdapterError(
                f"adapter {adapter.name!r}: its previous version still serves requests in flight; retry shortly"
            )
        self.lora.adapters[adapter.name] = adapter
        self._new_cache_salt(adapter.name)
        self.endpoint_adapters[adapter.name] = adapter.name
        self.scheduler.endpoint_slots[adapter.name] = configured.slots if configured else slots

    def _new_cache_salt(self, adapter: str) -> None:
        self.cache_salts[adapter] = f"{adapter}#{next(self.adapter_versions)}".encode()

    def remove_adapter(self, name: str) -> None:
        """Stop serving an adapter endpoint (engine thread only). Requests already submitted finish with it."""
        if self.endpoint_adapters.get(name) is None:
            raise UnknownEndpointError(f"{name!r} is not a served adapter")
        del self.endpoint_adapters[name]
        self.retired_adapters.add(name)
        self._drop_retired()

    def _drop_retired(self) -> None:
        in_use = {t.seq.lora_name for t in self.tracked.values()}
        for name in self.retired_adapters - in_use:
            slot = self.lora.slots.evict(name)
            if slot is not None:
                self.lora.clear_slot(slot)
            del self.lora.adapters[name]
            self.retired_adapters.discard(name)

    def validate(self, request: Request) -> None:
        """Check a request without touching engine state (safe from any thread)."""
        self.resolve_endpoint(request.endpoint)
        prompt_len, max_len = len(request.prompt_token_ids), self.config.limits.max_model_len
        if prompt_len == 0:
            raise RequestError("the prompt is empty; send at least one token of text")
        room = max_len if request.embed else max_len - 1  # a generation needs room for one new token
        if prompt_len > room:
            raise RequestError(
                f"the prompt has {prompt_len} tokens but max_model_len is {max_len}; shorten it to at most "
                f"{room} tokens"
            )
        vocab = self.model.config.get_text_config().vocab_size
        params = request.params
        for name, ids in [
            ("prompt", request.prompt_token_ids),
            ("logit_bias", list(params.logit_bias)),
            ("stop_token_ids", params.stop_token_ids),
        ]:
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise RequestError(f"{name} = token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        if request.request_id in self.tracked:
            raise RequestError(f"request id {request.request_id!r} is already in use")

    def compile_guide(self, request: Request) -> None:
        """Compile the request's guide into ``request.grammar`` (cached by guide; safe from any thread). A guide
        that does not compile raises RequestError."""
        if request.params.guide is not None and request.grammar is None:
            request.grammar = self.grammars.compile(request.params.guide)

    def add_request(self, request: Request) -> None:
        self.validate(request)
        self.compile_guide(request)
        if len(self.scheduler.waiting) >= self.config.limits.max_waiting:
            raise QueueFullError(
                f"the waiting queue is full ({self.config.limits.max_waiting} requests); retry shortly"
            )
        endpoint = self.resolve_endpoint(request.endpoint)
        request.endpoint = endpoint
        lora_name = self.endpoint_adapters[endpoint]
        seq = Sequence(request, lora_name, cache_salt=self.cache_salts[lora_name] if lora_name else b"")
        generator = torch.Generator(device=self.kv_cache.key_cache[0].device)
        seed = request.params.seed  # any integer: reduced modulo 2**64, the generator's range (2**64 samples as 0)
        generator.manual_seed(seed % 2**64 if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        params = request.params
        detokenizer = Detokenizer(
            self.tokenizer, params.stop, params.skip_special_tokens, params.include_stop_str_in_output
        )
        matcher = self.grammars.matcher(request.grammar) if request.grammar is not None else None
        self.tracked[request.request_id] = _Tracked(seq, detokenizer, generator, matcher=matcher)
        self.scheduler.add(seq)
        self.stats.prompt_tokens_total += len(request.prompt_token_ids)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its KV blocks; None if it is unknown or already finished."""
        tracked = self.tracked.get(request_id)
        if tracked is None:
            return None
        return self._finish(tracked, FinishReason.ABORT, [], "")

    def has_unfinished(self) -> bool:
        return bool(self.tracked)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one iteration: schedule, prepare tensors, forward, sample, postprocess."""
        scheduled = self.scheduler.schedule()
        if not scheduled.chunks:
            return []
        now = time.monotonic()
        for chunk in scheduled.chunks:
            chunk.seq.first_scheduled_time = chunk.seq.first_scheduled_time or now
        failed = self._load_lora_slots(scheduled.lora_loads)
        chunks = [c for c in scheduled.chunks if c.seq.seq_id in self.tracked]  # those not failed just now
        if not chunks:
            return failed
        try:
            inputs = self.runner.prepare_inputs(chunks)
            seqs = [c.seq for c in inputs.sampled_chunks]
            masks = self.grammars.fill_async([self.tracked[s.seq_id].matcher for s in seqs])  # during the forward
            logits, hidden = self.runner.execute(inputs)
            self._pool_embeddings(inputs.chunks, hidden)
            generators = [self.tracked[s.seq_id].generator for s in seqs]
            masks = masks.result() if masks is not None else None
            sampled = self.sampler.sample(logits, seqs, generators, masks) if seqs else SamplerOutput([], [])
        except Exception as e:  # a failed step fails its batch, never the engine
            log.exception("step failed; failing the %d requests in it", len(chunks))
            return failed + [
                self._finish(self.tracked[c.seq.seq_id], FinishReason.ERROR, [], "", error=str(e)) for c in chunks
            ]
        self.stats.steps_total += 1
        self.stats.preemptions_total += len(scheduled.preempted)
        by_seq = zip(sampled.token_ids, sampled.logprobs, strict=True)
        return failed + self._postprocess(chunks, dict(zip((s.seq_id for s in seqs), by_seq, strict=True)))

    def _load_lora_slots(self, loads: list[tuple[str, int]]) -> list[RequestOutput]:
        """Write the adapters placed this step into their slots (host -> slot copies; the disk was read at
        registration). A failed copy fails only the running requests of that adapter, with an error naming it;
        the rest of the batch runs. ``load_slot`` has cleared the slot, so the adapter's next use loads it again.
        """
        failed: list[RequestOutput] = []
        for name, slot in loads:
            try:
                self.lora.load_slot(name, slot)
            except Exception as e:
                log.exception("loading adapter %r into LoRA slot %d failed", name, slot)
                error = f"adapter {name!r} could not be loaded into its LoRA slot: {e}"
                users = [
                    t
                    for t in self.tracked.values()
                    if t.seq.lora_name == name and t.seq.status is SequenceStatus.RUNNING
                ]
                failed += [self._finish(t, FinishReason.ERROR, [], "", error=error) for t in users]
        return failed

    def generate(self, requests: list[Request]) -> dict[str, list[RequestOutput]]:
        """Offline: run requests to completion; returns every output of each request, by id."""
        results: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
        for request in requests:
            self.add_request(request)
        while self.has_unfinished():
            for out in self.step():
                results[out.request_id].append(out)
        return results

    def update_stats(self) -> EngineStats:
        self.stats.num_waiting = len(self.scheduler.waiting)
        self.stats.num_running = len(self.scheduler.running)
        self.stats.kv_blocks_used = self.block_manager.num_used_blocks
        self.stats.prefix_cache_queries_total = self.scheduler.prefix_cache_queries
        self.stats.prefix_cache_hits_total = self.scheduler.prefix_cache_hits
        return self.stats

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    # ---- internals -------------------------------------------------------------------------------------

    def _pool_embeddings(self, chunks: list[ScheduledChunk], hidden: torch.Tensor) -> None:
        """Add each embed chunk's last hidden states ([T, hidden], rows in ``chunks`` order) to its request's sum;
        a chunk from the prompt's start (first run, or recompute after preemption) starts the sum again."""
        start = 0
        for chunk in chunks:
            if chunk.seq.request.embed:
                rows = hidden[start : start + chunk.num_tokens].float().sum(dim=0)
                tracked = self.tracked[chunk.seq.seq_id]
                first = chunk.seq.num_computed_tokens == 0 or tracked.pooled is None
                tracked.pooled = rows if first else tracked.pooled + rows
            start += chunk.num_tokens

    def _postprocess(
        self, chunks: list[ScheduledChunk], sampled: dict[str, tuple[int, TokenLogprob | None]]
    ) -> list[RequestOutput]:
        outputs = []
        now = time.monotonic()
        for chunk in chunks:
            seq = chunk.seq
            seq.num_computed_tokens += chunk.num_tokens
            self.scheduler.remember_computed(seq, chunk.num_tokens)
            if seq.request.embed and seq.num_computed_tokens == seq.num_tokens:
                outputs.append(self._finish_embedding(self.tracked[seq.seq_id], now))
            if seq.seq_id not in sampled:
                continue
            token, logprob = sampled[seq.seq_id]
            if not seq.output_token_ids:
                seq.prefill_done_time = now
            seq.output_token_ids.append(token)
            self.stats.generation_tokens_total += 1
            out = self._after_token(self.tracked[seq.seq_id], token)
            out.logprobs = None if logprob is None else [logprob]
            outputs.append(out)
        return outputs

    def _finish_embedding(self, tracked: _Tracked, now: float) -> RequestOutput:
        """Mean pooling, L2-normalised (the mean's 1/n drops out of the normalisation)."""
        tracked.seq.prefill_done_time = now
        out = self._finish(tracked, FinishReason.STOP, [], "")
        out.embedding = torch.nn.functional.normalize(tracked.pooled, dim=0).tolist()
        return out

    def _after_token(self, tracked: _Tracked, token: int) -> RequestOutput:
        seq, params = tracked.seq, tracked.seq.request.params
        reason = None
        guide_ended = False
        if tracked.matcher is not None:
            if not tracked.matcher.accept_token(token):  # the mask allowed it, so this is the engine's bug
                return self._finish(tracked, FinishReason.ERROR, [], "", error=f"the grammar rejected token {token}")
            guide_ended = tracked.matcher.is_terminated()  # the text is complete and its end token drawn
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids or guide_ended:
            reason = FinishReason.STOP
            text_ids = seq.output_token_ids[:-1]
        else:
            text_ids = seq.output_token_ids
        if tracked.detokenizer.update(text_ids):
            reason = FinishReason.STOP
        if reason is None and (
            len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.config.limits.max_model_len
        ):
            reason = FinishReason.LENGTH
        if reason is not None:
            return self._finish(tracked, reason, [token], tracked.detokenizer.release(finished=True))
        return self._output(seq, [token], tracked.detokenizer.release(finished=False))

    def _finish(
        self, tracked: _Tracked, reason: FinishReason, new_tokens: list[int], delta: str, error: str | None = None
    ) -> RequestOutput:
        seq = tracked.seq
        self.scheduler.remove(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        seq.output_text = tracked.detokenizer.text
        del self.tracked[seq.seq_id]
        if self.retired_adapters:
            self._drop_retired()
        self.stats.requests_finished[reason.value] = self.stats.requests_finished.get(reason.value, 0) + 1
        out = self._output(seq, new_tokens, delta)
        out.error, out.finish_time = error, time.monotonic()
        return out

    @staticmethod
    def _output(seq: Sequence, new_tokens: list[int], delta: str) -> RequestOutput:
        return RequestOutput(
            request_id=seq.seq_id,
            new_token_ids=new_tokens,
            text_delta=delta,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=len(seq.request.prompt_token_ids),
            num_output_tokens=len(seq.output_token_ids),
            num_cached_tokens=seq.num_cached_tokens,
            arrival_time=seq.request.arrival_time,
            first_scheduled_time=seq.first_scheduled_time,
            prefill_done_time=seq.prefill_done_time,
        )
