"""The model core: one export-friendly decoder (Llama, Mistral, Qwen2) with a preallocated KV cache.

Every runtime starts from this definition. No data-dependent Python control flow: positions come in
as a tensor, the KV cache is written with `index_copy_`, and the causal mask is computed from the
positions, so the same graph traces for prefill (T tokens) and decode (1 token).
Parameter names mirror Hugging Face's (minus the leading `model.`), so HF state dicts load as-is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from infopt.core.spec import GEMMA, ModelSpec
from infopt.errors import InvalidArgumentError, ModelFormatError

if TYPE_CHECKING:
    from infopt.importers import ModelSource

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def rope_inv_freq(spec: ModelSpec, kind: str = "full", max_len: int = 0) -> torch.Tensor:
    """Inverse RoPE frequencies [head_dim/2], float32, of a layer of `kind`, with the config's
    scaling, as HF computes them. LongRoPE takes its long factors when `max_len` exceeds the
    pretraining context: a choice made once per cache size, as llama.cpp does (transformers
    switches mid-sequence)."""
    dim = spec.head_dim
    theta, scaling = spec.rope_of(kind)
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv = 1.0 / (theta**exponent)
    scaling = scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * torch.pi / inv
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, smoothed, scaled)
    if kind == "freq_factors":
        return 1.0 / (torch.tensor(scaling["factors"]).float() * theta**exponent)
    if kind == "longrope":
        long = max_len > scaling["original_max_position_embeddings"]
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"])
        return 1.0 / (factors.float() * theta**exponent)
    return inv


def rope_scale(spec: ModelSpec, kind: str = "full") -> float:
    """The factor cos and sin are multiplied by (LongRoPE's attention factor; else 1)."""
    _, scaling = spec.rope_of(kind)
    if (scaling or {}).get("rope_type") != "longrope":
        return 1.0
    assert scaling is not None
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = float(scaling["original_max_position_embeddings"])
    factor = float(scaling.get("factor") or spec.max_position_embeddings / original)
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_angles(
    spec: ModelSpec, max_len: int, kind: str = "full", context: int | None = None
) -> tuple[torch.Tensor, float]:
    """(position x frequency angles [max_len, head_dim/2] float32, cos/sin factor) of a layer
    of `kind`: tables of `max_len` rows for a model serving `context` positions (default
    max_len; LongRoPE's choice of factors follows it)."""
    inv = rope_inv_freq(spec, kind, context or max_len)
    return torch.arange(max_len, dtype=torch.float32)[:, None] * inv, rope_scale(spec, kind)


def rope_kinds(spec: ModelSpec) -> tuple[str, ...]:
    """The layer kinds that need their own RoPE tables ("full" always)."""
    if spec.rope_local_theta is not None and "sliding" in spec.layer_kinds:
        return ("full", "sliding")
    return ("full",)


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """Softmax attention of q [.., Tq, D] over k/v [.., Tk, D] under a bool (True: visible) or
    additive mask; soft-capped scores need the explicit form, the rest takes SDPA's kernel."""
    if softcap is None:  # the default scale left implicit: converters match SDPA without one
        implicit = scale == q.shape[-1] ** -0.5
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=None if implicit else scale
        )
    scores = soft_cap(q @ k.transpose(-1, -2) * scale, softcap)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class RMSNorm(nn.Module):
    """RMSNorm as HF computes it: Llama's casts the normed input back before the weight
    multiplies it; Gemma's (`fp32_weight`) multiplies in float32 (by its 1 + w, kept in float32
    in 16-bit models too) and casts the product."""

    def __init__(self, dim: int, eps: float, fp32_weight: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fp32_weight = fp32_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.fp32_weight:
            return (x32 * self.weight.float()).to(dtype)
        return self.weight * x32.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [T, D] (the half-split layout HF uses)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """Preallocated K/V buffers [B, H_kv, max_len, D]; positions are written in place."""

    k: torch.Tensor
    v: torch.Tensor

    def __init__(
        self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(
        self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, kind: str = "full") -> None:
        super().__init__()
        h, d = spec.hidden_size, spec.head_dim
        bias = spec.attention_bias
        self.q_proj = nn.Linear(h, spec.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, spec.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, spec.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(spec.num_heads * d, h, bias=False)
        gemma = spec.architecture in GEMMA
        self.q_norm = RMSNorm(d, spec.rms_norm_eps, gemma) if spec.qk_norm else None
        self.k_norm = RMSNorm(d, spec.rms_norm_eps, gemma) if spec.qk_norm else None
        self.n_heads, self.n_kv, self.head_dim = spec.num_heads, spec.num_kv_heads, d
        self.kind = kind  # "full" | "sliding"
        self.scale = spec.attn_scale if spec.attn_scale is not None else d**-0.5
        self.softcap = spec.attn_softcap
        self.cache: KVCache | None = None

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, T, D], k and v [B, H_kv, T, D] of x [B, T, hidden]: normed (QK-norm) and
        rotated."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        pos: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        groups = self.n_heads // self.n_kv
        q, k, v = self.project(x, cos, sin)
        assert self.cache is not None, "call Decoder.setup_cache() first"
        k_all, v_all = self.cache.update(pos, k, v)
        window = mask.shape[-1]
        k_all, v_all = k_all[:, :, :window], v_all[:, :, :window]
        # GQA without copying K/V: the `groups` query heads of one KV head become extra rows.
        q = q.reshape(b, self.n_kv, groups * t, self.head_dim)
        out = attend(q, k_all, v_all, mask.repeat(groups, 1), self.scale, self.softcap)
        out = out.view(b, self.n_heads, t, self.head_dim).transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(out)


class LowRankLinear(nn.Module):
    """y = (x V^T) U^T + b with U [out, r], V [r, in]: r (in + out) parameters, not in x out."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.rank = u.shape
        self.in_features = v.shape[1]
        self.u = nn.Parameter(u.contiguous(), requires_grad=False)
        self.v = nn.Parameter(v.contiguous(), requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}"


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)
        self.act = spec.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        gate = F.silu(gate) if self.act == "silu" else F.gelu(gate, approximate="tanh")
        return self.down_proj(gate * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block; with sandwich norms (Gemma) the attention and MLP outputs are
    normed too, and the pre-MLP norm is `pre_feedforward_layernorm` (HF's names throughout)."""

    def __init__(self, spec: ModelSpec, kind: str = "full") -> None:
        super().__init__()
        eps, gemma = spec.rms_norm_eps, spec.architecture in GEMMA
        self.input_layernorm = RMSNorm(spec.hidden_size, eps, gemma)
        self.self_attn = Attention(spec, kind)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, eps, gemma)
        self.mlp = MLP(spec)
        self.sandwich = spec.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(spec.hidden_size, eps, gemma)
            self.post_feedforward_layernorm = RMSNorm(spec.hidden_size, eps, gemma)
        self.kind = kind

    @property
    def mlp_norm(self) -> RMSNorm:
        """The norm before the MLP."""
        return self.pre_feedforward_layernorm if self.sandwich else self.post_attention_layernorm

    @property
    def attn_out_norm(self) -> RMSNorm | None:
        """The norm on the attention's output before the residual add (sandwich only)."""
        return self.post_attention_layernorm if self.sandwich else None

    @property
    def mlp_out_norm(self) -> RMSNorm | None:
        """The norm on the MLP's output before the residual add (sandwich only)."""
        return self.post_feedforward_layernorm if self.sandwich else None

    def attn_residual(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x plus the attention's output (o_proj applied)."""
        norm = self.attn_out_norm
        return x + (attn if norm is None else norm(attn))

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """x plus the MLP's output, norms included."""
        out = self.mlp(self.mlp_norm(x))
        norm = self.mlp_out_norm
        return x + (out if norm is None else norm(out))

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, inputs: dict[str, PassInputs]
    ) -> torch.Tensor:
        cos, sin, mask = inputs[self.kind]
        x = self.attn_residual(x, self.self_attn(self.input_layernorm(x), cos, sin, pos, mask))
        return self.ffn(x)


# (cos, sin, mask) one pass gives the layers of a kind
PassInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Decoder(nn.Module):
    """Decoder-only transformer. `forward(tokens [B,T], pos [T], window)` -> logits [B, T|1, V]."""

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    rope_cos_local: torch.Tensor  # sliding layers with their own RoPE base only
    rope_sin_local: torch.Tensor

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        # nn.Embedding / nn.Linear, or their quantized forms after compression
        self.embed_tokens: nn.Module = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec, kind) for kind in spec.layer_kinds)
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.architecture in GEMMA)
        self.lm_head: nn.Module = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.tie_weights()
        self.max_len = 0

    @property
    def float_dtype(self) -> torch.dtype:
        """The float dtype the model computes in (its float weights'; Gemma's norms stay float32
        in 16-bit models, so they do not say)."""
        for module in self.modules():
            if isinstance(module, RMSNorm) and module.fp32_weight:
                continue
            for p in module.parameters(recurse=False):
                if p.is_floating_point():
                    return p.dtype
        return torch.float32

    def tie_weights(self) -> None:
        """The LM head reads the embedding table (one tensor, stored once)."""
        self.lm_head.weight = self.embed_tokens.weight

    @property
    def blocks(self) -> list[Block]:
        return [cast(Block, layer) for layer in self.layers]

    def setup_cache(
        self,
        max_len: int,
        batch: int = 1,
        dtype: torch.dtype | None = None,
        context: int | None = None,
    ) -> None:
        """Allocate the KV cache and the RoPE tables for `max_len` positions, of a model serving
        `context` positions (default max_len: more rows than that only pad fixed windows)."""
        dtype = dtype or self.float_dtype
        device = self.norm.weight.device
        for layer in self.blocks:
            cache = KVCache(batch, self.spec.num_kv_heads, max_len, self.spec.head_dim, dtype)
            layer.self_attn.cache = cache.to(device)
        for kind in rope_kinds(self.spec):
            freqs, scale = rope_angles(self.spec, max_len, kind, context)
            emb = torch.cat((freqs, freqs), dim=-1).to(device)  # [max_len, D]
            suffix = "" if kind == "full" else "_local"
            self.register_buffer(
                f"rope_cos{suffix}", (emb.cos() * scale).to(dtype), persistent=False
            )
            self.register_buffer(
                f"rope_sin{suffix}", (emb.sin() * scale).to(dtype), persistent=False
            )
        self.max_len = max_len

    def rope_at(self, kind: str, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [.., D] at positions `pos` for a layer of `kind`."""
        if kind == "sliding" and "sliding" in rope_kinds(self.spec):
            return self.rope_cos_local[pos], self.rope_sin_local[pos]
        return self.rope_cos[pos], self.rope_sin[pos]

    def causal_mask(self, pos: torch.Tensor, window: int, kind: str = "full") -> torch.Tensor:
        """Bool mask [T, window]: key j is visible to query at position p iff j <= p (and in the
        sliding window, for a layer of that kind)."""
        keys = torch.arange(window, device=pos.device)[None, :]
        visible = keys <= pos[:, None]
        sliding = self.spec.window_of(kind)
        if sliding is not None:
            visible = visible & (keys > pos[:, None] - sliding)
        return visible

    def pass_inputs(self, pos: torch.Tensor, window: int) -> dict[str, PassInputs]:
        """(cos, sin, mask) for each layer kind of the model, at positions `pos`."""
        return {
            kind: (*self.rope_at(kind, pos), self.causal_mask(pos, window, kind))
            for kind in set(self.spec.layer_kinds)
        }

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        scale = self.spec.embed_scale
        return x if scale is None else x * torch.tensor(scale, dtype=x.dtype)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states x: final norm, LM head, soft cap."""
        return soft_cap(self.lm_head(self.norm(x)), self.spec.final_softcap)

    def forward(
        self, tokens: torch.Tensor, pos: torch.Tensor, window: int, last_only: bool = False
    ) -> torch.Tensor:
        """tokens [B, T] at positions pos [T]; attends to cache slots [0, window)."""
        x = self.embed(tokens)
        inputs = self.pass_inputs(pos, window)
        for layer in self.blocks:
            x = layer(x, pos, inputs)
        if last_only:
            x = x[:, -1:]
        return self.head(x)


def split_fused(
    spec: ModelSpec, name: str, tensor: torch.Tensor
) -> Iterator[tuple[str, torch.Tensor]]:
    """Phi-3's fused qkv_proj / gate_up_proj as the separate q/k/v and gate/up the core holds
    (exact: rows are copied); any other tensor as it is."""
    if name.endswith("self_attn.qkv_proj.weight"):
        stem = name.removesuffix("qkv_proj.weight")
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        for part, rows in zip("qkv", tensor.split([q, kv, kv]), strict=True):
            yield f"{stem}{part}_proj.weight", rows.contiguous()
    elif name.endswith("mlp.gate_up_proj.weight"):
        stem = name.removesuffix("gate_up_proj.weight")
        gate, up = tensor.chunk(2)
        yield f"{stem}gate_proj.weight", gate.contiguous()
        yield f"{stem}up_proj.weight", up.contiguous()
    else:
        yield name, tensor


def hf_weights(
    spec: ModelSpec, pairs: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """A Hugging Face checkpoint's tensors as the model core holds them: Gemma's norms as the
    1 + w they multiply by (as GGUF files store them), Phi-3's fused projections split."""
    for raw, tensor in pairs:
        name = raw.removeprefix("model.")
        if spec.architecture in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            yield name, tensor.float() + 1.0
        else:
            yield from split_fused(spec, name, tensor)


def load_state_dict(
    model: Decoder,
    weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Install HF-named weights as `model`'s parameters (which may live on the meta device).

    Tensors are converted and installed one at a time, so peak memory stays near one copy of the
    model plus one tensor. A leading `model.` is accepted; tied models may omit or include
    `lm_head.weight`. A missing, extra or misshaped tensor is a typed error naming it."""
    own = dict(model.named_parameters(remove_duplicate=False))
    tied = model.spec.tie_word_embeddings
    if tied:
        own.pop("lm_head.weight", None)
    pairs = weights.items() if isinstance(weights, Mapping) else weights
    seen, extra = set(), []
    for raw_name, tensor in pairs:
        name = raw_name.removeprefix("model.")
        if name not in own:
            if not (name == "rotary_emb.inv_freq" or (tied and name == "lm_head.weight")):
                extra.append(name)
            continue
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ModelFormatError(
                f"weight {name!r} has shape {tuple(tensor.shape)}, the config "
                f"implies {tuple(own[name].shape)}"
            )
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        wanted = dtype or own[name].dtype
        if isinstance(module, RMSNorm) and module.fp32_weight:
            wanted = torch.float32  # Gemma's 1 + w: kept in float32 in 16-bit models
        value = tensor.to(device=device, dtype=wanted)
        setattr(module, attr, nn.Parameter(value, requires_grad=False))
        seen.add(name)
    missing = sorted(set(own) - seen)
    if missing or extra:
        raise ModelFormatError(
            f"weights do not match the config: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    if (
        tied
        and isinstance(model.lm_head, nn.Linear)
        and isinstance(model.embed_tokens, nn.Embedding)
    ):
        model.tie_weights()


def parameter_count(model: nn.Module) -> int:
    """The model's logical parameters: every weight value once (a quantized matrix counts its
    rows x columns, a low-rank one its two factors, a tied table once), not the stored
    tensors' elements (packed codes, scales)."""
    from infopt.core.quant import QuantStorage

    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, QuantStorage):
            key = module._buffers["qweight"]
            if key is not None and id(key) not in seen:
                seen.add(id(key))
                total += module.shape[0] * module.shape[1]
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at dotted `name` under `root`."""
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def pick_device(device: str | None) -> torch.device:
    """`device`, or CUDA when present for None / "auto"; a typed error for CUDA without one."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str):
        raise InvalidArgumentError(f"device={device!r}: expected cpu, cuda, cuda:N or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {device!r} requested but CUDA is not available here")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(
            f"device {device!r}: expected cpu, cuda, cuda:N or auto"
        ) from None


def load_core(
    source: ModelSource,
    max_context: int,
    device: str | None = "cpu",
    dtype: str = "float32",
    stored: bool = False,
) -> Decoder:
    """The model core of an imported model, its weights read one tensor at a time, with a KV
    cache of `max_context` positions. With `stored`, matrices a file keeps in a block format
    infopt stores too (a GGUF's Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q2_K–Q6_K) stay so, as quantized
    modules holding the file's codes and scales; the other weights come as `dtype`."""
    from infopt.core.quant import QuantEmbedding, QuantizedWeight, QuantLinear

    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    target = pick_device(device)
    with torch.device("meta"):
        model = Decoder(source.spec)
    weights: Iterable[tuple[str, torch.Tensor]] = source.iter_weights()
    if stored:  # quantized modules first, so that the float tensors left are what they lack
        floats = []
        for name, w in source.iter_stored():
            if not isinstance(w, QuantizedWeight):
                floats.append((name, w))
                continue
            module = name.removeprefix("model.").rpartition(".")[0]  # "<module>.weight"
            old = model.get_submodule(module)
            bias = getattr(old, "bias", None)  # a placeholder: the file's bias comes with floats
            qw = w.to(target)
            replace_module(
                model,
                module,
                QuantEmbedding(qw)
                if isinstance(old, nn.Embedding)
                else QuantLinear(qw, None if bias is None else torch.zeros(bias.shape)),
            )
        weights = floats
    load_state_dict(model, weights, dtype=DTYPES[dtype], device=target)
    if source.spec.tie_word_embeddings and isinstance(model.embed_tokens, QuantEmbedding):
        model.lm_head = QuantLinear(model.embed_tokens.quantized())  # the same table, once
    model.setup_cache(max_context)
    return model.eval()
