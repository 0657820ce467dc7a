"""The request lifecycle: a request becomes a sequence, waits, is scheduled chunk by chunk under the token budget,
decodes, and finishes; ``engine.LLMEngine.step`` drives one iteration, ``async_engine`` runs steps in a thread
for the server. Imports ``model/`` and ``lora/`` to run a step, and device kernels only through ``kernels``.
"""
