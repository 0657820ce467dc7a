"""One forward step of the model over the paged KV cache: the runner lays a schedule out as tensors, attention
reads and writes the cache, the sampler picks each row's token. May import ``core``'s data types (sequences,
scheduled chunks, block tables, configuration) and ``lora/``; never the engine or scheduler's logic.
"""
