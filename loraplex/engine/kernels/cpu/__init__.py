"""The C++ CPU kernels (``csrc/``, compiled by ``extension`` on first start) and their Python faces: packed and
GGUF-block linear layers (``linear``, ``gguf_weights``) and RMSNorm (``norm``)."""
