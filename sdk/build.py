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
DRAFT_DIR = "draft/"
SPECULATIVE = ("none", "auto", "self", "ngram")
BUILDABLE_RUNTIMES = ("pytorch", "onnxruntime", "openvino", "tflite", "coreml")
SYMMETRIC_INT4 = ("tflite", "coreml")  # runtimes whose artifacts carry INT4 without zero-points


def load_plan(path: str | Path) -> Plan:
    """A plan saved by `infopt-pack plan --json` (possibly edited); unknown keys refused."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"{path}: not a readable plan JSON file ({e})") from e
    names = {f.name for f in fields(Plan)}
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"{path}: a plan is a JSON object")
    optional = {"rejected", "speculative"}  # older plan files lack the speculative choice
    unknown, missing = set(data) - names, names - optional - set(data)
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
    speculative: str = "none",
) -> Plan:
    from infopt.device_profiles import load_profile
    from infopt.planner import plan

    return plan(
        source.spec,
        load_profile(device),
        context=context,
        batch=batch,
        latency_ms=latency_ms,
        speculative=speculative,
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
    speculative: str | None = None,
    progress: Stage | None = None,
) -> dict[str, Any]:
    """Build a bundle of `model` for `device` (or from `plan_file`) at `out`. Returns a summary.

    speculative: "none", "ngram", "self" (an INT4 self-draft in the bundle), "auto" (the
    planner's choice between those) or the path of a draft model (GGUF, Hugging Face folder or
    an infopt weight file such as `infopt-pack distill` writes) sharing the tokenizer."""
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
    draft_kind = speculative or "none"
    if draft_kind not in SPECULATIVE and not Path(draft_kind).exists():
        raise InvalidArgumentError(
            f"--speculative {draft_kind!r}: expected one of {SPECULATIVE} or a draft model path"
        )
    started = time.perf_counter()
    source = open_model(model if model is not None else default_model_path())
    step = progress or (lambda *_: None)
    step("plan", 0, 1)
    planned = draft_kind if draft_kind in SPECULATIVE else "none"
    p = (
        load_plan(plan_file)
        if plan_file
        else make_plan(source, str(device), context, batch, latency_ms, planned)
    )
    if draft_kind in ("auto", "self", "ngram"):
        draft_kind = _resolve_draft_kind(p, draft_kind)
    if p.model.get("layers") not in (None, source.spec.num_layers):
        raise InvalidArgumentError(
            f"the plan is for a model of {p.model.get('layers')} layers; "
            f"{source.path} has {source.spec.num_layers}"
        )
    step("plan", 1, 1)
    chosen_runtime = requested[0] if requested else p.runtime
    built = [r for r in dict.fromkeys(requested or [p.runtime]) if r in BUILDABLE_RUNTIMES]
    built = built or ["pytorch"]  # the plan's runtime is not buildable yet: a PyTorch artifact
    if symmetric := [r for r in built if r in SYMMETRIC_INT4]:
        _symmetric_int4(p, symmetric)
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
    draft, draft_writers = _draft(draft_kind, source, p, core, built, max_context, cal_ids, step)
    writers.update(draft_writers)
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
        "draft": draft,
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
        "draft": None if draft is None else draft.get("source", draft["kind"]),
        "seconds": round(time.perf_counter() - started, 1),
        **timings,
    }


def _symmetric(weights: dict[str, str]) -> dict[str, str]:
    """Asymmetric INT4 groups made symmetric ones of the same group size (int4-g32 -> int4s-g32):
    LiteRT's INT4 has no zero-points, and Core ML's symmetric INT4 keeps infopt's codes and
    scales as they are."""
    return {
        g: s.replace("int4-", "int4s-", 1) if s.startswith("int4-") else s
        for g, s in weights.items()
    }


def _symmetric_int4(p: Plan, runtimes: list[str]) -> None:
    """The plan's INT4 groups made symmetric for `runtimes`, said in the plan's reasons."""
    weights = p.compression["weights"]
    changed = sorted(g for g, s in weights.items() if s.startswith("int4-"))
    weights.update(_symmetric(weights))
    if changed:
        p.reasons.append(
            f"{' and '.join(runtimes)}: {', '.join(changed)} quantized symmetric INT4 "
            f"({weights[changed[0]]}), the form these runtimes' INT4 weights take"
        )


def _resolve_draft_kind(p: Plan, kind: str) -> str:
    """none / ngram / self: "auto" follows the plan's choice (a plan file may predate it)."""
    from infopt.costs import Compression, self_draft

    if kind == "ngram":
        return kind
    planned = str((p.speculative or {}).get("kind", "none"))
    if kind == "auto" and planned != "none":
        return planned
    weights = p.compression["weights"]
    can_self = self_draft(Compression("target", weights)) is not None
    if kind == "self" and not can_self:
        raise InvalidArgumentError(
            f"--speculative self: the plan's weights are INT4 already ({weights}); the "
            "self-draft would be the target itself. Use ngram, or a smaller draft model"
        )
    return "self" if can_self else "ngram"


