"""ModelSpec: the architecture of a decoder-only LLM, as plain typed data.

Built from a Hugging Face `config.json` dict or from GGUF metadata; the planner needs nothing else.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from infopt.errors import ModelFormatError, UnsupportedModelError

# HF `architectures` entry -> our family name. Families share one model core; they differ only in
# the flags of ModelSpec (Qwen2 adds q/k/v bias, Qwen3 QK-norm, Gemma sandwich norms, GeGLU,
# scaled embeddings and sliding-window layers, Gemma 2 soft-capping, Phi-3 LongRoPE).
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
}
# HF `model_type` of configs saved without `architectures`
MODEL_TYPES = {**{v: v for v in ARCHITECTURES.values()}, "gemma3_text": "gemma3"}
GEMMA = ("gemma2", "gemma3")  # norms stored as w, applied as (1 + w): infopt keeps 1 + w
# "freq_factors": a divisor per frequency, as llama.cpp stores Llama 3.1+'s scaling in GGUF
# (`rope_freqs`: the llama3 rule already applied)
ROPE_TYPES = ("default", "linear", "llama3", "longrope", "freq_factors")
ROPE_KEYS: dict[str, tuple[str, ...]] = {  # the numbers each scaling type reads
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("original_max_position_embeddings",),
    "freq_factors": (),
}
LAYER_KINDS = ("full", "sliding")
ACTIVATIONS = ("silu", "gelu_tanh")  # of the gated MLP: SwiGLU, GeGLU
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class ModelSpec:
    architecture: str  # one of ARCHITECTURES' values
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF's dict, with "rope_type" in ROPE_TYPES
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    sliding_window: int | None = None  # keys a sliding layer sees, its own included
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # per layer "full" or "sliding"; None: every layer sliding when sliding_window is set
    # (Mistral v0.1, Phi-3), else every layer full
    layer_types: tuple[str, ...] | None = None
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # norms after attention and after the MLP too (Gemma 2 / 3)
    hidden_act: str = "silu"  # of the gated MLP, one of ACTIVATIONS
    embed_scale: float | None = None  # embeddings multiplied by it (Gemma: sqrt(hidden))
    attn_scale: float | None = None  # of q.k; None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # the same on the logits
    rope_local_theta: float | None = None  # RoPE base of sliding layers, unscaled (Gemma 3)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelFormatError(
                    f"model config: {name} must be a positive integer, got {value!r}"
                )
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(
                f"model config: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ModelFormatError(f"model config: head_dim={self.head_dim} must be even for RoPE")
        for name, top in (("rms_norm_eps", 1.0), ("rope_theta", math.inf)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or not 0 < value < top:
                raise ModelFormatError(
                    f"model config: {name} must be a finite number in (0, {top:g}), got {value!r}"
                )
        for i in (self.bos_token_id, *self.eos_token_ids):
            if i is not None and not (isinstance(i, int) and 0 <= i < self.vocab_size):
                raise ModelFormatError(
                    f"model config: token id {i!r} (BOS/EOS) is outside the vocabulary of "
                    f"{self.vocab_size}"
                )
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ModelFormatError(f"model config: rope_scaling = {self.rope_scaling!r}")
        window = self.sliding_window
        if window is not None and (not isinstance(window, int) or window <= 0):
            raise ModelFormatError(f"model config: sliding_window = {window!r}")
        if self.layer_types is not None:
            kinds = self.layer_types
            if (
                not isinstance(kinds, tuple)
                or len(kinds) != self.num_layers
                or any(k not in LAYER_KINDS for k in kinds)
            ):
                raise ModelFormatError(
                    f"model config: layer_types = {kinds!r}: expected {self.num_layers} of "
                    f"{list(LAYER_KINDS)}"
                )
            if "sliding" in kinds and window is None:
                raise ModelFormatError("model config: sliding layers without a sliding_window")
        if self.hidden_act not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"activation {self.hidden_act!r} is not supported; supported: {list(ACTIVATIONS)}"
            )
        for name in ("embed_scale", "attn_scale", "attn_softcap", "final_softcap",
                     "rope_local_theta"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and not _positive_finite(value):
                raise ModelFormatError(f"model config: {name} = {value!r}, not a number > 0")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_scaling type {rope_type!r} is not supported; supported: {list(ROPE_TYPES)}"
            )
        for key in ROPE_KEYS[rope_type]:
            value = (self.rope_scaling or {}).get(key)
            if not _positive_finite(value):
                raise ModelFormatError(
                    f"model config: rope_scaling {rope_type} needs {key} > 0, got {value!r}"
                )
        if rope_type == "llama3" and self.rope_scaling is not None:
            low, high = (self.rope_scaling[k] for k in ("low_freq_factor", "high_freq_factor"))
            if high <= low:
                raise ModelFormatError(
                    f"model config: rope_scaling llama3 needs high_freq_factor ({high!r}) > "
                    f"low_freq_factor ({low!r})"
                )
        if rope_type in ("longrope", "freq_factors") and self.rope_scaling is not None:
            keys = ("short_factor", "long_factor") if rope_type == "longrope" else ("factors",)
            for key in keys:
                value = self.rope_scaling.get(key)
                if (
                    not isinstance(value, (list, tuple))
                    or len(value) != self.head_dim // 2
                    or (not all(_positive_finite(f) for f in value))
                ):
                    raise ModelFormatError(
                        f"model config: rope_scaling {rope_type} needs {key}: "
                        f"{self.head_dim // 2} numbers > 0, got {value!r}"
                    )
            for key in ("factor", "attention_factor"):
                value = self.rope_scaling.get(key)
                if value is not None and not _positive_finite(value):
                    raise ModelFormatError(
                        f"model config: rope_scaling longrope {key} = {value!r}, not a number > 0"
                    )

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """Each layer's attention: "full" or "sliding" (sees the last sliding_window keys)."""
        if self.layer_types is not None:
            return self.layer_types
        return ("sliding" if self.sliding_window else "full",) * self.num_layers

    def window_of(self, kind: str) -> int | None:
        """The keys a layer of `kind` sees (its own position included); None: all before it."""
        return self.sliding_window if kind == "sliding" else None

    def rope_of(self, kind: str) -> tuple[float, dict[str, Any] | None]:
        """(RoPE base, scaling) of a layer of `kind`."""
        if kind == "sliding" and self.rope_local_theta is not None:
            return self.rope_local_theta, None
        return self.rope_theta, self.rope_scaling

    @property
    def num_params(self) -> int:
        """Parameter count, from the config alone (no weights needed)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        attn += 2 * self.head_dim if self.qk_norm else 0
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + (4 if self.sandwich_norms else 2) * h
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + self.num_layers * per_layer + h + head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def expected_shape(spec: ModelSpec, name: str) -> tuple[int, ...] | None:
    """The shape (HF order: [out, in]) tensor `name` has in `spec`; None for an unknown name."""
    h, hd, inter = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd
    whole = {
        "embed_tokens.weight": (spec.vocab_size, h),
        "norm.weight": (h,),
        "lm_head.weight": (spec.vocab_size, h),
    }
    if name in whole:
        return whole[name]
    parts = name.split(".", 2)
    if parts[0] != "layers" or len(parts) < 3 or not parts[1].isdigit():
        return None
    if int(parts[1]) >= spec.num_layers:
        return None
    return {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "pre_feedforward_layernorm.weight": (h,),
        "post_feedforward_layernorm.weight": (h,),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "self_attn.qkv_proj.weight": (q + 2 * kv, h),  # Phi-3's fused forms, split on import
        "mlp.gate_up_proj.weight": (2 * inter, h),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
    }.get(parts[2])


def _positive_finite(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return math.isfinite(value) and value > 0


def _get(config: dict[str, Any], key: str, default: Any = None, *, required: bool = False) -> Any:
    if key in config and config[key] is not None:
        return config[key]
    if required:
        raise ModelFormatError(f"config.json: missing required key {key!r}")
    return default


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    return tuple(_token_id(i) for i in ids)  # type: ignore[misc]


def _normalize_rope_scaling(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    if not raw:
        return None
    scaling = dict(raw)
    scaling["rope_type"] = scaling.pop("type", None) or scaling.get("rope_type", "default")
    return None if scaling["rope_type"] == "default" and len(scaling) == 1 else scaling


def spec_from_hf_config(config: dict[str, Any]) -> ModelSpec:
    """ModelSpec from a parsed HF `config.json`; unsupported architectures get a typed error,
    a key of the wrong type or range a `ModelFormatError` naming it."""
    names = config.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ModelFormatError(f"config.json: architectures = {names!r}, not a list of names")
    family = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None)
    model_type = config.get("model_type")
    if family is None and not names and isinstance(model_type, str):
        family = MODEL_TYPES.get(model_type)  # configs saved without `architectures`
    if family is None:
        shown = names or model_type
        raise UnsupportedModelError(
            f"architecture {shown!r} is not supported; supported: {sorted(ARCHITECTURES)}"
        )
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    layers = _int(config, "num_hidden_layers")
    head_dim = _int(config, "head_dim", hidden // heads)
    window = _int(config, "sliding_window", None)
    if family in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
        window = None
    rope_key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    rope = config.get(rope_key)
    if rope is not None and not isinstance(rope, dict):
        raise ModelFormatError(f"config.json: {rope_key} = {rope!r}, not an object")
    local_theta = None
    if family == "gemma3":  # RoPE per layer kind: {"full_attention": {...}, "sliding_attention"}
        per_kind = rope if rope and "full_attention" in rope else {}
        local, rope = (
            per_kind.get("sliding_attention") or {},
            per_kind.get("full_attention") or (rope if not per_kind else None),
        )
        for value in (local, rope):
            if value is not None and not isinstance(value, dict):
                raise ModelFormatError(f"config.json: {rope_key} = {per_kind!r}, not objects")
        local_theta = _number(
            config,
            "rope_local_base_freq",
            local.get("rope_theta", _get(config, "rope_local_base_freq", 10000.0)),
        )
    theta = _get(config, "rope_theta", None)
    if theta is None:
        theta = (rope or {}).get("rope_theta", 1e6 if family == "gemma3" else 10000.0)
    scaling = dict(rope or {})
    if scaling.get("rope_type", scaling.get("type")) in ("su", "yarn") and family == "phi3":
        scaling["rope_type"] = "longrope"  # Phi-3's old names for it, as transformers reads them
        scaling.pop("type", None)
    if (scaling.get("rope_type") or scaling.get("type")) == "longrope":
        scaling.setdefault(
            "original_max_position_embeddings", config.get("original_max_position_embeddings")
        )
    partial = scaling.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (1, 1.0, None):
        raise UnsupportedModelError(
            f"partial_rotary_factor {partial!r} (RoPE on part of each head) is not supported"
        )
    act = config.get("hidden_activation") or config.get("hidden_act") or "silu"
    if not isinstance(act, str) or act not in _HF_ACTIVATIONS:
        raise UnsupportedModelError(
            f"activation {act!r} is not supported; supported: {sorted(_HF_ACTIVATIONS)}"
        )
    kinds = config.get("layer_types")
    if kinds is None and family in GEMMA:  # older configs: every n-th layer full
        every = _int(config, "sliding_window_pattern", 6 if family == "gemma3" else 2)
        kinds = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                 for i in range(layers)]  # fmt: skip
    layer_types = _layer_types(kinds)
    if layer_types is not None and (window is None or "sliding" not in layer_types):
        layer_types, window = None, None  # every layer full
    gemma = family in GEMMA
    scalar = _get(config, "query_pre_attn_scalar", 256)  # transformers' Gemma default
    return ModelSpec(
        architecture=family,
        vocab_size=_int(config, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(config, "intermediate_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=_int(config, "num_key_value_heads", heads),
        head_dim=head_dim,
        max_position_embeddings=_int(config, "max_position_embeddings", 2048),
        rms_norm_eps=_number(config, "rms_norm_eps", _get(config, "rms_norm_eps", 1e-6)),
        rope_theta=_number(config, "rope_theta", theta),
        rope_scaling=_normalize_rope_scaling(
            {k: v for k, v in scaling.items() if k != "rope_theta"}
        ),
        tie_word_embeddings=bool(_get(config, "tie_word_embeddings", gemma)),
        attention_bias=family == "qwen2" or bool(config.get("attention_bias") or False),
        sliding_window=window,
        bos_token_id=_token_id(config.get("bos_token_id")),
        eos_token_ids=_eos_ids(config.get("eos_token_id")),
        layer_types=layer_types,
        qk_norm=family in ("qwen3", "gemma3"),
        sandwich_norms=gemma,
        hidden_act=_HF_ACTIVATIONS[act],
        embed_scale=float(hidden) ** 0.5 if gemma else None,
        attn_scale=_positive(config, "query_pre_attn_scalar", scalar) ** -0.5 if gemma else None,
        attn_softcap=_optional_number(config, "attn_logit_softcapping") if gemma else None,
        final_softcap=_optional_number(config, "final_logit_softcapping") if gemma else None,
        rope_local_theta=local_theta,
    )


def _layer_types(kinds: Any) -> tuple[str, ...] | None:
    if kinds is None:
        return None
    names = {"full_attention": "full", "sliding_attention": "sliding"}
    if not isinstance(kinds, list) or not all(isinstance(k, str) and k in names for k in kinds):
        raise UnsupportedModelError(
            f"config.json: layer_types = {kinds!r}; supported kinds: {sorted(names)}"
        )
    return tuple(names[k] for k in kinds)


def _positive(config: dict[str, Any], key: str, value: Any) -> float:
    number = _number(config, key, value)
    if not _positive_finite(number):
        raise ModelFormatError(f"config.json: {key} = {value!r}, not a number > 0")
    return number


def _optional_number(config: dict[str, Any], key: str) -> float | None:
    value = config.get(key)
    return None if value is None else _number(config, key, value)


_REQUIRED = object()


def _int(config: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    """A positive integer under `key` (or `default` when absent or null)."""
    value = _get(config, key, None if default is _REQUIRED else default,
                 required=default is _REQUIRED)  # fmt: skip
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ModelFormatError(f"config.json: {key} = {value!r}, not a positive integer")
    return value


def _number(config: dict[str, Any], key: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ModelFormatError(f"config.json: {key} = {value!r}, not a number")
    return float(value)


def _token_id(value: Any) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ModelFormatError(f"config.json: token id {value!r} is not an integer")
    return value


def spec_from_dict(data: dict[str, object]) -> ModelSpec:
    """ModelSpec from `ModelSpec.to_dict()` output (a bundle manifest, a weight file header)."""
    if not isinstance(data, dict):
        raise ModelFormatError(f"model config: {data!r} is not an object")
    known = {f.name for f in fields(ModelSpec)}
    values = {k: v for k, v in data.items() if k in known}
    required = [f.name for f in fields(ModelSpec) if f.default is MISSING and
                f.default_factory is MISSING]  # fmt: skip
    missing = [k for k in required if k not in values]
    if missing:
        raise ModelFormatError(f"model config: missing {missing}")
    eos = values.get("eos_token_ids") or ()
    if not isinstance(eos, (list, tuple)):
        raise ModelFormatError(f"model config: eos_token_ids = {eos!r} is not a list")
    values["eos_token_ids"] = tuple(eos)
    kinds = values.get("layer_types")
    if kinds is not None:
        if not isinstance(kinds, (list, tuple)):
            raise ModelFormatError(f"model config: layer_types = {kinds!r} is not a list")
        values["layer_types"] = tuple(kinds)
    return ModelSpec(**values)  # type: ignore[arg-type]
