"""`infopt-pack build`: plan -> compress -> export -> package, one function per arrow.

The plan comes from the planner (model config + device profile + workload) or from a JSON file
(`Plan.to_json()`, possibly edited by hand). Compression applies it to the real weights
(`infopt.compress.apply`). Export writes each target's artifact (its `export.artifact`); package
writes the bundle atomically (`infopt.bundle.files.write_bundle`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from infopt.bundle.files import check_out, write_bundle
from infopt.bundle.manifest import TOKENIZER, tokenizer_section
from infopt.bundle.signing import key_id, load_private_key
from infopt.compress.apply import (
    apply_plan,
    check_plan,
    group_schemes,
    make_symmetric,
    stored_matrices,
    symmetric,
)
from infopt.compress.calibration import CALIBRATION_LENGTH
from infopt.core.model import Decoder, load_core, parameter_count
from infopt.core.progress import Progress, silent
from infopt.errors import InvalidArgumentError
from infopt.importers import ModelSource, open_model
from infopt.plan.planner import FLOATS, SPECULATIVE, Plan, check_quantize, load_plan
from infopt.runtimes.base import Writers
from infopt.runtimes.registry import names, reference, target, targets

DRAFT_DIR = "draft/"
# the KV cache of a core being compressed: calibration windows fit (it loads on CUDA when present)
CORE_CONTEXT = CALIBRATION_LENGTH


def make_plan(
    source: ModelSource,
    device: str,
    context: int | None,
    batch: int,
    latency_ms: float | None,
    speculative: str = "none",
    quantize: str | None = None,
    runtimes: Sequence[str] = (),
) -> Plan:
    from infopt.device_profiles import load_profile
    from infopt.plan.planner import plan

    return plan(
        source.spec,
        load_profile(device),
        context=context,
        batch=batch,
        latency_ms=latency_ms,
        speculative=speculative,
        quantize=quantize,
        file_weights=source.stored_weights(),
        runtimes=runtimes,
    )


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
    quantize: str | None = None,
    sign: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Build a bundle of `model` (None: the default model) for `device` (or from `plan_file`)
    at `out`. Returns a summary: bundle, plan, runtime, artifacts, bytes, files, predicted
    figures, what compression did, the quality it kept (perplexity on a short shipped text
    against the model's, or that the file's own values were kept), the draft, and the seconds
    it took. The plan the bundle records describes what it holds: re-estimated after any edit
    (a plan file), any runtime override and any change a target needs.

    quantize: the weights' storage instead of the planner's choice (`infopt.plan.planner.
    requested`: int8, int4, int4-gptq, a float, or a scheme); `int4` of a GGUF stored in INT4
    keeps its blocks as they are, as the planner's own choice does on a CPU whose runtimes keep
    them (`infopt.plan.planner.as_stored`).

    runtime: the runtime to load by default, or a comma-separated list of runtimes to export
    (the first is the default); otherwise the plan's. speculative: "none", "ngram", "self" (an
    INT4 self-draft in the bundle), "auto" (the planner's choice between those) or the path of a
    draft model (GGUF, Hugging Face folder or an infopt weight file such as `distill` writes)
    sharing the tokenizer. calibration: a text file; given, quantization is GPTQ (on the text
    shipped with infopt when the plan asks for GPTQ without one), else RTN. sign: an Ed25519
    private key (PEM) to sign the manifest with (`infopt.bundle.signing`), read before any
    work."""
    from infopt.compress.calibration import calibration_ids
    from infopt.core.default_model import default_model_path

    if device is None and plan_file is None:
        raise InvalidArgumentError("give a device to plan for (--device) or a plan file (--plan)")
    if device is not None and plan_file is not None:
        raise InvalidArgumentError("give a device to plan for or a plan file, not both")
    if quantize is not None and plan_file is not None:
        raise InvalidArgumentError(
            "--quantize chooses a plan's weights; with --plan, edit its compression.weights"
        )
    requested = [r.strip() for r in runtime.split(",")] if runtime else []
    for name in requested:
        if name not in names():
            raise InvalidArgumentError(f"runtime {name!r}: expected one of {names()}")
    if quantize is not None:
        check_quantize(quantize)
    # the runtimes known before planning: their exporters' packages, checked now
    if requested or device is not None:
        from infopt.device_profiles import load_profile

        for name in requested or load_profile(str(device)).runtimes[:1]:
            target(name).check_buildable()
    check_out(out)  # before any work: a destination a bundle cannot replace is refused now
    signing_key = load_private_key(sign) if sign is not None else None
    draft_kind = speculative or "none"
    if draft_kind not in SPECULATIVE and not Path(draft_kind).exists():
        raise InvalidArgumentError(
            f"--speculative {draft_kind!r}: expected one of {SPECULATIVE} or a draft model path"
        )
    started = time.perf_counter()
    source = open_model(model if model is not None else default_model_path())
    step = progress or silent
    step("plan", 0, 1)
    planned = draft_kind if draft_kind in SPECULATIVE else "none"
    p = (
        load_plan(plan_file)
        if plan_file
        else make_plan(
            source, str(device), context, batch, latency_ms, planned, quantize, requested
        )
    )
    if draft_kind in ("auto", "self", "ngram"):
        draft_kind = _resolve_draft_kind(p, draft_kind)
    if p.model.get("layers") not in (None, source.spec.num_layers):
        raise InvalidArgumentError(
            f"the plan is for a model of {p.model.get('layers')} layers; "
            f"{source.path} has {source.spec.num_layers}"
        )
    step("plan", 1, 1)
    built = [r for r in dict.fromkeys(requested or [p.runtime]) if r in names()]
    built = built or [reference().name]  # a hand-edited plan's unknown runtime: the reference
    chosen_runtime = requested[0] if requested else p.runtime
    for name in built:  # a missing exporter package is said before any work
        target(name).check_buildable()
    check_plan(p)  # a hand-edited plan's bad values refused before any work
    symmetric_reason = None
    if symmetric_targets := [r for r in built if target(r).symmetric_int4]:
        symmetric_reason = make_symmetric(p, symmetric_targets)
    if plan_file or chosen_runtime != p.runtime or symmetric_reason:
        p = _as_built(p, source, chosen_runtime, symmetric_reason)
    cal_ids = calibration_ids(source.tokenizer, calibration)
    file_weights = source.stored_weights()
    keep_blocks = (
        file_weights == p.compression["weights"]
        and not p.pruning.get("sparsity")
        and p.low_rank_ratio is None
    )
    step("load weights", 0, 1)
    core = load_core(source, CORE_CONTEXT, device=None, stored=keep_blocks)
    step("load weights", 1, 1)
    gptq = calibration is not None or p.method == "gptq"
    done = apply_plan(core, p, cal_ids, gptq=gptq, progress=progress)
    done["stored_dtype"] = str(core.float_dtype).removeprefix("torch.")
    done["matrices"] = stored_matrices(core)
    exact = keep_blocks or _lossless(p, file_weights)
    done["quality"] = quality(core, source, exact=exact, progress=step)
    if exact and any(s not in FLOATS for s in p.compression["weights"].values()):
        done["quality"]["note"] += (
            "; the runtimes' fast INT4/INT8 kernels round activations (numerics='exact' "
            "computes in float32)"
        )
    elif again := rounded_again(source.spec, file_weights, p, quantize, built, kept_types(source)):
        done["quality"]["note"] = again
    timings = {"compress_s": round(time.perf_counter() - started, 1)}
    max_context = min(p.context, core.spec.max_position_embeddings)
    artifacts, writers = export_artifacts(core, built, max_context)
    draft, draft_writers = _draft(draft_kind, source, p, core, built, max_context, cal_ids, step)
    writers.update(draft_writers)
    manifest = package_manifest(
        core,
        source,
        chosen_runtime,
        artifacts,
        kv_cache={
            "max_context": max_context,
            "batch": p.batch,
            "dtype": p.compression.get("kv_dtype"),
        },
        plan=p.to_dict(),
        compression=done,
        draft=draft,
    )
    writers[TOKENIZER] = tokenizer_writer(source)
    full = write_bundle(out, manifest, writers, progress=step, sign=signing_key)  # exporters run
    return {
        "bundle": str(out),
        "plan": p.compression["name"],
        "runtime": chosen_runtime,
        "artifacts": sorted(artifacts),
        "bytes": sum(f["size"] for f in full["files"]),
        "files": full["files"],
        "signed_by": key_id(signing_key.public_key()) if signing_key else None,
        "predicted": p.predicted,
        "context": p.context,
        "compression": done,
        "quality": done["quality"],
        "draft": None if draft is None else draft.get("source", draft["kind"]),
        "seconds": round(time.perf_counter() - started, 1),
        **timings,
    }


