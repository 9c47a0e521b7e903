"""ModelSpec: the architecture of a decoder-only LLM, as plain typed data.

Built from a Hugging Face `config.json` dict or from GGUF metadata; the planner needs nothing else.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from infopt.errors import ModelFormatError, UnsupportedModelError

# HF `architectures` entry -> our family name. Families share one model core; they differ only in
# the flags below (Qwen2 adds q/k/v bias).
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
ROPE_TYPES = ("default", "linear", "llama3")
ROPE_KEYS: dict[str, tuple[str, ...]] = {  # the numbers each scaling type reads
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


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
    sliding_window: int | None = None  # Mistral v0.1
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

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

    @property
    def num_params(self) -> int:
        """Parameter count, from the config alone (no weights needed)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
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
    if family is None and not names and model_type in ARCHITECTURES.values():
        family = model_type  # configs saved without `architectures`
    if family is None:
        shown = names or model_type
        raise UnsupportedModelError(
            f"architecture {shown!r} is not supported; supported: {sorted(ARCHITECTURES)}"
        )
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    window = _int(config, "sliding_window", None)
    if family == "qwen2" and not config.get("use_sliding_window", False):
        window = None
    rope_key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    rope = config.get(rope_key)
    if rope is not None and not isinstance(rope, dict):
        raise ModelFormatError(f"config.json: {rope_key} = {rope!r}, not an object")
    theta = _get(config, "rope_theta", None)
    if theta is None:
        theta = (rope or {}).get("rope_theta", 10000.0)
    return ModelSpec(
        architecture=family,
        vocab_size=_int(config, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(config, "intermediate_size"),
        num_layers=_int(config, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=_int(config, "num_key_value_heads", heads),
        head_dim=_int(config, "head_dim", hidden // heads),
        max_position_embeddings=_int(config, "max_position_embeddings", 2048),
        rms_norm_eps=_number(config, "rms_norm_eps", _get(config, "rms_norm_eps", 1e-6)),
        rope_theta=_number(config, "rope_theta", theta),
        rope_scaling=_normalize_rope_scaling(
            {k: v for k, v in (rope or {}).items() if k != "rope_theta"}
        ),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
        sliding_window=window,
        bos_token_id=_token_id(config.get("bos_token_id")),
        eos_token_ids=_eos_ids(config.get("eos_token_id")),
    )


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
    return ModelSpec(**values)  # type: ignore[arg-type]
