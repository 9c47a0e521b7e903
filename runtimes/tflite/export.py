"""Export the model core to a LiteRT (.tflite) model for Android apps and the XNNPACK CPU path.

litert-torch converts the PyTorch core (no TensorFlow) into one flatbuffer with three signatures
that share the weights, each a fixed window of tokens:

- `decode`: 1 token;  `verify`: VERIFY tokens (k+1 speculative tokens, padded);
- `prefill`: PREFILL tokens (a prompt chunk, padded) with the LM head on one position, `last`.

The KV cache is passed in, not kept inside the model: inputs `k_cache` / `v_cache` float32
[layers, kv_heads, max_context, head_dim]; outputs `logits` and only the new entries `k_new` /
`v_new` [layers, kv_heads, window, head_dim], which the caller writes at `input_pos`. The graph
only reads the cache: each query attends to the cache slots before the window and to the
window's own keys, in one softmax, so no call copies the cache. Padded tokens take the positions
after the real ones, where the causal mask hides them from every real query. Quantized weights
come back as LiteRT's own symmetric INT8 (per channel) / INT4 (per block) tensors through
ai-edge-quantizer, whose min-max rule (scale = max|w| / qmax) recovers infopt's own symmetric
codes and scales from the dequantized values; asymmetric INT4 (zero-points) has no LiteRT kernel
and is refused.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from infopt.core.model import Decoder, soft_cap
from infopt.core.quant import QuantScheme, float_copy
from infopt.core.quiet import quiet_native
from infopt.errors import InvalidArgumentError, RuntimeNotAvailableError
from infopt.runtimes.base import Exported
from infopt.runtimes.tflite import TARGET

FILE = "model.tflite"
DECODE, VERIFY, PREFILL = 1, 8, 64
SIGNATURES = {"decode": DECODE, "verify": VERIFY, "prefill": PREFILL}
LOGGERS = ("absl", "litert_torch", "ai_edge_quantizer")  # the converter's Python loggers
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Step(nn.Module):
    """One fixed-window call of `core` with an explicit KV cache (see the module doc)."""

    def __init__(self, core: Decoder) -> None:
        super().__init__()
        self.core = core

    def mask(self, pos: torch.Tensor, length: int, kind: str) -> torch.Tensor:
        """Additive mask [W, length + W]: a query sees the cache slots before the window's first
        position and the window's keys up to its own (within the sliding window, for a layer of
        that kind)."""
        slots = torch.arange(length)[None, :]
        old = slots < pos[:1, None]
        new = pos[None, :] <= pos[:, None]
        if (sliding := self.core.spec.window_of(kind)) is not None:
            old = old & (slots > pos[:, None] - sliding)
            new = new & (pos[None, :] > pos[:, None] - sliding)
        visible = torch.cat((old.expand(len(pos), length), new), dim=1)
        return torch.where(visible, 0.0, float("-inf"))

    def forward(
        self,
        tokens: torch.Tensor,  # int32 [1, W]
        input_pos: torch.Tensor,  # int32 [W]
        k_cache: torch.Tensor,  # [L, kv_heads, cache_len, D]
        v_cache: torch.Tensor,
        last: torch.Tensor | None = None,  # int32 [1]: the one position given logits
    ) -> dict[str, torch.Tensor]:
        m, pos = self.core, input_pos.long()
        x = m.embed(tokens.long())
        length = k_cache.shape[2]
        kinds = set(m.spec.layer_kinds)
        masks = {kind: self.mask(pos, length, kind) for kind in kinds}  # additive
        ropes = {kind: m.rope_at(kind, pos) for kind in kinds}
        new_k, new_v = [], []
        for i, block in enumerate(m.blocks):
            a = block.self_attn
            t, groups = x.shape[1], a.n_heads // a.n_kv
            q, k, v = a.project(block.input_layernorm(x), *ropes[a.kind])
            new_k.append(k[0])
            new_v.append(v[0])
            # GQA as in the core; softmax over the cached keys and the window's own keys together,
            # so the cache is only read: no copy of it with the new entries written in
            q = q.reshape(1, a.n_kv, groups * t, a.head_dim) * a.scale
            cached = k_cache[i][None]
            scores = torch.cat((q @ cached.transpose(-1, -2), q @ k.transpose(-1, -2)), dim=-1)
            scores = soft_cap(scores, a.softcap)
            p = torch.softmax(scores + masks[a.kind].repeat(groups, 1), dim=-1)
            out = p[..., :length] @ v_cache[i][None] + p[..., length:] @ v
            out = out.view(1, a.n_heads, t, a.head_dim).transpose(1, 2).reshape(1, t, -1)
            x = block.ffn(block.attn_residual(x, a.o_proj(out)))
        if last is not None:
            x = x.index_select(1, last.long())
        return {
            "logits": m.head(x),
            "k_new": torch.stack(new_k),
            "v_new": torch.stack(new_v),
        }


def cache_len(max_context: int) -> int:
    """Cache slots: one per position of the context (the window's own keys are not written in)."""
    return max_context


def check_schemes(schemes: dict[str, QuantScheme]) -> dict[str, QuantScheme]:
    """The LiteRT scheme of each quantized layer kind (`q_proj`, ..., `lm_head`, `embed_tokens`),
    one per kind as infopt's plans give; refuses what LiteRT cannot hold."""
    kinds: dict[str, QuantScheme] = {}
    for name, s in schemes.items():
        if s.bits == 4 and not s.symmetric:
            raise InvalidArgumentError(
                f"{name}: weight scheme {s.name}: LiteRT's INT4 kernels are symmetric (no "
                f"zero-points); use int4s-g{s.group_size} for a tflite artifact"
            )
        if s.bits == 8 and s.group_size:
            raise InvalidArgumentError(
                f"{name}: weight scheme {s.name}: infopt's LiteRT export carries INT8 per channel; "
                "use int8"
            )
        if s.bits == 4 and s.group_size not in (32, 64, 128, 256):
            raise InvalidArgumentError(
                f"{name}: weight scheme {s.name}: LiteRT's INT4 blocks are 32, 64, 128 or 256 wide"
            )
        kind = name.rpartition(".")[2]
        if kinds.setdefault(kind, s) != s:
            raise InvalidArgumentError(f"{kind} layers mix {kinds[kind].name} and {s.name}")
    return kinds


def _granularity(scheme: QuantScheme) -> Any:
    from ai_edge_quantizer import qtyping

    if scheme.group_size is None:
        return qtyping.QuantGranularity.CHANNELWISE
    return getattr(qtyping.QuantGranularity, f"BLOCKWISE_{scheme.group_size}")


def _recipe(kinds: dict[str, QuantScheme]) -> Any:
    """Dynamic-range quantization (weights stored as the plan says, activations quantized per
    call by XNNPACK's integer kernels). Scopes are litert-torch's op names, which carry the torch
    module path; a later rule wins, so the LM head / embedding rule comes first."""
    from ai_edge_quantizer import qtyping, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    fc, lookup = qtyping.TFLOperationName.FULLY_CONNECTED, qtyping.TFLOperationName.EMBEDDING_LOOKUP
    manager = recipe_manager.RecipeManager()
    if head := kinds.get("lm_head"):
        manager.add_dynamic_config(".*", fc, head.bits, _granularity(head))
    if embed := kinds.get("embed_tokens"):
        manager.add_dynamic_config(".*", lookup, embed.bits, _granularity(embed))
    for kind in BLOCK_LINEARS:
        scope = rf"modules\.linear\.Linear_{kind};"
        if scheme := kinds.get(kind):
            manager.add_dynamic_config(scope, fc, scheme.bits, _granularity(scheme))
        else:  # a float layer stays float whatever the LM head's rule says
            manager.add_quantization_config(scope, fc, algorithm_key=AlgorithmName.NO_QUANTIZE)
    return manager.get_quantization_recipe()


def sample_inputs(spec: Any, max_context: int, window: int) -> dict[str, torch.Tensor]:
    cache = torch.zeros(spec.num_layers, spec.num_kv_heads, cache_len(max_context), spec.head_dim)
    inputs = {
        "tokens": torch.zeros(1, window, dtype=torch.int32),
        "input_pos": torch.arange(window, dtype=torch.int32),
        "k_cache": cache,
        "v_cache": cache.clone(),
    }
    if window == PREFILL:
        inputs["last"] = torch.tensor([window - 1], dtype=torch.int32)
    return inputs


def _converter() -> Any:
    try:
        with quiet_native("litert-torch", LOGGERS):  # torchao and torch log at import
            import ai_edge_quantizer  # noqa: F401
            import litert_torch
    except ImportError as e:
        raise RuntimeNotAvailableError(
            f"building a tflite artifact needs litert-torch and ai-edge-quantizer ({e}); "
            "install them with: pip install 'infopt[tflite-convert]'"
        ) from e
    return litert_torch


def export_tflite(core: Decoder, path: str | Path, max_context: int) -> list[str]:
    """Write `core` (as compressed) to `path` as a .tflite model; returns the files written."""
    litert_torch = _converter()

    model, schemes = float_copy(core)
    kinds = check_schemes(schemes)
    # RoPE tables: padded positions run past the end (the model still serves max_context)
    model.setup_cache(max_context + PREFILL, context=max_context)
    step = _Step(model).eval()
    converter = None
    for name, window in SIGNATURES.items():
        inputs = sample_inputs(core.spec, max_context, window)
        converter = (litert_torch if converter is None else converter).signature(
            name, step, sample_kwargs=inputs
        )
    assert converter is not None
    path = Path(path)
    with quiet_native("litert-torch", LOGGERS), torch.no_grad():
        edge = converter.convert()
        if not kinds:
            edge.export(str(path))
            return [path.name]
        from ai_edge_quantizer import quantizer

        with tempfile.TemporaryDirectory(prefix="infopt-tflite-") as tmp:
            float_path = Path(tmp) / FILE
            edge.export(str(float_path))
            q = quantizer.Quantizer(str(float_path), _recipe(kinds))
            result = q.quantize(enable_progress_bar=False, enable_progress_report=False)
    path.write_bytes(bytes(result.quantized_model))
    return [path.name]


def tflite_io(core: Decoder, max_context: int) -> dict[str, Any]:
    """What an app needs to call the model itself (the manifest's tflite artifact section)."""
    spec = core.spec
    cache = [spec.num_layers, spec.num_kv_heads, cache_len(max_context), spec.head_dim]
    return {
        "signatures": {
            name: {
                "window": window,
                "inputs": ["tokens", "input_pos", "k_cache", "v_cache"]
                + (["last"] if window == PREFILL else []),
                "outputs": ["logits", "k_new", "v_new"],
            }
            for name, window in SIGNATURES.items()
        },
        "cache_shape": cache,
        "cache_dtype": "float32",
        "padding": "positions after the last real token; the causal mask hides them",
    }


def artifact(core: Decoder, max_context: int, prefix: str = "") -> Exported:
    """The manifest entry of the artifact and the writer of its file (under `prefix`)."""
    entry = {
        "files": [f"{prefix}{FILE}"],
        "format": "tflite",
        "max_context": max_context,
        "kv_dtype": "fp32",
        "requires": TARGET.installed_requirement(),
        **tflite_io(core, max_context),
    }
    return entry, {f"{prefix}{FILE}": lambda path: export_tflite(core, path, max_context)}