def rounded_again(
    spec: Any,
    file_weights: dict[str, str] | None,
    p: Plan,
    quantize: str | None = None,
    runtimes: Sequence[str] = (),
    blocks: Sequence[str] = (),
) -> str | None:
    """What a build should say when it rounds a file that stores quantized blocks to another
    scheme: the file's values are the ceiling, so the new rounding can only lose, and its
    blocks may well be larger than the file's; with `quantize` given where leaving it out
    would keep the file's blocks (for `runtimes` on the plan's device), it says so; `blocks`:
    the file's own block types to name (else the schemes its groups are named by). None when
    there is nothing to say."""
    from infopt.device_profiles import load_profile
    from infopt.errors import ProfileError
    from infopt.plan.costs import Compression, weight_bytes
    from infopt.plan.planner import as_stored

    weights = p.compression["weights"]
    if not file_weights or all(s in FLOATS for s in file_weights.values()):
        return None
    if weights == file_weights or all(s in FLOATS for s in weights.values()):
        return None
    stored = sum(weight_bytes(spec, Compression("file", dict(file_weights))).values())
    built = sum(weight_bytes(spec, Compression("built", dict(weights))).values())
    size = (
        f", in {(built - stored) / 1e6:.0f} MB more than the file's own blocks"
        if built > stored
        else ""
    )
    named = ", ".join(blocks or sorted(set(file_weights.values()) - set(FLOATS)))
    try:
        kept = as_stored(load_profile(p.device), runtimes or [p.runtime], file_weights)
    except ProfileError:  # a plan file's device that is not a profile here
        kept = None
    advice = " (leave out --quantize to keep them)" if quantize and kept is not None else ""
    return (
        f"the file stores {named} blocks already: this plan rounds their values a second "
        f"time{size}{advice}"
    )