def _draft(
    kind: str,
    source: ModelSource,
    p: Plan,
    target: Decoder,
    runtimes: list[str],
    max_context: int,
    calibration: torch.Tensor,
    step: Stage,
) -> tuple[dict[str, Any] | None, dict[str, Callable[[Path], object]]]:
    """The manifest's draft section and the writers of the draft's artifacts (under draft/)."""
    from dataclasses import replace

    from infopt.costs import Compression, self_draft
    from infopt.runtimes.pytorch import from_source

    if kind == "none":
        return None, {}
    if kind == "ngram":
        return {"kind": "ngram", "max_ngram": 3, "num_draft_tokens": 8}, {}
    step("draft", 0, 1)
    if kind == "self":
        scheme = self_draft(Compression("target", dict(p.compression["weights"])))
        assert scheme is not None, "_resolve_draft_kind refuses INT4 targets"
        weights = dict((p.speculative or {}).get("weights") or scheme.weights)
        if set(runtimes) & set(SYMMETRIC_INT4):  # as for the target
            weights = _symmetric(weights)
        core = from_source(source, max_context=256).model
        draft_plan = replace(p, compression={**p.compression, "weights": weights})
        compress(core, draft_plan, calibration, gptq=False)
        label = "self-int4"
    else:
        core, weights, label = _draft_model(Path(kind), source, target)
    step("draft", 1, 1)
    artifacts, writers = _artifacts(core, runtimes, max_context, prefix=DRAFT_DIR)
    section = {
        "kind": "model",
        "source": label,
        "config": core.spec.to_dict(),
        "parameters": sum(t.numel() for t in core.state_dict().values()),
        "weights": weights,
        "num_draft_tokens": 4,
        "artifacts": artifacts,
    }
    return section, writers


def _draft_model(
    path: Path, source: ModelSource, target: Decoder
) -> tuple[Decoder, dict[str, str], str]:
    """A user's draft model (GGUF, HF folder, or an infopt weight file), checked against the
    target's vocabulary and tokenizer."""
    from infopt.checkpoint import load_model
    from infopt.runtimes.pytorch import from_source
    from infopt.speculative import DraftMismatchError

    if path.is_file() and path.suffix == ".safetensors":
        core = load_model(path)
    else:
        draft_source = open_model(path)
        if draft_source.tokenizer.backend.get_vocab() != source.tokenizer.backend.get_vocab():
            raise DraftMismatchError(
                f"draft {path}: its tokenizer differs from the target's; a draft must share it"
            )
        core = from_source(draft_source, max_context=256).model
    if core.spec.vocab_size != target.spec.vocab_size:
        raise DraftMismatchError(
            f"draft {path}: a vocabulary of {core.spec.vocab_size} tokens, the target's has "
            f"{target.spec.vocab_size}; a draft must share the target's tokenizer"
        )
    return core, {"model": "as given"}, path.name


def _artifacts(
    core: Decoder, runtimes: list[str], max_context: int, prefix: str = ""
) -> tuple[dict[str, Any], dict[str, Callable[[Path], object]]]:
    """The manifest entry and the file writers of each runtime's artifact (file paths under
    `prefix`: "" for the model, "draft/" for its draft)."""
    from infopt.checkpoint import save_model

    artifacts: dict[str, Any] = {}
    writers: dict[str, Callable[[Path], object]] = {}
    if "pytorch" in runtimes:
        artifacts["pytorch"] = {
            "files": [f"{prefix}model.safetensors"],
            "format": "infopt-weights 1",
            "requires": _runtime_requirement("pytorch"),
        }
        writers[f"{prefix}model.safetensors"] = lambda path: save_model(core, path)
    if "onnxruntime" in runtimes:
        from infopt.onnx_export import DATA_FILE, export_onnx, onnx_io

        artifacts["onnxruntime"] = {
            "files": [f"{prefix}model.onnx", f"{prefix}{DATA_FILE}"],
            "format": "onnx",
            "max_context": max_context,
            "kv_dtype": "fp32",  # GroupQueryAttention's cache here is float32 whatever the plan
            "requires": _runtime_requirement("onnxruntime"),
            **onnx_io(core),
        }
        writers[f"{prefix}model.onnx"] = lambda path: export_onnx(core, path, max_context)
    if "openvino" in runtimes:
        from infopt.openvino_export import BIN, XML, export_openvino

        artifacts["openvino"] = {
            "files": [f"{prefix}{XML}", f"{prefix}{BIN}"],
            "format": "openvino-ir",
            "max_context": max_context,
            "kv_dtype": "the plan's (kv_cache.dtype), set when the CPU plugin compiles it",
            "requires": _runtime_requirement("openvino"),
            "states": "past_key_values.%d.key / past_key_values.%d.value",
            "inputs": ["input_ids", "attention_mask", "position_ids", "beam_idx", "logits_to_keep"],
        }
        writers[f"{prefix}{XML}"] = lambda path: export_openvino(core, path, max_context)
    if "tflite" in runtimes:
        from infopt.tflite_export import FILE, export_tflite, tflite_io

        artifacts["tflite"] = {
            "files": [f"{prefix}{FILE}"],
            "format": "tflite",
            "max_context": max_context,
            "kv_dtype": "fp32",
            "requires": _runtime_requirement("tflite"),
            **tflite_io(core, max_context),
        }
        writers[f"{prefix}{FILE}"] = lambda path: export_tflite(core, path, max_context)
    if "coreml" in runtimes:
        from infopt import coreml_export

        package = f"{prefix}{coreml_export.FILE}"
        artifacts["coreml"] = {
            "files": [f"{package}/{f}" for f in coreml_export.PACKAGE_FILES],
            "package": package,
            "format": "mlpackage (ML Program, stateful)",
            "max_context": max_context,
            "kv_dtype": "fp16",
            "requires": _runtime_requirement("coreml"),
            **coreml_export.coreml_io(core, max_context),
        }
        writers[package] = lambda path: coreml_export.export_coreml(core, path, max_context)
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
