"""Weight quantization storage: INT8 per output channel or group-wise, INT4 group-wise
(symmetric, asymmetric with integer zero-points, or with a float offset per group), packed two
4-bit values per byte, with round-to-nearest (RTN) quantizers.

A `QuantizedWeight` holds integer codes plus fp16 scales (and zero-points or offsets);
`dequantize` gives the float matrix back. `QuantLinear` runs it in torch, dequantizing on the
fly. The group-wise INT8 and the offset INT4 forms are a GGUF file's own Q8_0 and Q4_1 blocks
(w = d·q and w = d·q + m per 32 weights; Q4_0 is symmetric INT4), so such a file keeps its
precision, bit for bit; Q5_0's codes fit group-wise INT8 too, Q5_1's the offset INT8 form
(`int8m`, unsigned codes), and the k-quants are the offset INT4 (Q2_K, Q4_K), offset INT8 (Q5_K)
and group-wise INT8 (Q3_K, Q6_K) forms with float32 scales and offsets (products of a
super-block scale and a 4- to 8-bit sub-block one, which fp16 would round).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from infopt.errors import InvalidArgumentError, ModelFormatError

if TYPE_CHECKING:
    from infopt.core.model import Decoder

SCHEME = re.compile(r"int8(?:(m?)-g(\d+))?|int4([sm]?)-g(\d+)")


@dataclass(frozen=True)
class QuantScheme:
    bits: int  # 8 or 4
    group_size: int | None  # None: one scale per output row (int8)
    symmetric: bool
    offset: bool = False  # a float offset per group, w = scale * q + offset (int4m, int8m)

    @classmethod
    def parse(cls, name: str) -> QuantScheme:
        """`int8` (per-channel, symmetric), `int8-g32` (per group of 32, symmetric: GGUF Q8_0),
        `int8m-g32` (unsigned codes and a float offset per group: GGUF Q5_1 and Q5_K),
        `int4-g32` (asymmetric), `int4s-g64` (symmetric: GGUF Q4_0 at g32), `int4m-g32` (a float
        offset per group: GGUF Q4_1)."""
        m = SCHEME.fullmatch(name)
        if not m:
            raise InvalidArgumentError(
                f"quantization scheme {name!r}: expected int8, int8-g<group>, int8m-g<group>, "
                "int4-g<group>, int4s-g<group> or int4m-g<group>"
            )
        if name == "int8":
            return cls(8, None, True)
        group = int(m.group(2) or m.group(4))
        if group < 2 or group & (group - 1):
            raise InvalidArgumentError(f"{name}: group size {group} must be a power of two >= 2")
        if name.startswith("int8"):
            offset = m.group(1) == "m"
            return cls(8, group, not offset, offset)
        return cls(4, group, m.group(3) == "s", m.group(3) == "m")

    @property
    def name(self) -> str:
        if self.bits == 8:
            kind = "m" if self.offset else ""
            return f"int8{kind}-g{self.group_size}" if self.group_size else "int8"
        kind = "s" if self.symmetric else "m" if self.offset else ""
        return f"int4{kind}-g{self.group_size}"

    @property
    def qmax(self) -> int:
        if self.bits == 8:
            return 255 if self.offset else 127  # int8m's codes are unsigned bytes
        return 15

    def check_shape(self, out_features: int, in_features: int) -> None:
        if self.group_size and in_features % self.group_size:
            raise InvalidArgumentError(
                f"{self.name}: group size {self.group_size} does not divide the layer's input "
                f"size {in_features}; choose a group size that does (e.g. 32 or 64)"
            )


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[..., n] uint8 values 0..15 -> [..., n/2] bytes, element 2i in the low nibble."""
    if codes.shape[-1] % 2:
        raise InvalidArgumentError(f"pack_int4 needs an even last dimension, got {codes.shape}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded up to bfloat16 precision (8 significant bits). Symmetric INT4 scales are kept
    there because LiteRT / XNNPACK store blockwise INT4 scales as bfloat16: the same codes and
    scales then run unchanged on every runtime (and fit fp16 storage exactly)."""
    mantissa, exponent = torch.frexp(x.float())
    return torch.ldexp(torch.ceil(mantissa * 256) / 256, exponent.float())


def group_params(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) for rows of `w` [..., k] (one group per row): the RTN grid."""
    if scheme.symmetric:
        levels = scheme.qmax if scheme.bits == 8 else 7
        scale = w.abs().amax(-1, keepdim=True) / levels
        zero = torch.full_like(scale, 0.0 if scheme.bits == 8 else 8.0)
        if scheme.bits == 4:
            scale = round_up_bf16(scale)
    else:
        lo, hi = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / scheme.qmax
        zero = torch.round(-lo / scale.clamp(min=1e-12))
    scale = scale.clamp(min=1e-8).to(torch.float16).float()  # stored as fp16: use that value
    return scale, zero


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme
) -> torch.Tensor:
    lo = -127 if scheme.bits == 8 else 0
    hi = 127 if scheme.bits == 8 else 15
    return torch.clamp(torch.round(w / scale) + zero, lo, hi)


