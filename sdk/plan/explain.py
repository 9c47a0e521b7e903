"""A plan, as data and in words: the `Plan` record, the reasons for its choices, and the message
when nothing fits."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from infopt.core.spec import ModelSpec
from infopt.device_profiles import DeviceProfile
from infopt.plan.costs import Compression, Estimate, compute_precision, kv_cache_bytes

HEADROOM = 0.10  # of usable memory kept free: fragmentation, other allocations, OS pressure
GB = 1e9


@dataclass
class Plan:
    model: dict[str, Any]
    device: str
    runtime: str
    compute_precision: str
    compression: dict[str, Any]
    context: int
    batch: int
    latency_target_ms: float | None
    static_shapes: bool
    pruning: dict[str, Any]  # {"kind": "none" | "structured-mlp-channels", "sparsity": x}
    low_rank_ratio: float | None  # fraction of block parameters kept, None = not factorized
    predicted: dict[str, Any]
    usable_memory: float
    headroom_bytes: float
    reasons: list[str]
    rejected: list[dict[str, str]] = field(default_factory=list)
    # speculative decoding: {"kind": none|ngram|self, "draft": scheme name, "bytes", "reason"}
    speculative: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    method: str = "rtn"  # how quantized groups are rounded: "rtn" or "gptq"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


STORED = " as stored in the file"  # the name's end of a plan keeping a model file's blocks


def _gb(x: float) -> str:
    return f"{x / GB:.2f} GB"


def _kv_source(c: Compression, runtime: str) -> str:
    from infopt.runtimes.registry import names, target

    if runtime in names() and target(runtime).kv_dtype is not None:
        return f"the precision {runtime} holds its cache in"
    return "the device's working precision"


def choice_reasons(c: Compression, profile: DeviceProfile, runtime: str) -> list[str]:
    """One sentence per decision of the chosen option."""
    w = c.weights
    if c.name.endswith(STORED):
        weights = (
            f"weights: the model file's own blocks (blocks {w['attention']}, embeddings "
            f"{w['embeddings']}, LM head {w['lm_head']}), kept as they are: nothing is rounded "
            "again, and no float copy holds more than these values"
        )
    elif w["attention"].startswith("int4"):
        weights = (
            f"weights: blocks {w['attention']} (4-bit, the finest group size that fits, "
            f"for accuracy), embeddings and LM head {w['embeddings']}: they set every "
            "logit and are a small share of the bytes"
        )
    elif w["attention"] == "int8":
        weights = "weights: int8 per output channel everywhere, near-lossless at half of 16-bit"
    else:
        weights = f"weights: {w['attention']} everywhere, no quantization loss"
    kv = (
        f"KV cache {c.kv_dtype}: int8 with a scale per token and head, halving the cache"
        if c.kv_dtype == "int8"
        else f"KV cache {c.kv_dtype}: {_kv_source(c, runtime)}; not quantized"
    )
    structural = []
    if c.mlp_prune:
        structural.append(
            f"MLP channels pruned {c.mlp_prune:.0%} (structured: smaller matrices, not zeros)"
        )
    if c.low_rank:
        structural.append(f"blocks factorized by SVD keeping {c.low_rank:.0%} of their parameters")
    if structural:
        structural.append(
            "pruning and low-rank cost quality that only distillation recovers: "
            "measure perplexity on held-out text before shipping it"
        )
    else:
        structural.append("pruning and low-rank: none, a less lossy option fits")
    return [weights, kv, *structural]


def explain(
    spec: ModelSpec,
    profile: DeviceProfile,
    c: Compression,
    est: Estimate,
    context: int,
    batch: int,
    latency_ms: float | None,
    runtime_choice: tuple[str, str],
    rejected: list[dict[str, str]],
    requested: str | None = None,
) -> Plan:
    """The plan of compression `c` with its estimate `est`, in words. `requested`: what asked
    for `c` instead of the search (`--quantize X`, or "as built" for an edited plan)."""
    runtime, runtime_reason = runtime_choice
    fits = (
        f"{_gb(est.total)} of {_gb(profile.usable_bytes)} usable, keeping {HEADROOM:.0%} headroom"
    ) + (f", and meets {latency_ms:g} ms/token" if latency_ms else "")
    if requested is None and c.name.endswith(STORED):
        first = (
            f"{c.name}: the file's own precision, which no option improves on, fits "
            f"{profile.name} ({fits})"
        )
    elif requested is None:
        first = f"{c.name}: the least lossy option that fits {profile.name} ({fits})"
    else:
        asked = {"as built": "as built", "search": "chosen by search"}.get(
            requested, f"asked for (--quantize {requested})"
        )
        first = f"{c.name}: {asked}; fits {profile.name} ({fits})"
    reasons = [
        first,
        f"memory: weights {_gb(est.weights)} + KV cache {_gb(est.kv_cache)} ({context} tokens x "
        f"batch {batch}, {c.kv_dtype}) + activations {_gb(est.activations)} + {runtime} overhead "
        f"{_gb(est.overhead)}"
        + (f" + speculative draft {_gb(est.draft)}" if est.draft else "")
        + "; the quick formula (params x bytes x 1.2) says "
        f"{_gb(est.quick_formula)}",
        f"speed: {est.decode_tok_s:.1f} tok/s decode ({est.ms_per_token:.1f} ms/token, "
        f"{est.bound}-bound, with the cache half full: {context // 2} tokens; "
        f"{est.decode_tok_s_short:.1f} tok/s with {est.short_history} tokens in it), "
        f"{est.prefill_tok_s:.0f} tok/s prefill",
        runtime_reason,
    ]
    if spec.sliding_window and "sliding" in spec.layer_kinds:
        local = spec.layer_kinds.count("sliding")
        windowed = kv_cache_bytes(spec, context, batch, c.kv_dtype, windowed=True)
        reasons.append(
            f"sliding window: {local} of {spec.num_layers} layers attend to the last "
            f"{spec.sliding_window} tokens only; the runtimes keep all {context} positions on "
            f"every layer ({_gb(est.kv_cache)}), a windowed cache would need {_gb(windowed)}"
        )
    reasons += choice_reasons(c, profile, runtime)
    if profile.static_shapes:
        reasons.append(
            f"{profile.name} compiles static shapes: fixed {context}-token KV window, "
            "fixed prefill chunk and single-token decode"
        )
    if not rejected and requested is None:
        reasons.append("no less lossy option exists on this device")
    return Plan(
        model={
            "architecture": spec.architecture,
            "parameters": spec.num_params,
            "layers": spec.num_layers,
            "hidden_size": spec.hidden_size,
        },
        device=profile.name,
        runtime=runtime,
        compute_precision=compute_precision(profile),
        compression=c.to_dict(),
        context=context,
        batch=batch,
        latency_target_ms=latency_ms,
        static_shapes=profile.static_shapes,
        pruning={
            "kind": "structured-mlp-channels" if c.mlp_prune else "none",
            "sparsity": c.mlp_prune,
        },
        low_rank_ratio=c.low_rank,
        predicted=est.to_dict(),
        usable_memory=profile.usable_bytes,
        headroom_bytes=profile.usable_bytes - est.total,
        reasons=reasons,
        rejected=rejected,
    )


def refusal(
    spec: ModelSpec,
    profile: DeviceProfile,
    tried: list[tuple[Compression, Estimate]],
    context: int,
    batch: int,
    latency_ms: float | None,
    budget: float,
) -> str:
    if not tried:
        return f"no compression option is storable on {profile.name}"
    smallest_c, smallest = min(tried, key=lambda t: t[1].total)
    if smallest.total <= budget:  # memory fits; latency does not
        fastest_c, fastest = max(tried, key=lambda t: t[1].decode_tok_s)
        return (
            f"no plan meets {latency_ms:g} ms/token on {profile.name}: the fastest that fits "
            f"({fastest_c.name}) predicts {fastest.ms_per_token:.1f} ms/token. Relax the "
            "target, or choose a device with more memory bandwidth"
        )
    short = smallest.total - budget
    fixed = smallest.total - smallest.kv_cache
    per_token = smallest.kv_cache / context
    fits_ctx = int((budget - fixed) / per_token) if budget > fixed else 0
    hints = [f"a device with at least {_gb(smallest.total / (1 - HEADROOM))} usable memory"]
    if fits_ctx >= 1:
        hints.insert(0, f"--context {fits_ctx} (instead of {context})")
    if batch > 1:
        hints.insert(0, "--batch 1")
    return (
        f"{spec.num_params / 1e9:.1f}B-parameter model does not fit {profile.name}: even "
        f"{smallest_c.name} needs {_gb(smallest.total)}, {short:,.0f} bytes ({_gb(short)}) "
        f"more than the {_gb(budget)} budget ({_gb(profile.usable_bytes)} usable less "
        f"{HEADROOM:.0%} headroom). It would fit with: " + "; or ".join(hints)
    )
