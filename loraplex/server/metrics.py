"""Prometheus ``/metrics`` in its own registry: engine gauges and counters read at scrape time, latency
histograms observed as requests finish.

The names are a contract: the k8s monitor script and the Gateway API Inference Extension read them
(``loraplex_lora_requests_info`` mirrors vLLM's ``vllm:lora_requests_info``: its value is a timestamp and its
labels carry the adapters running and waiting). Renaming one breaks them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraplex.engine.core.async_engine import AsyncEngine
from loraplex.engine.core.engine import LLMEngine, RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class EngineCollector(Collector):
    """Reads a fresh ``AsyncEngine.stats()`` snapshot on every scrape; yields nothing until the engine loads."""

    def __init__(self) -> None:
        self.async_engine: AsyncEngine | None = None

    def collect(self) -> Iterator[Metric]:
        for metric in self._collect():
            yield metric
            for alias in VLLM_ALIASES.get(metric.name, ()):
                yield _renamed(metric, alias)

    def _collect(self) -> Iterator[Metric]:
        if self.async_engine is None:
            return
        engine, stats = self.async_engine.engine, self.async_engine.stats()
        yield _gauge("loraplex_num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting)
        yield _gauge("loraplex_num_requests_running", "Requests in the running batch.", stats.num_running)
        usage = stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0
        yield _gauge("loraplex_kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).", usage)
        yield _gauge("loraplex_kv_blocks_used", "KV cache blocks in use.", stats.kv_blocks_used)
        yield _counter("loraplex_prompt_tokens", "Prompt tokens received.", stats.prompt_tokens_total)
        yield _counter("loraplex_generation_tokens", "Tokens generated.", stats.generation_tokens_total)
        yield _counter("loraplex_preemptions", "Sequences preempted for lack of KV blocks.", stats.preemptions_total)
        yield _counter(
            "loraplex_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            stats.prefix_cache_queries_total,
        )
        yield _counter(
            "loraplex_prefix_cache_hits",
            "Prompt tokens whose K/V the prefix cache held.",
            stats.prefix_cache_hits_total,
        )
        finished = CounterMetricFamily(
            "loraplex_requests_finished", "Requests finished, by finish reason.", labels=["reason"]
        )
        for reason, count in sorted(stats.requests_finished.items()):
            finished.add_metric([reason], count)
        yield finished
        yield self._lora_info(engine)
        resident = GaugeMetricFamily(
            "loraplex_adapter_resident",
            "1 when the adapter sits in a LoRA slot, 0 when it waits in host memory.",
            labels=["adapter"],
        )
        for name in sorted(engine.lora.adapters):
            resident.add_metric([name], 1.0 if name in engine.lora.slot_of else 0.0)
        yield resident

    @staticmethod
    def _lora_info(engine: LLMEngine) -> GaugeMetricFamily:
        """Adapters of running and waiting requests, read from a snapshot of the scheduler's queues."""
        running = sorted({s.lora_name for s in list(engine.scheduler.running) if s.lora_name})
        waiting = sorted({s.lora_name for s in list(engine.scheduler.waiting) if s.lora_name})
        info = GaugeMetricFamily(
            "loraplex_lora_requests_info",
            "Running and waiting LoRA adapters; the value is the time of the scrape.",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        info.add_metric([",".join(running), ",".join(waiting), str(engine.lora.max_loras)], time.time())
        return info


# The names Kubernetes' Gateway API Inference Extension reads from a model server, so LoRA-aware routing
# works unchanged (gpu_cache_usage_perc is the older name of kv_cache_usage_perc).
VLLM_ALIASES = {
    "loraplex_num_requests_waiting": ("vllm:num_requests_waiting",),
    "loraplex_num_requests_running": ("vllm:num_requests_running",),
    "loraplex_kv_cache_usage_perc": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "loraplex_lora_requests_info": ("vllm:lora_requests_info",),
}


def _renamed(metric: Metric, name: str) -> Metric:
    copy = Metric(name, metric.documentation, metric.type)
    copy.samples = [sample._replace(name=name) for sample in metric.samples]
    return copy


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


access_log = logging.getLogger("loraplex.access")


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.engine_collector = EngineCollector()
        self.registry.register(self.engine_collector)
        self.time_to_first_token = Histogram(
            "loraplex_time_to_first_token_seconds",
            "From arrival to the first generated token.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "loraplex_request_latency_seconds",
            "From arrival to the last token.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "loraplex_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request.",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )

    def bind(self, async_engine: AsyncEngine) -> None:
        self.engine_collector.async_engine = async_engine

    def observe(self, endpoint: str, out: RequestOutput) -> None:
        """Record a finished request's latencies from the engine's own timestamps, and log one access line."""
        ttft = latency = tpot = None
        if out.prefill_done_time is not None:
            ttft = out.prefill_done_time - out.arrival_time
            self.time_to_first_token.labels(endpoint).observe(ttft)
        if out.finish_time is not None:
            latency = out.finish_time - out.arrival_time
            self.request_latency.labels(endpoint).observe(latency)
            if out.prefill_done_time is not None and out.num_output_tokens > 1:
                tpot = (out.finish_time - out.prefill_done_time) / (out.num_output_tokens - 1)
                self.time_per_output_token.labels(endpoint).observe(tpot)
        access_log.info(
            json.dumps(
                {
                    "request_id": out.request_id,
                    "endpoint": endpoint,
                    "finish_reason": out.finish_reason.value if out.finish_reason else None,
                    "prompt_tokens": out.num_prompt_tokens,
                    "output_tokens": out.num_output_tokens,
                    "ttft_s": _rounded(ttft),
                    "tpot_s": _rounded(tpot),
                    "latency_s": _rounded(latency),
                }
            )
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