@dataclass
class QuantizedWeight:
    """Integer codes + per-group scales (+ zero-points) for one [out, in] matrix."""

    scheme: QuantScheme
    qweight: torch.Tensor  # int8 [out, in] (uint8: int8m), or uint8 [out, in/2] (two int4 a byte)
    scales: torch.Tensor  # fp16 [out, groups] (fp32: a GGUF k-quant's, see the module note)
    zeros: torch.Tensor | None  # uint8 [out, groups/2] packed 4-bit (asymmetric int4 only)
    shape: tuple[int, int]
    offsets: torch.Tensor | None = None  # as scales, added after scaling (int4m, int8m)

    @property
    def nbytes(self) -> int:
        parts = [self.qweight, self.scales, self.zeros, self.offsets]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """The same weight with its tensors on `device`."""
        moved = [t.to(device) if t is not None else None for t in (self.zeros, self.offsets)]
        qweight, scales = self.qweight.to(device), self.scales.to(device)
        return QuantizedWeight(self.scheme, qweight, scales, moved[0], self.shape, moved[1])

    def codes(self) -> torch.Tensor:
        """Integer codes [out, in] as float (int8: -127..127, int8m: 0..255, int4: 0..15)."""
        if self.scheme.bits == 8:
            return self.qweight.float()
        return unpack_int4(self.qweight).float()

    def zero_points(self) -> torch.Tensor:
        """[out, groups] zero-points as float."""
        out, groups = self.scales.shape
        if self.zeros is not None:
            return unpack_int4(self.zeros)[:, :groups].float()
        centred = self.scheme.bits == 4 and not self.scheme.offset
        return torch.full((out, groups), 8.0 if centred else 0.0)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inp = self.shape
        group = self.scheme.group_size or inp
        codes = self.codes().view(out, inp // group, group)
        w = (codes - self.zero_points()[..., None]) * self.scales.float()[..., None]
        if self.offsets is not None:
            w = w + self.offsets.float()[..., None]
        return w.view(out, inp).to(dtype)


def from_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme
) -> QuantizedWeight:
    """Pack integer codes [out, in] and per-group scale/zero [out, groups] into storage."""
    out, inp = codes.shape
    if scheme.bits == 8:
        qweight = codes.to(torch.int8)
    else:
        qweight = pack_int4(codes.to(torch.uint8))
    zeros = None
    if scheme.bits == 4 and not scheme.symmetric:
        z = zero.to(torch.uint8)
        if z.shape[1] % 2:
            z = torch.cat((z, torch.zeros_like(z[:, :1])), dim=1)
        zeros = pack_int4(z)
    return QuantizedWeight(scheme, qweight, scale.to(torch.float16), zeros, (out, inp))


