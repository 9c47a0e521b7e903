"""`infopt-pack build`: plan -> compress -> export -> package, one function per arrow.

The plan comes from the planner (model config + device profile + workload) or from a JSON file
(`Plan.to_json()`, possibly edited by hand). Compression applies it to the real weights:
structured MLP pruning, low-rank factorization (whitened SVD, the same share of every layer),
then quantization (GPTQ when a calibration text is given, round-to-nearest
otherwise). Export writes the runtime artifact; package writes the bundle atomically.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from infopt.bundle import TOKENIZER, tokenizer_section, write_bundle
from infopt.errors import InvalidArgumentError
from infopt.importers import ModelSource, open_model
from infopt.model import Decoder
from infopt.planner import Plan

Stage = Callable[[str, int, int], None]  # (stage, done, total)
FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
BUILDABLE_RUNTIMES = (
    "pytorch",
    "onnxruntime",
    "openvino",
)  # the others arrive with their runtime modules


def load_plan(path: str | Path) -> Plan:
    """A plan saved by `infopt-pack plan --json` (possibly edited); unknown keys refused."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"{path}: not a readable plan JSON file ({e})") from e
    names = {f.name for f in fields(Plan)}
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"{path}: a plan is a JSON object")
    unknown, missing = set(data) - names, {n for n in names if n != "rejected"} - set(data)
    if unknown or missing:
        raise InvalidArgumentError(
            f"{path}: not a plan (unknown keys {sorted(unknown)}, missing {sorted(missing)})"
        )
    return Plan(**data)


def make_plan(
    source: ModelSource,
    device: str,
    context: int | None,
    batch: int,
    latency_ms: float | None,
) -> Plan:
    from infopt.device_profiles import load_profile
    from infopt.planner import plan

    return plan(
        source.spec, load_profile(device), context=context, batch=batch, latency_ms=latency_ms
    )


def compress(
    core: Decoder,
    p: Plan,
    calibration: torch.Tensor,
    gptq: bool,
    progress: Stage | None = None,
) -> dict[str, Any]:
    """Apply the plan's compression to `core` in place; returns what was done."""
    from infopt.compress import check_quantization, prune_mlp_channels, quantize_model
    from infopt.sparsity import low_rank_model

    done: dict[str, Any] = {}
    weights = dict(p.compression["weights"])
    sparsity = float(p.pruning.get("sparsity") or 0.0)
    # a bad (hand-edited) plan fails here, before any work
    if p.pruning.get("kind", "none") not in ("none", "structured-mlp-channels"):
        raise InvalidArgumentError(f"plan pruning kind {p.pruning.get('kind')!r} is not buildable")
    if not 0 <= sparsity < 1:
        raise InvalidArgumentError(f"plan pruning sparsity {sparsity}: must be in [0, 1)")
    if p.low_rank_ratio is not None and not 0 < p.low_rank_ratio <= 1:
        raise InvalidArgumentError(f"plan low_rank_ratio {p.low_rank_ratio}: must be in (0, 1]")
    check_quantization(core, weights)
    if sparsity:
        done["mlp_intermediate_size"] = prune_mlp_channels(core, sparsity, calibration)
    if p.low_rank_ratio is not None:
        # the same share of every layer: a global budget spread by the layers' whitened spectra
        # measured worse on the default model (docs/quality.md: perplexity 43.3 against 40.0)
        ranks = low_rank_model(core, p.low_rank_ratio, calibration)
        done["low_rank_layers"] = sum(r is not None for r in ranks.values())
    method = "gptq" if gptq else "rtn"
    layers, blocks_done = len(core.layers), [0]

    def on_block(_message: str) -> None:
        blocks_done[0] += 1
        if progress:
            progress("quantize", min(blocks_done[0], layers), layers)

    if any(s not in ("fp32", "fp16", "bf16") for s in weights.values()):
        quantize_model(
            core,
            weights,
            method=method,
            calibration=calibration if gptq else None,
            progress=on_block if progress else None,
        )
        done["quantization"] = method
    _cast_float_groups(core, weights)
    return done


def _cast_float_groups(core: Decoder, weights: dict[str, str]) -> None:
    """A plan with every group fp16 (or bf16) stores the whole model in that dtype, the
    precision the runtime computes in. Where some groups are quantized, the float parts stay
    fp32: the PyTorch runtime computes in one dtype, and quantized weights dequantize to it."""
    kinds = set(weights.values())
    if len(kinds) == 1 and (dtype := FLOAT_DTYPES.get(kinds.pop())) is not None:
        core.to(dtype)


