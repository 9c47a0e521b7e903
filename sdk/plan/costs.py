"""Memory and speed models: what a model costs on a device, from its config alone.

Memory is exact where it can be (weight bytes per storage scheme, scales and zero-points included;
KV cache = 2 x layers x kv_heads x head_dim x context x batch x bytes), plus activations and a
per-runtime overhead. Speed is a roofline: decode is bound by the bytes read per token over the
achieved bandwidth, prefill by FLOPs over the achieved compute.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from infopt.core.defaults import PREFILL_CHUNK
from infopt.core.spec import ModelSpec
from infopt.device_profiles import DeviceProfile
from infopt.errors import InvalidArgumentError

GROUPS = ("embeddings", "lm_head", "attention", "mlp")
FLOAT_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0}
# int4s: symmetric, no zero-points; int4m: a float offset per group (GGUF Q4_1); int8-gG: GGUF
# Q8_0; int8m-gG: unsigned codes and a float offset per group (GGUF Q5_1)
SCHEME = re.compile(r"(fp32|fp16|bf16|int8(?:(m?)-g(\d+))?|int4([sm]?)-g(\d+))")
# Resident memory of a runtime with no model (interpreter, libraries, tokenizer, loader
# residue) where its target's record gives none for the device's kind.
DEFAULT_OVERHEAD = 300e6
QUICK_KV_COEFFICIENT = 0.2  # the quick rule of thumb: 20 % on top of the weights


def matrices(spec: ModelSpec, mlp_keep: float = 1.0) -> dict[str, list[tuple[int, int]]]:
    """(out_features, in_features) of every weight matrix, by tensor group.
    `mlp_keep` < 1 models structured MLP-channel pruning (a smaller intermediate size)."""
    h, hd, n = spec.hidden_size, spec.head_dim, spec.num_layers
    inter = pruned_width(spec.intermediate_size, mlp_keep)
    attn = [
        (spec.num_heads * hd, h),
        (spec.num_kv_heads * hd, h),
        (spec.num_kv_heads * hd, h),
        (h, spec.num_heads * hd),
    ]
    mlp = [(inter, h), (inter, h), (h, inter)]
    return {
        "embeddings": [(spec.vocab_size, h)],
        "lm_head": [] if spec.tie_word_embeddings else [(spec.vocab_size, h)],
        "attention": attn * n,
        "mlp": mlp * n,
    }


def pruned_width(width: int, keep: float) -> int:
    """Channels kept by structured pruning, rounded down to a multiple kernels and group-wise
    quantization like (128 for wide layers, 64 or 32 for smaller ones)."""
    if keep >= 1.0:
        return width
    step = 128 if width >= 4096 else (64 if width >= 1024 else 32)
    return max(step, int(width * keep) // step * step)


def scheme_bytes(scheme: str, rows: int, cols: int) -> float:
    """Stored bytes of one [rows, cols] matrix: int8 = per-row fp16 scale, int8-gG = a fp16 scale
    per group of G (int8m: and a fp16 offset); int4-gG = two values per byte plus per group of G
    along the input dim a fp16 scale and a 4-bit zero-point (int4s: none; int4m: a fp16
    offset). A GGUF k-quant kept as it is holds its scales (and offsets) in float32 instead:
    two bytes more each, which a plan naming the scheme does not see."""
    m = SCHEME.fullmatch(scheme)
    if not m:
        raise InvalidArgumentError(
            f"weight scheme {scheme!r} is not one of fp32, fp16, bf16, int8, int8-g<group>, "
            "int8m-g<group>, int4-g<group>, int4s-g<group>, int4m-g<group>"
        )
    if scheme in FLOAT_BYTES:
        return rows * cols * FLOAT_BYTES[scheme]
    if scheme == "int8":
        return rows * cols + rows * 2.0
    group = int(m.group(3) or m.group(5))
    if cols % group:
        raise InvalidArgumentError(
            f"{scheme}: group {group} does not divide the input size "
            f"{cols}; use a group size that does (e.g. 32 or 64)"
        )
    if scheme.startswith("int8"):
        return rows * cols + rows * (cols // group) * (4.0 if m.group(2) else 2.0)
    per_group = {"s": 2.0, "m": 4.0, "": 2.5}[m.group(4)]
    return rows * cols / 2 + rows * (cols // group) * per_group


def group_fits(scheme: str, shapes: list[tuple[int, int]]) -> bool:
    m = SCHEME.fullmatch(scheme)
    group = m and (m.group(3) or m.group(5))
    return not group or all(c % int(group) == 0 for _, c in shapes)


@dataclass(frozen=True)
class Compression:
    """One combination of techniques; the planner orders these from least to most lossy."""

    name: str
    weights: dict[str, str]  # tensor group -> scheme
    kv_dtype: str = "fp16"  # fp32 | fp16 | bf16 | int8
    mlp_prune: float = 0.0  # fraction of MLP channels removed (structured)
    low_rank: float | None = None  # fraction of parameters kept by SVD factorization of blocks

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def weight_bytes(spec: ModelSpec, c: Compression) -> dict[str, float]:
    """Stored bytes per tensor group (norms and biases included under 'other')."""
    out = {}
    for group, shapes in matrices(spec, 1.0 - c.mlp_prune).items():
        total = sum(scheme_bytes(c.weights[group], r, k) for r, k in shapes)
        if c.low_rank is not None and group in ("attention", "mlp"):
            total *= c.low_rank
        out[group] = total
    per_layer = (4 if spec.sandwich_norms else 2) * spec.hidden_size
    per_layer += 2 * spec.head_dim if spec.qk_norm else 0
    norms = spec.num_layers * per_layer + spec.hidden_size
    bias = spec.num_layers * (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    out["other"] = (norms + (bias if spec.attention_bias else 0)) * 4.0
    return out


def kv_positions(spec: ModelSpec, context: int, windowed: bool = False) -> int:
    """Cache positions summed over the layers: each holds `context`, or with `windowed` a
    sliding-window layer holds at most its window (what a windowed cache would keep)."""
    window = spec.sliding_window or context
    return sum(
        min(context, window) if windowed and kind == "sliding" else context
        for kind in spec.layer_kinds
    )


def kv_cache_bytes(
    spec: ModelSpec, context: int, batch: int, dtype: str, windowed: bool = False
) -> float:
    """2 (K and V) x kv_heads x head_dim x batch x bytes x the positions each layer holds
    (`kv_positions`) (+ int8 scales). The runtimes here allocate `context` on every layer,
    sliding or not: the estimates use that; `windowed` gives what a windowed cache needs."""
    cells = 2 * spec.num_kv_heads * kv_positions(spec, context, windowed) * batch
    if dtype == "int8":
        return cells * spec.head_dim * 1 + cells * 2.0  # a fp16 scale per token and head
    return cells * spec.head_dim * FLOAT_BYTES[dtype]


def activation_bytes(spec: ModelSpec, context: int, batch: int, act_bytes: float) -> float:
    """Peak working memory of one prefill chunk plus the last-position logits."""
    chunk = min(context, PREFILL_CHUNK)
    h, inter = spec.hidden_size, spec.intermediate_size
    qkv = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    return batch * chunk * (4 * h + 3 * inter + qkv) * act_bytes + batch * spec.vocab_size * 4


@dataclass(frozen=True)
class Estimate:
    weights: float
    kv_cache: float
    activations: float
    overhead: float
    total: float
    quick_formula: float  # the quick rule: params x bytes/param x (1 + 0.2)
    decode_tok_s: float
    ms_per_token: float
    prefill_tok_s: float
    bound: str  # "memory" or "compute" for decode
    draft: float = 0.0  # a speculative draft model's weights + KV cache, included in total
    # decode with a short history (SHORT_HISTORY tokens in the cache, or as many as the main
    # figure's if fewer): a conversation's start, where decode_tok_s is the cache half full
    decode_tok_s_short: float = 0.0
    short_history: int = 0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


SHORT_HISTORY = 256  # tokens in the cache for the "short history" decode figure


def runtime_overhead(runtime: str, kind: str) -> float:
    """Resident bytes of `runtime` with no model on a device of `kind` (its target's record)."""
    from infopt.runtimes.registry import targets

    known = targets().get(runtime)
    return known.overhead.get(kind, DEFAULT_OVERHEAD) if known else DEFAULT_OVERHEAD


def as_held(c: Compression, runtime: str, profile: DeviceProfile) -> Compression:
    """`c` with the groups `runtime` holds as float32 on this device said so (for pricing)."""
    from infopt.runtimes.registry import targets

    known = targets().get(runtime)
    if profile.kind != "cpu" or known is None or not known.float_schemes:
        return c
    held = {g: "fp32" if s.startswith(known.float_schemes) else s for g, s in c.weights.items()}
    return c if held == c.weights else replace(c, weights=held)


def storage_class(c: Compression) -> str:
    """How the blocks of `c` are stored, as runtimes' efficiencies are keyed: fp32, fp16 (bf16
    too), int8, int4, or int4m (INT4 with float offsets, a GGUF's Q4_1: some runtimes need
    extra work for the offsets)."""
    scheme = c.weights["mlp"]
    if scheme.startswith("int4m"):
        return "int4m"
    if scheme.startswith(("int4", "int8")):
        return scheme[:4]
    return "fp32" if scheme == "fp32" else "fp16"


def decode_efficiency(runtime: str, profile: DeviceProfile, c: Compression) -> float:
    """The achieved fraction of `profile`'s bandwidth decoding `c` on `runtime`: the runtime's
    own measurement on a CPU where it has one, else the profile's figure."""
    from infopt.runtimes.registry import targets

    known = targets().get(runtime)
    if profile.kind == "cpu" and known is not None:
        kind = storage_class(c)
        own = known.cpu_decode_efficiency.get(kind)
        if own is None and kind == "int4m":
            own = known.cpu_decode_efficiency.get("int4")
        if own is not None:
            return own
    return profile.decode_efficiency


def compute_precision(profile: DeviceProfile) -> str:
    """Activations/compute precision the device runs this plan in."""
    if profile.kind == "cpu":
        return "fp32"
    for p in ("bf16", "fp16"):
        if p in profile.compute_precisions:
            return p
    return "fp32"


def estimate(
    spec: ModelSpec,
    profile: DeviceProfile,
    c: Compression,
    *,
    context: int,
    batch: int = 1,
    runtime: str | None = None,
    decode_context: float | None = None,
    draft: float = 0.0,
) -> Estimate:
    """Memory (bytes) and speed (tokens/s) of `spec` compressed as `c` on `profile`.
    `context` sizes the KV cache; `decode_context` is the average number of tokens in it while
    decoding (default: half of `context`)."""
    runtime = runtime or profile.runtimes[0]
    per_group = weight_bytes(spec, as_held(c, runtime, profile))
    weights = sum(per_group.values())
    kv = kv_cache_bytes(spec, context, batch, c.kv_dtype)
    precision = compute_precision(profile)
    act = activation_bytes(spec, context, batch, FLOAT_BYTES.get(precision, 4.0))
    overhead = runtime_overhead(runtime, profile.kind)
    # Decode reads every matrix once per step (the embedding only one row, unless tied to the
    # LM head) and each sequence's KV cache at its current length (half the window on average).
    matrix_bytes = weights - (per_group["embeddings"] if per_group["lm_head"] else 0.0)
    bandwidth = profile.bandwidth * decode_efficiency(runtime, profile, c)
    matmul_params = sum(
        r * k for shapes in matrices(spec, 1 - c.mlp_prune).values() for r, k in shapes
    ) - (spec.vocab_size * spec.hidden_size if not spec.tie_word_embeddings else 0)
    if c.low_rank is not None:
        matmul_params = int(matmul_params * c.low_rank)
    peak = profile.peak_compute.get(
        precision,
        profile.peak_compute["fp32"]
        if "fp32" in profile.peak_compute
        else max(profile.peak_compute.values()),
    )
    achieved = peak * profile.prefill_efficiency

    def step_times(filled: float) -> tuple[float, float, float]:
        """(memory time, compute time, FLOPs) of one decode step with `filled` tokens cached."""
        flops = 2 * matmul_params + 4 * spec.num_layers * spec.num_heads * spec.head_dim * filled
        return (matrix_bytes + kv * filled / context) / bandwidth, batch * flops / achieved, flops

    filled = context / 2 if decode_context is None else decode_context
    mem_time, compute_time, flops_token = step_times(filled)
    step = max(mem_time, compute_time)
    short = int(min(SHORT_HISTORY, filled))  # a start: never further in than the main figure
    short_step = max(step_times(short)[:2])
    return Estimate(
        weights=weights,
        kv_cache=kv,
        activations=act,
        overhead=overhead,
        total=weights + kv + act + overhead + draft,
        quick_formula=weights * (1 + QUICK_KV_COEFFICIENT),
        decode_tok_s=batch / step,
        ms_per_token=step * 1000,
        prefill_tok_s=achieved / flops_token,
        bound="memory" if mem_time >= compute_time else "compute",
        draft=draft,
        decode_tok_s_short=batch / short_step,
        short_history=short,
    )


def self_draft(c: Compression, group: int = 32) -> Compression | None:
    """The INT4 self-draft of plan `c` (speculative decoding): its blocks INT4 g`group`, its
    embeddings/LM head INT8, its pruning and low rank; None when `c` is INT4 already (the draft
    would be the target itself)."""
    if any(c.weights[g].startswith("int4") for g in ("attention", "mlp")):
        return None
    weights = {
        "embeddings": "int8",
        "lm_head": "int8",
        "attention": f"int4-g{group}",
        "mlp": f"int4-g{group}",
    }
    return replace(c, name=f"self-draft int4 g{group}", weights=weights)


def draft_bytes(spec: ModelSpec, draft: Compression, context: int, batch: int) -> float:
    """A draft model's memory: its weights and its own KV cache over the same window."""
    return sum(weight_bytes(spec, draft).values()) + kv_cache_bytes(
        spec, context, batch, draft.kv_dtype
    )


def with_kv(c: Compression, dtype: str) -> Compression:
    return replace(c, kv_dtype=dtype, name=f"{c.name} + kv {dtype}")