def kept_types(source: ModelSource) -> list[str]:
    """The block types of `source` that infopt keeps as they are (a GGUF's Q5_0, Q4_K, ...), most
    weights first: what a note on rounding them again names (a group's scheme tells only the
    type of most of its weights)."""
    from infopt.importers import tensor_types
    from infopt.importers.gguf_file import BLOCK_SCHEMES

    return [t for t in tensor_types(source.path) if t in BLOCK_SCHEMES]


def _as_built(p: Plan, source: ModelSource, runtime: str, extra_reason: str | None) -> Plan:
    """The plan re-estimated and re-explained as it will be built (see `replan`), on its own
    device profile; kept as it is, said so, where that profile is not one here."""
    from infopt.device_profiles import load_profile
    from infopt.errors import ProfileError
    from infopt.plan.planner import replan

    try:
        profile = load_profile(p.device)
    except ProfileError:
        p.reasons.append(
            f"predictions as the plan file gives them: its device {p.device!r} is not a "
            "profile here"
        )
        if runtime != p.runtime:
            p.reasons.append(f"runtime {runtime}: asked for (--runtime), instead of {p.runtime}")
            p.runtime = runtime
        again = p
    else:
        again = replan(p, source.spec, profile, runtime, source.stored_weights())
    if extra_reason:
        again.reasons.append(extra_reason)
    return again


def _lossless(p: Plan, file_weights: dict[str, str] | None) -> bool:
    """Whether the plan stores the model's own values: every group fp32 (or the file's own
    scheme), nothing pruned or factorized."""
    weights = p.compression["weights"]
    same = all(s == "fp32" or s == (file_weights or {}).get(g) for g, s in weights.items())
    return same and not p.pruning.get("sparsity") and p.low_rank_ratio is None


QUALITY_TOKENS, QUALITY_WINDOW = 512, 256


