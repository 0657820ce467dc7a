"""Multi-LoRA: adapters read from PEFT folders (``config``), the device slots they are copied into
(``slots``, ``manager``), and the layers and ops that apply every row's own adapter in one batched pass
(``layers``, ``ops``). Imports only ``core.errors``.
"""
