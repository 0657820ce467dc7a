"""Multi-LoRA: adapters read from PEFT folders (``config``) or llama.cpp's GGUF files (``gguf_adapter``), the
device slots they are copied into (``slots``, ``manager``), and the layers and ops that apply every row's own
adapter in one batched pass (``layers``, ``ops``). Imports only ``core.errors``.
"""