def quality(
    core: Decoder, source: ModelSource, exact: bool, progress: Progress | None = None
) -> dict[str, Any]:
    """What compression cost, in numbers a build can print: perplexity of the compressed core
    and of the model as the file has it on a short text shipped with infopt (not the calibration
    text), their relative difference, KL divergence and top-1 agreement; or, when the core
    holds the file's own values, just that."""
    if exact:
        return {"kind": "exact", "note": "the model file's own values, nothing rounded again"}
    from infopt.compress.calibration import shipped_text
    from infopt.measure.quality import score
    from infopt.runtimes.registry import reference

    ids = source.tokenizer.encode(shipped_text("quality.txt"))[:QUALITY_TOKENS]
    window = min(QUALITY_WINDOW, core.spec.max_position_embeddings)
    runs = reference().module("runtime")
    model = runs.from_model(load_core(source, window, device=None), max_context=window)
    # the core keeps its cache length: the export that follows reads it
    compressed = runs.from_model(core, max_context=max(window, core.max_len))
    q = score(compressed, ids, model, window=window, progress=progress)
    base = q.reference_perplexity or q.perplexity
    return {
        "kind": "measured",
        "tokens": q.tokens,
        "perplexity": round(q.perplexity, 4),
        "reference_perplexity": round(base, 4),
        "change": round(q.perplexity / base - 1, 4),
        "kl": round(q.kl or 0.0, 5),
        "top1": round(q.top1 or 0.0, 4),
    }


