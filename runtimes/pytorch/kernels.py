"""Packed weight-only kernels for quantized layers on the CPU: PyTorch's own `_weight_int8pack_mm`
(INT8 per output channel) and `_weight_int4pack_mm_for_cpu` (INT4 in groups of 32 to 256, any of
infopt's zero-point forms). Both are vectorized (AVX2, AVX-512) only for bfloat16 inputs, so a
packed layer computes in bfloat16: activations, scales and zero points rounded to it, sums in
float32 (their float32 paths are not vectorized, which defeats the point of packing).

`QuantLinear` (the model core's storage) dequantizes its whole matrix on every call: exact, and
what quality is measured on, but slower than float32. `pack_model` swaps each quantized Linear
for the fastest exact-weight form the CPU has, when the model is loaded to serve:

- INT8 per channel and INT4 group-wise: the packed kernels above, the codes and scales as stored;
- anything else (group-wise INT8 such as a GGUF's Q8_0, shapes a kernel does not take): the
  matrix dequantized once to float32, a float32 layer's speed for four bytes a weight (the
  planner prices it so: `Target.float_schemes`).

The INT4 kernel's packed layout depends on the CPU's vector width, so it is made at load, never
stored in a bundle."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from infopt.core.quant import QuantizedWeight, QuantLinear, unpack_int4

INT4_GROUPS = (32, 64, 128, 256)  # the group sizes _weight_int4pack_mm_for_cpu takes
VECTOR_CPUS = ("AVX2", "AVX512")  # where both kernels have vectorized bfloat16 paths


def kernels_available(device: torch.device | str) -> bool:
    """Whether this torch has the packed kernels, vectorized for this CPU."""
    ops = torch.ops.aten
    return (
        torch.device(device).type == "cpu"
        and torch.backends.cpu.get_cpu_capability() in VECTOR_CPUS
        and hasattr(ops, "_weight_int8pack_mm")
        and hasattr(ops, "_weight_int4pack_mm_for_cpu")
        and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")
    )


class PackedInt8Linear(nn.Module):
    """INT8 per output channel: codes as stored, scales in bfloat16."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qw.shape
        # a fresh copy: the kernel's aligned vector loads need the allocator's alignment, which
        # tensors read from a (memory-mapped) file do not promise
        self.register_buffer("qweight", qw.qweight.clone(memory_format=torch.contiguous_format))
        self.register_buffer("scales", qw.scales[:, 0].to(torch.bfloat16).contiguous())
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16, copy=True)  # aligned, see above
        y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class PackedInt4Linear(nn.Module):
    """INT4 group-wise: the kernel computes w = (q - 8)·scale + zero per group, so a symmetric
    code (zero point 8) has zero 0, an integer zero point z has (8 - z)·scale and a float
    offset m (GGUF's Q4_1) has m + 8·scale."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.group = qw.scheme.group_size or self.in_features
        codes = unpack_int4(qw.qweight).to(torch.int32).contiguous()
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2))
        scale = qw.scales.float()
        zero = (8.0 - qw.zero_points()) * scale
        if qw.offsets is not None:
            zero = qw.offsets.float() + 8.0 * scale
        pairs = torch.stack((scale, zero), dim=-1).transpose(0, 1)  # [groups, out, 2]
        self.register_buffer("scales_and_zeros", pairs.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16, copy=True)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.packed, self.group, self.scales_and_zeros
        )
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class DequantizedLinear(nn.Module):
    """A quantized matrix no packed kernel takes, dequantized once (exactly) to float32."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.register_buffer("weight", qw.dequantize(torch.float32))
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


def packed_form(qw: QuantizedWeight) -> type[nn.Module]:
    """The module that runs `qw` fastest on a CPU with the packed kernels."""
    out, inp = qw.shape
    scheme = qw.scheme
    if scheme.bits == 8 and scheme.group_size is None and inp % 32 == 0:
        return PackedInt8Linear
    if scheme.bits == 4 and scheme.group_size in INT4_GROUPS and out % 16 == 0:
        return PackedInt4Linear
    return DequantizedLinear


def pack_model(model: nn.Module) -> dict[str, int]:
    """Swap every `QuantLinear` in `model` (on the CPU) for its packed form, in place; returns
    how many layers took each form. Does nothing where the kernels are not available: the
    model then keeps dequantizing on the fly."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not found or not kernels_available(next(iter(model.buffers())).device):
        return {}
    counts: dict[str, int] = {}
    for name, module in found:
        qw = module.quantized()
        form = packed_form(qw)
        parent, _, attr = name.rpartition(".")
        bias = None if module.bias is None else module.bias.detach()
        setattr(model.get_submodule(parent) if parent else model, attr, form(qw, bias))
        counts[form.__name__] = counts.get(form.__name__, 0) + 1
    return counts
