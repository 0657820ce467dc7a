"""The GPU check's serve stage: the server's app over HTTP on loopback on the default model."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import time

import torch

from benchmarks.gpu.common import Budget, Plan
from benchmarks.gpu.oracle import find_default_model
from loraplex.engine.core.config import load_config

# ---- stage: serve ------------------------------------------------------------------------------------------------


def stage_serve(plan: Plan, device: torch.device, dtype: torch.dtype, budget: Budget, args) -> dict:
    """``loraplex serve``'s app on this device with the default model and adapters, over real HTTP on loopback:
    seeded sampling (the same text twice, and with other requests in the batch), an OpenAI stream, an
    embedding, the metrics, and nothing left running afterwards. What the throughput stage does not touch."""
    import threading

    import httpx
    import uvicorn

    from loraplex.server.app import _Listener, build_asgi
    from loraplex.server.state import ServerState

    path = find_default_model()
    if path is None:
        return {"skipped": "the default model's GGUF is not here (see benchmarks/gpu/README.md)"}
    config = load_config()
    config.model = dataclasses.replace(
        config.model, path=path, device=str(device), dtype=str(dtype).removeprefix("torch."), num_threads=0
    )
    config.limits = dataclasses.replace(config.limits, num_kv_blocks=256, max_num_seqs=16)
    with socket_for_port() as port:
        config.server.host, config.server.port = "127.0.0.1", port
    for endpoint in config.endpoints:
        endpoint.port = 0  # one listener
    state = ServerState(config)
    state.load()
    server = _Listener(uvicorn.Config(build_asgi(state), host="127.0.0.1", port=port, lifespan="off", log_config=None))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if budget.left < 0 or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    url, checks = f"http://127.0.0.1:{port}", {}
    try:
        new_tokens = 8 if args.tiny else 24
        sampled = {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 7, "num_predict": new_tokens}

        def generate(model: str, prompt: str, options: dict) -> dict:
            body = {"model": model, "prompt": prompt, "stream": False, "options": options}
            response = httpx.post(f"{url}/api/generate", json=body, timeout=120)
            response.raise_for_status()
            return response.json()

        alone = [generate("chatbot", "Tell me about the sea.", sampled)["response"] for _ in range(2)]
        checks["seeded_sampling_repeats"] = alone[0] == alone[1] and bool(alone[0])
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            others = [
                pool.submit(generate, model, "Write a haiku.", {"temperature": 1.0, "num_predict": new_tokens})
                for model in ("base", "code", "summarization")
            ]
            together = pool.submit(generate, "chatbot", "Tell me about the sea.", sampled)
            checks["seeded_sampling_same_in_a_batch"] = together.result()["response"] == alone[0]
            checks["others_answered"] = all(f.result()["done"] for f in others)
        chunks = []
        body = {"model": "code", "messages": [{"role": "user", "content": "Sort a list."}], "max_tokens": 16}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
            chunks = [line for line in r.iter_lines() if line.startswith("data: ")]
        checks["openai_stream_ends_with_done"] = len(chunks) > 2 and chunks[-1] == "data: [DONE]"
        embed = httpx.post(f"{url}/api/embed", json={"model": "summarization", "input": "a lighthouse"}, timeout=60)
        vector = embed.json()["embeddings"][0]
        checks["embedding_normalised"] = abs(sum(v * v for v in vector) - 1.0) < 1e-2
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        checks["metrics_exported"] = "vllm:num_requests_waiting" in metrics and "vllm:lora_requests_info" in metrics
        engine = state.engine
        deadline = time.monotonic() + 10
        while engine.tracked and time.monotonic() < deadline:
            time.sleep(0.05)
        checks["nothing_left_running"] = not engine.tracked and engine.block_manager.num_used_blocks == 0
        graphs = engine.runner.graphs
        replays = graphs.replays if graphs is not None else 0
    finally:
        server.should_exit = True
        thread.join(10)
        state.close()
    observations = {}
    if dtype != torch.float32:  # bf16 logits move with the batch's shape, and a draw near a boundary with them
        observations["seeded_sampling_same_in_a_batch"] = checks.pop("seeded_sampling_same_in_a_batch")
    return {
        "model": "SmolLM2-135M-Instruct (default model) with the shipped adapters",
        "checks": checks,
        "observations": observations,
        "decode_graph_replays": replays,
        "sample_text": alone[0][:120],
        "passed": all(checks.values()),
    }


@contextlib.contextmanager
def socket_for_port():
    """A free loopback port (closed again before the server binds it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
