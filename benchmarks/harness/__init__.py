"""What every benchmark shares, so that each script says only what it measures.

    cli        the set-up of a script (environment, the common flags, --quick defaults) and its log lines
    machine    what ran it: CPU, cores, load, package versions, the source revision
    workload   prompts cut from Python standard-library source, seeded; endpoints by popularity
    memory     resident set size and its peak, per deployment
    engine     one in-process LLMEngine: its config from the flags, all requests at once, timed decode steps
    servers    server processes (``loraplex serve`` or any command): start, wait until ready, stop
    client     a streaming HTTP load (Ollama NDJSON or OpenAI SSE): time to first token, inter-token latency,
               throughput, open loop at a rate or closed at a concurrency
    stats      percentiles and duration summaries
    report     JSON, Markdown and matplotlib plots under benchmarks/results/

Only ``engine`` imports torch or the engine, so a script whose processes must choose when torch loads
(contention.py) or that only sends HTTP can use the rest.
"""
