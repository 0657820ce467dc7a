"""Triton kernels for CUDA: paged decode attention read from the cache in place, and RMSNorm."""