def quantize_rtn(w: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """Round-to-nearest quantization of a [out, in] weight."""
    check_finite(w, "weight")
    out, inp = w.shape
    scheme.check_shape(out, inp)
    group = scheme.group_size or inp
    grouped = w.float().reshape(out, inp // group, group)
    if scheme.offset:  # the min-max grid of GGUF's Q4_1 / Q5_1: w ~ scale * q + min
        lo, hi = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
        lo16 = lo.to(torch.float16).float()
        scale = ((hi - lo16) / scheme.qmax).clamp(min=1e-8).to(torch.float16).float()
        codes = torch.clamp(torch.round((grouped - lo16) / scale), 0, scheme.qmax)
        codes = codes.reshape(out, inp).to(torch.uint8)
        return QuantizedWeight(
            scheme,
            codes if scheme.bits == 8 else pack_int4(codes),
            scale[..., 0].half(),
            None,
            (out, inp),
            lo16[..., 0].half(),
        )
    scale, zero = group_params(grouped, scheme)  # [out, groups, 1]
    codes = quantize_codes(grouped, scale, zero, scheme).reshape(out, inp)
    return from_codes(codes, scale[..., 0], zero[..., 0], scheme)


def group_scheme(elements: dict[str, int]) -> str:
    """The name a tensor group takes in a plan when its matrices are stored in several schemes
    (a GGUF k-quant mix): the scheme holding most of its weights (`elements`: scheme -> weight
    count; "fp32" when empty), ties to the first name in order."""
    return max(sorted(elements), key=elements.__getitem__, default="fp32")


def check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ModelFormatError(
            f"{what} contains NaN/Inf (first at index {bad}); refusing to quantize it"
        )


class QuantStorage(nn.Module):
    """Holds one quantized [rows, cols] matrix as buffers (saved and moved with the module)."""

    def __init__(self, qw: QuantizedWeight) -> None:
        super().__init__()
        self.scheme = qw.scheme
        self.shape = qw.shape
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scales", qw.scales)
        if qw.zeros is not None:
            self.register_buffer("zeros", qw.zeros)
        if qw.offsets is not None:
            self.register_buffer("offsets", qw.offsets)

    def quantized(self) -> QuantizedWeight:
        qweight, scales = self._buffers["qweight"], self._buffers["scales"]
        assert qweight is not None and scales is not None
        return QuantizedWeight(
            self.scheme,
            qweight,
            scales,
            self._buffers.get("zeros"),
            self.shape,
            self._buffers.get("offsets"),
        )


class QuantLinear(QuantStorage):
    """A Linear whose weight is stored quantized; dequantized on the fly in forward."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__(qw)
        self.out_features, self.in_features = qw.shape
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized().dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, scheme={self.scheme.name}"


class QuantEmbedding(QuantStorage):
    """An embedding table stored quantized per row (token); rows dequantized on lookup.
    Tied models share these buffers with their `QuantLinear` LM head."""

    def __init__(self, qw: QuantizedWeight) -> None:
        super().__init__(qw)
        self.num_embeddings, self.embedding_dim = qw.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        qw, flat = self.quantized(), ids.flatten()
        zeros = qw.zeros[flat] if qw.zeros is not None else None
        offsets = qw.offsets[flat] if qw.offsets is not None else None
        rows = QuantizedWeight(
            qw.scheme,
            qw.qweight[flat],
            qw.scales[flat],
            zeros,
            (flat.numel(), self.embedding_dim),
            offsets,
        )
        return rows.dequantize().view(*ids.shape, self.embedding_dim)


def float_copy(core: Decoder) -> tuple[Decoder, dict[str, QuantScheme]]:
    """A float32 copy of `core` (quantized layers dequantized) and the scheme of each layer that
    was quantized, by module name; for converters that trace float models and quantize them
    again by those schemes. The original is left untouched."""
    clone = copy.deepcopy(core).float()
    schemes: dict[str, QuantScheme] = {}
    for name, module in list(clone.named_modules()):
        if isinstance(module, QuantLinear | QuantEmbedding):
            schemes[name] = module.scheme
            weight = nn.Parameter(module.quantized().dequantize(), requires_grad=False)
            if isinstance(module, QuantEmbedding):
                plain: nn.Module = nn.Embedding(*module.shape)
            else:
                plain = nn.Linear(
                    module.in_features, module.out_features, bias=module.bias is not None
                )
                if module.bias is not None:
                    plain.bias = module.bias
            plain.weight = weight
            parent, _, attr = name.rpartition(".")
            setattr(clone.get_submodule(parent) if parent else clone, attr, plain)
    if core.spec.tie_word_embeddings and "embed_tokens" in schemes:
        clone.tie_weights()
    return clone.eval(), schemes


def stacked(mods: tuple[nn.Module, ...]) -> nn.Module | None:
    """One module computing the concatenated outputs of `mods` (which read the same input) when
    they are stored alike, else None: one wider matmul instead of several small ones (the
    exporters' q/k/v and gate/up projections: runtimes run a few large kernels faster than many
    small ones, whose fixed costs add up per token)."""
    biases: list[torch.Tensor | None] = [getattr(m, "bias", None) for m in mods]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return None
    bias = (
        torch.cat([b.detach() for b in biases if b is not None]) if biases[0] is not None else None
    )
    if all(type(m) is nn.Linear for m in mods):
        fused = nn.Linear(1, 1, bias=bias is not None)
        fused.weight = nn.Parameter(torch.cat([cast(nn.Linear, m).weight.detach() for m in mods]))
        if bias is not None:
            fused.bias = nn.Parameter(bias)
        return fused
    if all(isinstance(m, QuantLinear) for m in mods):
        qws = [m.quantized() for m in mods if isinstance(m, QuantLinear)]
        if len({q.scheme for q in qws}) != 1:
            return None
        zeros, offsets = [q.zeros for q in qws], [q.offsets for q in qws]
        qw = QuantizedWeight(
            qws[0].scheme,
            torch.cat([q.qweight for q in qws]),
            torch.cat([q.scales for q in qws]),
            torch.cat([z for z in zeros if z is not None]) if zeros[0] is not None else None,
            (sum(q.shape[0] for q in qws), qws[0].shape[1]),
            torch.cat([o for o in offsets if o is not None]) if offsets[0] is not None else None,
        )
        return QuantLinear(qw, bias)
    return None