def build(
    model: str | Path | None,
    out: str | Path,
    *,
    device: str | None = None,
    plan_file: str | Path | None = None,
    runtime: str | None = None,
    context: int | None = None,
    batch: int = 1,
    latency_ms: float | None = None,
    calibration: str | Path | None = None,
    progress: Stage | None = None,
) -> dict[str, Any]:
    """Build a bundle of `model` for `device` (or from `plan_file`) at `out`. Returns a summary."""
    from infopt import __version__
    from infopt.compress import calibration_batches, default_calibration_text
    from infopt.default_model import default_model_path
    from infopt.runtimes import available
    from infopt.runtimes.pytorch import from_source

    if (device is None) == (plan_file is None):
        raise InvalidArgumentError("give a device to plan for, or a plan file, not both")
    requested = [r.strip() for r in runtime.split(",")] if runtime else []
    for name in requested:
        if name not in available():
            raise InvalidArgumentError(f"runtime {name!r}: expected one of {available()}")
    started = time.perf_counter()
    source = open_model(model if model is not None else default_model_path())
    step = progress or (lambda *_: None)
    step("plan", 0, 1)
    p = (
        load_plan(plan_file)
        if plan_file
        else make_plan(source, str(device), context, batch, latency_ms)
    )
    if p.model.get("layers") not in (None, source.spec.num_layers):
        raise InvalidArgumentError(
            f"the plan is for a model of {p.model.get('layers')} layers; "
            f"{source.path} has {source.spec.num_layers}"
        )
    step("plan", 1, 1)
    chosen_runtime = requested[0] if requested else p.runtime
    built = [r for r in dict.fromkeys(requested or [p.runtime]) if r in BUILDABLE_RUNTIMES]
    built = built or ["pytorch"]  # the plan's runtime is not buildable yet: a PyTorch artifact
    cal_text = (
        Path(calibration).read_text(encoding="utf-8") if calibration else default_calibration_text()
    )
    cal_ids = calibration_batches(source.tokenizer.encode(cal_text), 256, 128)
    step("load weights", 0, 1)
    core = from_source(source, max_context=256).model
    step("load weights", 1, 1)
    done = compress(core, p, cal_ids, gptq=calibration is not None, progress=progress)
    done["stored_dtype"] = str(core.norm.weight.dtype).removeprefix("torch.")
    timings = {"compress_s": round(time.perf_counter() - started, 1)}
    max_context = min(p.context, core.spec.max_position_embeddings)
    artifacts, writers = _artifacts(core, built, max_context)
    tokenizer = source.tokenizer
    manifest = {
        "infopt_version": __version__,
        "model": {
            "architecture": core.spec.architecture,
            "config": core.spec.to_dict(),
            "parameters": sum(t.numel() for t in core.state_dict().values()),
            "source": {
                "name": Path(source.path).name,
                "format": source.format,
                "sha256": source.content_hash(),
            },
        },
        "plan": p.to_dict(),
        "compression": done,
        "runtime": {
            "name": chosen_runtime,
            "requires": _runtime_requirement(chosen_runtime),
            "artifact_built": chosen_runtime in artifacts,
        },
        "artifacts": artifacts,
        "kv_cache": {
            "max_context": max_context,
            "batch": p.batch,
            "dtype": p.compression.get("kv_dtype"),
            "layout": "per layer: K and V [batch, kv_heads, max_context, head_dim]",
            "kv_heads": core.spec.num_kv_heads,
            "head_dim": core.spec.head_dim,
            "layers": core.spec.num_layers,
        },
        "tokenizer": tokenizer_section(tokenizer),
        "generation_defaults": source.generation_defaults,
        "draft": None,
    }
    writers[TOKENIZER] = lambda path: path.write_text(tokenizer.backend.to_str(), encoding="utf-8")
    step("package", 0, 1)
    full = write_bundle(out, manifest, writers)
    step("package", 1, 1)
    return {
        "bundle": str(out),
        "plan": p.compression["name"],
        "runtime": chosen_runtime,
        "artifacts": sorted(artifacts),
        "bytes": sum(f["size"] for f in full["files"]),
        "files": full["files"],
        "predicted": p.predicted,
        "compression": done,
        "seconds": round(time.perf_counter() - started, 1),
        **timings,
    }


def _artifacts(
    core: Decoder, runtimes: list[str], max_context: int
) -> tuple[dict[str, Any], dict[str, Callable[[Path], object]]]:
    """The manifest entry and the file writers of each runtime's artifact."""
    from infopt.checkpoint import save_model

    artifacts: dict[str, Any] = {}
    writers: dict[str, Callable[[Path], object]] = {}
    if "pytorch" in runtimes:
        artifacts["pytorch"] = {
            "files": ["model.safetensors"],
            "format": "infopt-weights 1",
            "requires": _runtime_requirement("pytorch"),
        }
        writers["model.safetensors"] = lambda path: save_model(core, path)
    if "onnxruntime" in runtimes:
        from infopt.onnx_export import DATA_FILE, export_onnx, onnx_io

        artifacts["onnxruntime"] = {
            "files": ["model.onnx", DATA_FILE],
            "format": "onnx",
            "max_context": max_context,
            "kv_dtype": "fp32",  # GroupQueryAttention's cache here is float32 whatever the plan
            "requires": _runtime_requirement("onnxruntime"),
            **onnx_io(core),
        }
        writers["model.onnx"] = lambda path: export_onnx(core, path, max_context)
    if "openvino" in runtimes:
        from infopt.openvino_export import BIN, XML, export_openvino

        artifacts["openvino"] = {
            "files": [XML, BIN],
            "format": "openvino-ir",
            "max_context": max_context,
            "kv_dtype": "the plan's (kv_cache.dtype), set when the CPU plugin compiles it",
            "requires": _runtime_requirement("openvino"),
            "states": "past_key_values.%d.key / past_key_values.%d.value",
            "inputs": ["input_ids", "attention_mask", "position_ids", "beam_idx", "logits_to_keep"],
        }
        writers[XML] = lambda path: export_openvino(core, path, max_context)
    return artifacts, writers


def _runtime_requirement(name: str) -> dict[str, str]:
    """The package (and version floor) a runtime needs, from what this build used."""
    from importlib.metadata import PackageNotFoundError, version

    package = {
        "pytorch": "torch",
        "onnxruntime": "onnxruntime",
        "openvino": "openvino",
        "coreml": "coremltools",
        "tflite": "ai-edge-litert",
    }.get(name, name)
    try:
        v = version(package)
        major, minor = v.split(".")[:2]
        return {"package": package, "version": f">={major}.{minor.split('+')[0]}"}
    except (PackageNotFoundError, ValueError):
        return {"package": package, "version": ""}
