"""Faster small-batch matmuls for a float32 base model on the CPU.

On the AVX2 CPUs this project is measured on, torch's default CPU matmul (MKL) takes a one-row GEMV path for a
single token but repacks the whole weight on every call once there are 2 or more rows: a 576 -> 1536 projection
with 3 rows costs about 3x one row, and the 49152-row LM head about 3.5x. A serving engine multiplies the same
weights by a few rows at every decode step, so two changes are made once, at load time:

- every projection inside the decoder keeps its weight pre-packed, and the dense copy is dropped, so memory
  does not grow. With the engine's CPU kernels (kernels/cpu/extension.py) the layout is their own 16-column
  panels (``PanelLinear``, csrc/panel_linear.cpp): decode steps read the weights near the memory's
  bandwidth, where oneDNN's packed path reads them at about half of it. Without the kernels (no compiler,
  ``model.cpu_kernels = false``) the weights are packed for oneDNN, torch's bundled library (``PackedLinear``).
  With the kernels, a GGUF base keeps them in the file's own 4-bit blocks (``Q4PanelLinear``,
  kernels/cpu/gguf_weights.py);
- the LM head, whose weight is usually tied to the input embeddings (which need it dense), keeps that dense
  weight. With the kernels it is read by ``RowMajorLinear`` (csrc/row_major_linear.cpp), without them
  computed as ``weight @ hidden.T`` (``WeightFirstLinear``): MKL then packs the few hidden rows, not the
  28M-element weight. A GGUF base's tied embeddings stay in the file's 8-bit blocks, read by ``Q8Embedding``
  and ``Q8RowMajorLinear``.

``benchmarks/decode_step.py`` measures whole decode steps against torch's default and against each other;
``benchmarks/engine_throughput.py`` does so on its large-batch workload (``unpacked``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from loraplex.engine.core.config import ModelConfig
from loraplex.engine.kernels.cpu.gguf_weights import Q4Panels, Q8Rows

# oneDNN picks its blocked weight layout for this many rows; 16 was as fast as any hint from 1 to 256 rows.
_PACK_ROWS_HINT = 16


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def uses_packed_weights(config: ModelConfig) -> bool:
    """Packing applies to a plain float32 base on the CPU; GPUs and quantized or half-precision bases keep theirs."""
    plain_cpu = config.device == "cpu" and config.dtype == "float32" and config.quantization == "none"
    return config.packed_weights and plain_cpu and packing_available()


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight held in oneDNN's packed layout (float32, CPU, inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _PACK_ROWS_HINT)
        self.weight = nn.Parameter(packed, requires_grad=False)  # a parameter, so parameter counts stay true
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=onednn"


def _rows_through_kernel(linear: nn.Module, x: torch.Tensor, op: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """The kernels take contiguous 2-D rows: flatten ``x``, run ``op(rows, *args)``, add the bias, restore the
    leading dims."""
    out = op(x.reshape(-1, linear.in_features).contiguous(), *args)
    if linear.bias is not None:
        out += linear.bias
    return out.reshape(*x.shape[:-1], linear.out_features)


class PanelLinear(nn.Module):
    """``nn.Linear`` with its weight in the 16-column panels of the ``loraplex::panel_linear`` CPU kernel.

    Each row's result is independent of the other rows in the call (the kernel sums every output in one order),
    so batching cannot move a greedy token. The panels are zero-padded to a multiple of 16 output features.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        packed = torch.ops.loraplex.pack_linear_weight(linear.weight.detach())
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.packed_tensors = ("weight",)  # made here, in memory of their own (``pack_for_cpu``)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rows_through_kernel(self, x, torch.ops.loraplex.panel_linear, self.weight, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=panels"