def convert(
    source: ModelSource,
    out: str | Path,
    runtime: str,
    max_context: int,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """A bundle of `source` for `runtime` at the file's own precision, nothing compressed: a GGUF's
    Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q2_K–Q6_K blocks as they are (see `load_core(stored=True)`),
    every other weight as float32; its graph exported for `max_context` positions. What
    `infopt.load` of a model file caches for a runtime that runs an exported artifact."""
    step = progress or silent
    target(runtime).check_buildable()
    step("read weights", 0, 1)
    core = load_core(source, CORE_CONTEXT, device="cpu", stored=True)
    step("read weights", 1, 1)
    artifacts, writers = export_artifacts(core, [runtime], max_context)
    compression = {
        "stored_dtype": "float32",
        "quantization": "as in the file",
        "weights": group_schemes(core),
        "matrices": stored_matrices(core),
        "quality": quality(core, source, exact=True),
    }
    manifest = package_manifest(
        core,
        source,
        runtime,
        artifacts,
        kv_cache={"max_context": max_context, "batch": 1, "dtype": "fp32"},
        plan=None,
        compression=compression,
        draft=None,
    )
    writers[TOKENIZER] = tokenizer_writer(source)
    full = write_bundle(out, manifest, writers, progress=step)
    return full


def package_manifest(
    core: Decoder,
    source: ModelSource,
    runtime: str,
    artifacts: dict[str, Any],
    *,
    kv_cache: dict[str, Any],
    plan: dict[str, Any] | None,
    compression: dict[str, Any],
    draft: dict[str, Any] | None,
) -> dict[str, Any]:
    """The manifest of a bundle of `core` (made from `source`) carrying `artifacts`, loaded on
    `runtime` by default; write_bundle adds its format, version and files."""
    from infopt import __version__

    spec = core.spec
    return {
        "infopt_version": __version__,
        "model": {
            "architecture": spec.architecture,
            "config": spec.to_dict(),
            "parameters": parameter_count(core),
            "source": {
                "name": Path(source.path).name,
                "format": source.format,
                "sha256": source.content_hash(),
            },
        },
        "plan": plan,
        "compression": compression,
        "runtime": {
            "name": runtime,
            "requires": (
                target(runtime).installed_requirement()
                if runtime in names()
                else {"package": runtime, "version": ""}
            ),
            "artifact_built": runtime in artifacts,
        },
        "artifacts": artifacts,
        "kv_cache": {
            **kv_cache,
            "layout": "per layer: K and V [batch, kv_heads, max_context, head_dim]",
            "kv_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim,
            "layers": spec.num_layers,
        },
        "tokenizer": tokenizer_section(source.tokenizer),
        "generation_defaults": source.generation_defaults,
        "draft": draft,
    }


def tokenizer_writer(source: ModelSource) -> Callable[[Path], object]:
    backend = source.tokenizer.backend
    return lambda path: path.write_text(backend.to_str(), encoding="utf-8")


def export_artifacts(
    core: Decoder, runtimes: list[str], max_context: int, prefix: str = ""
) -> tuple[dict[str, Any], Writers]:
    """The manifest entry and the file writers of each runtime's artifact, in the registry's
    order (file paths under `prefix`: "" for the model, "draft/" for its draft)."""
    artifacts: dict[str, Any] = {}
    writers: Writers = {}
    for name, t in targets().items():
        if name in runtimes:
            artifacts[name], files = t.module("export").artifact(core, max_context, prefix)
            writers.update(files)
    return artifacts, writers


def _resolve_draft_kind(p: Plan, kind: str) -> str:
    """none / ngram / self: "auto" follows the plan's choice (a plan file may predate it)."""
    from infopt.plan.costs import Compression, self_draft

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
    target_core: Decoder,
    runtimes: list[str],
    max_context: int,
    calibration: torch.Tensor,
    step: Progress,
) -> tuple[dict[str, Any] | None, Writers]:
    """The manifest's draft section and the writers of the draft's artifacts (under draft/)."""
    from dataclasses import replace

    from infopt.compress.quantize import quantize_model
    from infopt.core.quant import QuantStorage
    from infopt.plan.costs import GROUPS, Compression, self_draft

    if kind == "none":
        return None, {}
    if kind == "ngram":
        return {"kind": "ngram", "max_ngram": 3, "num_draft_tokens": 8}, {}
    step("draft", 0, 1)
    if kind == "self":
        scheme = self_draft(Compression("target", dict(p.compression["weights"])))
        assert scheme is not None, "_resolve_draft_kind refuses INT4 targets"
        weights = dict((p.speculative or {}).get("weights") or scheme.weights)
        if any(target(r).symmetric_int4 for r in runtimes):  # as for the target
            weights = symmetric(weights)
        core = load_core(source, CORE_CONTEXT, device=None)
        draft_plan = replace(p, compression={**p.compression, "weights": weights})
        apply_plan(core, draft_plan, calibration, gptq=False)
        label = "self-int4"
    else:
        core, weights, label = _draft_model(Path(kind), source, target_core)
        if not any(isinstance(m, QuantStorage) for m in core.modules()):
            # A float draft would read more bytes per token than an INT4 target (its
            # embeddings and head alone): it gets the self-draft's weights (RTN; the target
            # decides every token, the draft's rounding only changes how many it keeps).
            scheme = self_draft(Compression("draft", dict.fromkeys(GROUPS, "fp32")))
            assert scheme is not None
            weights = dict(scheme.weights)
            if any(target(r).symmetric_int4 for r in runtimes):
                weights = symmetric(weights)
            quantize_model(core, weights)
    step("draft", 1, 1)
    artifacts, writers = export_artifacts(core, runtimes, max_context, prefix=DRAFT_DIR)
    section = {
        "kind": "model",
        "source": label,
        "config": core.spec.to_dict(),
        "parameters": parameter_count(core),
        "weights": weights,
        "num_draft_tokens": 4,
        "artifacts": artifacts,
    }
    return section, writers


def _draft_model(
    path: Path, source: ModelSource, target_core: Decoder
) -> tuple[Decoder, dict[str, str], str]:
    """A user's draft model (GGUF, HF folder, or an infopt weight file), checked against the
    target's vocabulary and tokenizer."""
    from infopt.core.weights import load_model
    from infopt.decode.drafters import DraftMismatchError

    if path.is_file() and path.suffix == ".safetensors":
        core = load_model(path)
    else:
        draft_source = open_model(path)
        if draft_source.tokenizer.backend.get_vocab() != source.tokenizer.backend.get_vocab():
            raise DraftMismatchError(
                f"draft {path}: its tokenizer differs from the target's; a draft must share it"
            )
        core = load_core(draft_source, CORE_CONTEXT, device=None)
    if core.spec.vocab_size != target_core.spec.vocab_size:
        raise DraftMismatchError(
            f"draft {path}: a vocabulary of {core.spec.vocab_size} tokens, the target's has "
            f"{target_core.spec.vocab_size}; a draft must share the target's tokenizer"
        )
    return core, {"model": "as given"}, path.name
