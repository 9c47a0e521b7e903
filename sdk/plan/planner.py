"""The planner: the least lossy compression that fits a device with headroom and meets a latency
target, with the reasons for the choice and for every less lossy option it rejected.

Needs only the model config: a 70B `config.json` plans without weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from infopt.core.spec import ModelSpec
from infopt.device_profiles import DeviceProfile
from infopt.errors import InvalidArgumentError, PlanError
from infopt.plan.costs import (
    Compression,
    Estimate,
    compute_precision,
    draft_bytes,
    estimate,
    group_fits,
    matrices,
    self_draft,
    with_kv,
)

HEADROOM = 0.10  # of usable memory kept free: fragmentation, other allocations, OS pressure
# Named scenarios, as per-token decode latency targets in milliseconds.
SCENARIOS = {"code-completion": 50.0, "chat": 200.0, "batch": None}
SPECULATIVE = ("none", "auto", "self", "ngram")
GB = 1e9


def _int4(group: int, head: str = "int8") -> dict[str, str]:
    return {
        "embeddings": head,
        "lm_head": head,
        "attention": f"int4-g{group}",
        "mlp": f"int4-g{group}",
    }


def ladder(spec: ModelSpec, profile: DeviceProfile) -> list[Compression]:
    """Candidate combinations, least lossy first, restricted to what the device stores."""
    every = ("embeddings", "lm_head", "attention", "mlp")
    floats = [p for p in ("fp32", "bf16", "fp16") if p in profile.weight_precisions]
    if profile.kind != "cpu":
        floats = [p for p in floats if p != "fp32"] or floats  # accelerators: 16-bit first
    steps = [Compression(f, dict.fromkeys(every, f), kv_dtype=f) for f in floats]
    # Quantized plans keep a 16-bit KV cache: the device's preferred 16-bit float.
    kv = next((p for p in ("bf16", "fp16") if p in profile.compute_precisions), "fp16")
    if "int8" in profile.weight_precisions:
        steps.append(Compression("int8", dict.fromkeys(every, "int8"), kv_dtype=kv))
    if "int4" not in profile.weight_precisions:
        return steps
    int4 = [
        Compression(f"int4 g{g} (embeddings/LM head int8)", _int4(g), kv_dtype=kv)
        for g in (32, 64, 128)
    ]
    steps += int4  # a group size that does not divide the model's widths is rejected by name
    shapes = matrices(spec)
    usable = [c for c in int4 if all(group_fits(c.weights[g], s) for g, s in shapes.items() if s)]
    if usable:
        base = usable[-1]  # the coarsest group that divides: the smallest int4 storage
        steps += [
            with_kv(base, "int8"),
            replace(
                base,
                name=f"{base.name} + kv int8 + MLP channels pruned 25%",
                kv_dtype="int8",
                mlp_prune=0.25,
            ),
            replace(
                base, name=f"{base.name} + kv int8 + low-rank 60%", kv_dtype="int8", low_rank=0.6
            ),
            replace(
                base,
                name=f"{base.name} + kv int8 + MLP channels pruned 50% + low-rank 60%",
                kv_dtype="int8",
                mlp_prune=0.5,
                low_rank=0.6,
            ),
        ]
    return steps


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _gb(x: float) -> str:
    return f"{x / GB:.2f} GB"


def _why_rejected(
    spec: ModelSpec, c: Compression, est: Estimate | None, budget: float, latency_ms: float | None
) -> str | None:
    for group, shapes in matrices(spec, 1.0 - c.mlp_prune).items():
        if shapes and not group_fits(c.weights[group], shapes):
            return (
                f"{c.weights[group]} does not divide the {group} input sizes "
                f"{sorted({k for _, k in shapes})}"
            )
    assert est is not None
    if est.total > budget:
        return (
            f"needs {_gb(est.total)}, over the budget of {_gb(budget)} by {_gb(est.total - budget)}"
        )
    if latency_ms is not None and est.ms_per_token > latency_ms:
        return f"{est.ms_per_token:.1f} ms/token misses the {latency_ms:g} ms target"
    return None


def plan(
    spec: ModelSpec,
    profile: DeviceProfile,
    *,
    context: int | None = None,
    batch: int = 1,
    latency_ms: float | None = None,
    speculative: str = "none",
) -> Plan:
    """Choose and explain a compression plan; PlanError when nothing fits.

    speculative: "none", "ngram" (no memory), "self" (an INT4 self-draft whose weights and KV
    cache must fit beside the target's) or "auto" (the self-draft where the target is above
    INT4 and both fit, else prompt lookup)."""
    if speculative not in SPECULATIVE:
        raise InvalidArgumentError(f"speculative={speculative!r}: expected one of {SPECULATIVE}")
    context = context or spec.max_position_embeddings
    if context < 1 or batch < 1 or (latency_ms is not None and latency_ms <= 0):
        raise InvalidArgumentError(
            f"context={context}, batch={batch}, latency_ms={latency_ms}: must all be positive"
        )
    if context > spec.max_position_embeddings:
        raise InvalidArgumentError(
            f"context={context} exceeds the model's trained context of "
            f"{spec.max_position_embeddings}"
        )
    budget = profile.usable_bytes * (1 - HEADROOM)
    runtime = pick_runtime(profile)
    rejected: list[dict[str, str]] = []
    tried: list[tuple[Compression, Estimate]] = []
    for c in ladder(spec, profile):
        shapes = matrices(spec, 1.0 - c.mlp_prune).items()
        divisible = all(group_fits(c.weights[g], s) for g, s in shapes if s)
        est = (
            estimate(spec, profile, c, context=context, batch=batch, runtime=runtime[0])
            if divisible
            else None
        )
        reason = _why_rejected(spec, c, est, budget, latency_ms)
        spec_choice: dict[str, Any] = {"kind": "none"}
        if reason is None and est is not None and speculative != "none":
            spec_choice, est, reason = _draft_choice(
                spec, c, est, speculative, budget, context, batch
            )
        if reason is None and est is not None:
            chosen = _explain(spec, profile, c, est, context, batch, latency_ms, runtime, rejected)
            chosen.speculative = spec_choice
            if spec_choice.get("reason"):
                chosen.reasons.append(spec_choice["reason"])
            return chosen
        rejected.append({"option": c.name, "reason": reason or ""})
        if est is not None:
            tried.append((c, est))
    raise PlanError(_refusal(spec, profile, tried, context, batch, latency_ms, budget))


def _draft_choice(
    spec: ModelSpec,
    c: Compression,
    est: Estimate,
    speculative: str,
    budget: float,
    context: int,
    batch: int,
) -> tuple[dict[str, Any], Estimate, str | None]:
    """(the speculative choice, the estimate with the draft's memory, why `c` is rejected)."""
    ngram: dict[str, Any] = {
        "kind": "ngram",
        "bytes": 0,
        "reason": "speculative: prompt lookup (n-gram) drafts, no draft model in memory",
    }
    draft = self_draft(c)
    if speculative == "ngram":
        return ngram, est, None
    if draft is None:
        if speculative == "auto":
            ngram["reason"] += f" ({c.name} is INT4 already: a self-draft would be the target)"
            return ngram, est, None
        return {"kind": "none"}, est, f"{c.name} is INT4 already: no smaller self-draft exists"
    need = draft_bytes(spec, draft, context, batch)
    with_draft = replace(est, total=est.total + need, draft=need)
    if with_draft.total > budget:
        if speculative == "auto":
            ngram["reason"] += f" (an INT4 self-draft, {_gb(need)}, does not fit beside it)"
            return ngram, est, None
        return (
            {"kind": "none"},
            est,
            f"with its INT4 self-draft ({_gb(need)}) needs {_gb(with_draft.total)}, over the "
            f"budget of {_gb(budget)}",
        )
    chosen = {
        "kind": "self",
        "draft": draft.name,
        "weights": draft.weights,
        "bytes": need,
        "reason": f"speculative: an INT4 self-draft ({draft.name}, {_gb(need)} with its KV "
        "cache) drafts for the target; output stays the target's",
    }
    return chosen, with_draft, None


def pick_runtime(profile: DeviceProfile) -> tuple[str, str]:
    """(runtime, why): the device's most preferred runtime (a profile names only the targets
    infopt ships: `infopt.device_profiles` checks that on load)."""
    return profile.runtimes[0], f"runtime {profile.runtimes[0]}: {profile.name}'s preferred runtime"


def choice_reasons(c: Compression, profile: DeviceProfile) -> list[str]:
    """One sentence per decision of the chosen option."""
    w = c.weights
    if w["attention"].startswith("int4"):
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
        else f"KV cache {c.kv_dtype}: the device's working precision; not quantized"
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


def _explain(
    spec: ModelSpec,
    profile: DeviceProfile,
    c: Compression,
    est: Estimate,
    context: int,
    batch: int,
    latency_ms: float | None,
    runtime_choice: tuple[str, str],
    rejected: list[dict[str, str]],
) -> Plan:
    runtime, runtime_reason = runtime_choice
    reasons = [
        f"{c.name}: the least lossy option that fits {profile.name} "
        f"({_gb(est.total)} of {_gb(profile.usable_bytes)} usable, keeping "
        f"{HEADROOM:.0%} headroom)" + (f" and meets {latency_ms:g} ms/token" if latency_ms else ""),
        f"memory: weights {_gb(est.weights)} + KV cache {_gb(est.kv_cache)} ({context} tokens x "
        f"batch {batch}, {c.kv_dtype}) + activations {_gb(est.activations)} + {runtime} overhead "
        f"{_gb(est.overhead)}"
        + (f" + speculative draft {_gb(est.draft)}" if est.draft else "")
        + "; the quick formula (params x bytes x 1.2) says "
        f"{_gb(est.quick_formula)}",
        f"speed: {est.decode_tok_s:.1f} tok/s decode ({est.ms_per_token:.1f} ms/token, "
        f"{est.bound}-bound), {est.prefill_tok_s:.0f} tok/s prefill",
        runtime_reason,
    ]
    reasons += choice_reasons(c, profile)
    if profile.static_shapes:
        reasons.append(
            f"{profile.name} compiles static shapes: fixed {context}-token KV window, "
            "fixed prefill chunk and single-token decode"
        )
    if not rejected:
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


def _refusal(
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