class Q4PanelLinear(nn.Module):
    """``nn.Linear`` whose weight stays in a GGUF file's 4-bit blocks, read by ``loraplex::panel_linear_q4``:
    the same outputs as ``PanelLinear`` over the dequantized weight, to the bit (kernels/cpu/gguf_weights.py)."""

    def __init__(self, linear: nn.Linear, panels: Q4Panels) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # parameters, so parameter counts and memory reports see the weight in the form it is held
        self.codes = nn.Parameter(panels.codes, requires_grad=False)
        self.scales = nn.Parameter(panels.scales, requires_grad=False)
        self.minimums = nn.Parameter(panels.minimums, requires_grad=False)
        self.packed_tensors = ("codes", "scales", "minimums")
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = torch.ops.loraplex.panel_linear_q4
        return _rows_through_kernel(self, x, op, self.codes, self.scales, self.minimums, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=q4 panels"


class FusedPanels(nn.Module):
    """Projections of one input computed in one kernel call (a layer's q/k/v, or gate/up): their panels side by
    side, so each output column is the same sum as in its own projection, to the bit. The projections' own
    parameters become views of the joined ones: no memory is added, and each still runs on its own.

    One call instead of three (or two) is one parallel region and one pass over the input instead of several;
    at a few rows per step that call overhead is a large part of a projection's time."""

    def __init__(self, projections: list[nn.Module]) -> None:
        super().__init__()
        first = projections[0]
        self.in_features = first.in_features
        self.splits = [p.out_features for p in projections]
        self.out_features = sum(self.splits)
        self.packed_tensors = first.packed_tensors
        for name in self.packed_tensors:
            joined = torch.cat([getattr(p, name).detach() for p in projections])
            setattr(self, name, nn.Parameter(joined, requires_grad=False))
            start = 0
            for p in projections:
                rows = getattr(p, name).shape[0]
                setattr(p, name, nn.Parameter(joined[start : start + rows], requires_grad=False))
                start += rows
        self.bias = None
        self._op = type(first).forward  # the projections' own forward, run over the joined tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(self, x)

    @staticmethod
    def can_fuse(projections: list[nn.Module]) -> bool:
        """Panel projections of one kind and one input width, without biases, each a whole number of panels."""
        kinds = {type(p) for p in projections}
        return (
            len(kinds) == 1
            and kinds <= {PanelLinear, Q4PanelLinear}
            and len({p.in_features for p in projections}) == 1
            and all(p.bias is None and p.out_features % 16 == 0 for p in projections)
        )


class _DenseHeadLinear(nn.Module):
    """An LM head that keeps the original dense weight (shared, so a tie to the embeddings holds)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias


class WeightFirstLinear(_DenseHeadLinear):
    """``nn.Linear`` computed as ``weight @ x.T``: MKL packs the few rows of ``x``, not the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = torch.mm(self.weight, rows.T).T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class RowMajorLinear(_DenseHeadLinear):
    """``nn.Linear`` through the ``loraplex::row_major_linear`` CPU kernel. Each row's result is independent of
    the other rows in the call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rows_through_kernel(self, x, torch.ops.loraplex.row_major_linear, self.weight)


class Q8Embedding(nn.Module):
    """Token embeddings kept in Q8_0 blocks: the looked-up rows rebuilt in float32, exactly
    (kernels/cpu/gguf_weights.py)."""

    def __init__(self, rows: Q8Rows) -> None:
        super().__init__()
        self.codes = nn.Parameter(rows.codes, requires_grad=False)
        self.scales = nn.Parameter(rows.scales, requires_grad=False)
        self.packed_tensors = ("codes", "scales")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return Q8Rows(self.codes, self.scales).dequantize(ids)


class Q8RowMajorLinear(nn.Module):
    """The LM head tied to a ``Q8Embedding``, through ``loraplex::row_major_linear_q8``: the same logits as
    ``RowMajorLinear`` over the dequantized weight, to the bit. It shares the embedding's parameters."""

    def __init__(self, embedding: Q8Embedding) -> None:
        super().__init__()
        self.out_features, self.in_features = embedding.codes.shape
        self.codes, self.scales = embedding.codes, embedding.scales
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rows_through_kernel(self, x, torch.ops.loraplex.row_major_linear_q8, self.codes, self.scales)


def pack_for_cpu(
    model: nn.Module,
    panels: bool = False,
    q4: dict[nn.Module, Q4Panels] | None = None,
    q8_embeddings: Q8Rows | None = None,
) -> int:
    """Swap the decoder's ``nn.Linear`` modules for packed ones and the LM head for one that reads its weight
    dense.

    ``panels``: the CPU kernels are loaded, so the projections become ``PanelLinear`` and the LM head
    ``RowMajorLinear``; else ``PackedLinear`` and ``WeightFirstLinear``. ``q4``: with ``panels``, the
    projections whose GGUF blocks were read (kernels/cpu/gguf_weights.py) become ``Q4PanelLinear`` instead, and
    ``q8_embeddings`` (tied embeddings read from Q8_0 blocks) become ``Q8Embedding`` and ``Q8RowMajorLinear``.
    Runs after the multi-LoRA layers are attached (their base layers are swapped too) and before any forward
    pass. Returns how many projections were packed.
    """
    packed_linear = PanelLinear if panels else PackedLinear
    decoder = model.get_decoder()
    linears = [(name, module) for name, module in decoder.named_modules() if type(module) is nn.Linear]
    q4 = q4 if panels and q4 else {}
    for name, module in linears:
        parent_name, _, child = name.rpartition(".")
        packed = Q4PanelLinear(module, q4[module]) if module in q4 else packed_linear(module)
        setattr(decoder.get_submodule(parent_name), child, packed)
    lm_head = model.get_output_embeddings()
    if panels and q8_embeddings is not None:
        embedding = Q8Embedding(q8_embeddings)
        model.set_input_embeddings(embedding)
        model.set_output_embeddings(Q8RowMajorLinear(embedding))
    elif type(lm_head) is nn.Linear:
        model.set_output_embeddings((RowMajorLinear if panels else WeightFirstLinear)(lm_head))
    # transformers maps the safetensors file privately and the weights are views into it: the mapping, with
    # every page the packing read, stays resident while any tensor still points into it. Moving the tensors
    # that stay dense (embeddings, norms) into their own memory lets it go, so packing does not add a copy.
    # The packed weights already have memory of their own.
    packed = {id(getattr(m, name)) for m in model.modules() for name in getattr(m, "packed_tensors", ())}
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.layout == torch.strided and id(tensor) not in packed:
            tensor.data = tensor.data.clone()
    return len(linears)
