"""TFLite / LiteRT: one .tflite model with decode, verify and prefill signatures over a KV cache
the app holds, for Android apps and the XNNPACK CPU path; INT8/INT4 weights as LiteRT's own
(symmetric) tensors."""

from collections.abc import Mapping
from typing import Any

from infopt.core.schema import COUNT, INTS, STR, STRS, typed
from infopt.runtimes.registry import Rows, Target


def describe(artifact: Mapping[str, Any]) -> Rows:
    """What an app calling the model itself needs: its signatures' windows and the cache."""
    sigs = ", ".join(f"{n} {s['window']}" for n, s in artifact["signatures"].items())
    return [
        ("tflite signatures", f"{sigs} tokens; inputs tokens, input_pos, k/v_cache"),
        ("tflite KV cache", f"{artifact['cache_shape']} {artifact['cache_dtype']}, app-held"),
    ]


TARGET = Target(
    kv_dtype="fp32",  # the cache tensors of the exported signatures
    title="LiteRT (TFLite)",
    extra="tflite",
    requirement="ai-edge-litert>=2.3",
    stand_ins=("tflite-runtime",),  # the older package, same interpreter API
    build_modules=("litert_torch", "ai_edge_quantizer"),  # converting needs no TensorFlow
    build_extra="tflite-convert",
    symmetric_int4=True,
    fixed_windows=True,
    exact_numerics="float",
    overhead={"cpu": 60e6, "npu": 60e6},  # estimates
    describe=describe,
    artifact_fields={
        "signatures": {
            "type": "object",
            "additionalProperties": typed(
                {"window": COUNT, "inputs": STRS, "outputs": STRS}, ("window",)
            ),
        },
        "cache_shape": INTS,
        "cache_dtype": STR,
        "padding": STR,
    },
    artifact_required=("signatures", "cache_shape", "cache_dtype"),
)
