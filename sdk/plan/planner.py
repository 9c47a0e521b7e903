"""The planner: the least lossy compression that fits a device with headroom and meets a latency
target, with the reasons for the choice and for every less lossy option it rejected.

Needs only the model config: a 70B `config.json` plans without weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from infopt.core.defaults import DEFAULT_MAX_CONTEXT
from infopt.core.spec import ModelSpec
from infopt.device_profiles import DeviceProfile
from infopt.errors import InvalidArgumentError, PlanError
from infopt.plan.costs import (
    Compression,
    Estimate,
    draft_bytes,
    estimate,
    group_fits,
    matrices,
    self_draft,
    with_kv,
)
from infopt.plan.explain import GB, HEADROOM, STORED, Plan, _gb, explain, refusal

# Named scenarios, as per-token decode latency targets in milliseconds.
SCENARIOS = {"code-completion": 50.0, "chat": 200.0, "batch": None}
SPECULATIVE = ("none", "auto", "self", "ngram")
FLOATS = ("fp32", "fp16", "bf16")
QUANTIZE = ("int8", "int4", "int4-gptq")  # and any scheme name, e.g. int4s-g64
__all__ = ["GB", "HEADROOM", "Plan", "load_plan", "plan", "replan", "requested"]


def _int4(group: int, head: str = "int8") -> dict[str, str]:
    return {
        "embeddings": head,
        "lm_head": head,
        "attention": f"int4-g{group}",
        "mlp": f"int4-g{group}",
    }


def quantized_kv(profile: DeviceProfile) -> str:
    """The KV-cache precision of a quantized plan: the device's preferred 16-bit float."""
    return next((p for p in ("bf16", "fp16") if p in profile.compute_precisions), "fp16")


def ladder(spec: ModelSpec, profile: DeviceProfile) -> list[Compression]:
    """Candidate combinations, least lossy first, restricted to what the device stores."""
    every = ("embeddings", "lm_head", "attention", "mlp")
    floats = [p for p in ("fp32", "bf16", "fp16") if p in profile.weight_precisions]
    if profile.kind != "cpu":
        floats = [p for p in floats if p != "fp32"] or floats  # accelerators: 16-bit first
    steps = [Compression(f, dict.fromkeys(every, f), kv_dtype=f) for f in floats]
    kv = quantized_kv(profile)
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


def requested(
    spec: ModelSpec,
    profile: DeviceProfile,
    quantize: str,
    file_weights: dict[str, str] | None = None,
) -> tuple[Compression, str]:
    """(the compression `quantize` asks for, its method: "rtn" or "gptq"). Spellings:
    `int8` (every group INT8 per channel); `int4` and `int4-gptq` (the blocks INT4 in the finest
    group that divides them, 32 where it can, the embeddings and LM head INT8; by GPTQ for the
    latter), or the file's own blocks where it stores INT4 already (`file_weights`, a GGUF's Q4_0 /
    Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q2_K–Q6_K: kept as they are, not rounded twice); a float (`fp16`,
    ...: everything that); or a scheme name (`int4s-g64`, `int8-g32`, ...: the blocks in it, the
    embeddings and LM head INT8, or that scheme when it is an INT8 one)."""
    check_quantize(quantize)
    kv = quantized_kv(profile)
    name, method = quantize, "rtn"
    if quantize in FLOATS:
        return Compression(quantize, dict.fromkeys(_GROUPS, quantize), kv_dtype=quantize), method
    if quantize == "int8":
        return Compression("int8 (requested)", dict.fromkeys(_GROUPS, "int8"), kv_dtype=kv), method
    if quantize in ("int4", "int4-gptq"):
        method = "gptq" if quantize == "int4-gptq" else "rtn"
        blocks = (file_weights or {}).get("attention", "")
        if method == "rtn" and file_weights and blocks.startswith("int4"):
            weights = dict(file_weights)
            return Compression(f"{blocks}{STORED}", weights, kv_dtype=kv), method
        shapes = matrices(spec)
        group = next(
            (
                g
                for g in (32, 64, 128)
                if group_fits(f"int4-g{g}", shapes["attention"] + shapes["mlp"])
            ),
            32,
        )
        return Compression(f"int4 g{group} ({quantize})", _int4(group), kv_dtype=kv), method
    from infopt.core.quant import QuantScheme

    scheme = QuantScheme.parse(name)
    head = scheme.name if scheme.bits == 8 else "int8"
    weights = {"embeddings": head, "lm_head": head, "attention": name, "mlp": name}
    return Compression(f"{name} (requested)", weights, kv_dtype=kv), method


_GROUPS = ("embeddings", "lm_head", "attention", "mlp")


def check_quantize(quantize: str) -> None:
    """An `InvalidArgumentError` listing the spellings unless `quantize` is one (`requested`)."""
    from infopt.core.quant import SCHEME, QuantScheme

    if quantize in FLOATS or quantize in QUANTIZE:
        return
    if SCHEME.fullmatch(quantize):  # a scheme's own error names what is wrong (the group)
        QuantScheme.parse(quantize)
        return
    raise InvalidArgumentError(
        f"--quantize {quantize!r}: expected {', '.join(QUANTIZE)}, a float "
        f"({', '.join(FLOATS)}) or a scheme (int8-g<group>, int8m-g<group>, int4-g<group>, "
        "int4s-g<group>, int4m-g<group>, the group a power of two)"
    )


def as_stored(
    profile: DeviceProfile, runtimes: Sequence[str], file_weights: dict[str, str] | None
) -> Compression | None:
    """The model file's own quantized blocks kept as they are (a GGUF's Q4_0 / Q4_1 / Q5_0 / Q5_1 /
    Q8_0 / Q2_K–Q6_K), where the file stores some and every one of `runtimes` on `profile` keeps
    them: the CPU runtimes (mobile ones round INT4 to symmetric, and on accelerators 16-bit floats
    are the fast path); else None."""
    from infopt.runtimes.registry import names, target

    if not file_weights or all(s in FLOATS for s in file_weights.values()):
        return None
    if profile.kind != "cpu" or any(r not in names() or target(r).symmetric_int4 for r in runtimes):
        return None
    kinds = {s.split("-")[0][:4] for s in file_weights.values() if s not in FLOATS}
    if not all(k in profile.weight_precisions for k in kinds):
        return None
    # the file's values, exactly: a float32 cache, as the float32 step of the ladder has
    blocks = file_weights.get("attention", "")
    return Compression(f"{blocks}{STORED}", dict(file_weights), kv_dtype="fp32")


def plan(
    spec: ModelSpec,
    profile: DeviceProfile,
    *,
    context: int | None = None,
    batch: int = 1,
    latency_ms: float | None = None,
    speculative: str = "none",
    quantize: str | None = None,
    file_weights: dict[str, str] | None = None,
    runtimes: Sequence[str] = (),
) -> Plan:
    """Choose and explain a compression plan; PlanError when nothing fits.

    speculative: "none", "ngram" (no memory), "self" (an INT4 self-draft whose weights and KV
    cache must fit beside the target's) or "auto" (the self-draft where the target is above
    INT4 and both fit, else prompt lookup). quantize: take this weight storage (`requested`)
    instead of searching for the least lossy one that fits; `file_weights` are the schemes a
    model file stores its groups in, when it stores them quantized; `runtimes`: those the
    bundle will carry when they are not the device's own choice (they decide whether the file's
    blocks can be kept as they are). context: tokens the KV cache holds (default: the model's
    trained context, at most `DEFAULT_MAX_CONTEXT`)."""
    if speculative not in SPECULATIVE:
        raise InvalidArgumentError(f"speculative={speculative!r}: expected one of {SPECULATIVE}")
    # the context `infopt.load` and `run` give a model by default, so that a plan and a run agree
    context = (
        context if context is not None else min(spec.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    )
    whole = (context, batch)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in whole) or not (
        latency_ms is None
        or (isinstance(latency_ms, (int, float)) and not isinstance(latency_ms, bool))
    ):
        raise InvalidArgumentError(
            f"context={context!r}, batch={batch!r}, latency_ms={latency_ms!r}: context and batch "
            "must be integers, latency_ms a number"
        )
    bad = [f"context={context}"] * (context < 1) + [f"batch={batch}"] * (batch < 1)
    bad += [f"latency_ms={latency_ms}"] * (latency_ms is not None and latency_ms <= 0)
    if bad:
        raise InvalidArgumentError(f"{', '.join(bad)}: must be positive")
    if context > spec.max_position_embeddings:
        raise InvalidArgumentError(
            f"context={context} exceeds the model's trained context of "
            f"{spec.max_position_embeddings}"
        )
    budget = profile.usable_bytes * (1 - HEADROOM)
    runtime = pick_runtime(profile)
    rejected: list[dict[str, str]] = []
    tried: list[tuple[Compression, Estimate]] = []
    method = "rtn"
    candidates = ladder(spec, profile)
    stored = as_stored(profile, runtimes or [runtime[0]], file_weights)
    if quantize is not None:
        asked, method = requested(spec, profile, quantize, file_weights)
        if stored is not None and asked.weights == stored.weights:
            asked = stored  # what the plan without --quantize keeps: the same plan, cache too
        candidates = [asked]
    elif stored is not None:
        # the file's own blocks lose nothing against the file (a float copy holds the same
        # values) and are the smallest and fastest form of them: first, before any float
        if speculative == "self" and self_draft(stored) is None:
            # going on would plan a float copy (several times larger and slower) only so
            # that an INT4 draft of it exists: not what anyone asking for speed means
            int4 = sorted(w for w in stored.weights.values() if w.startswith("int4"))
            raise InvalidArgumentError(
                f"speculative='self': the model file stores INT4 already ({int4[0]} blocks, "
                "kept as they are on this device), "
                "so its self-draft would be the model itself. Keep its blocks without a "
                "draft, draft by prompt lookup ('ngram'), give a smaller draft model, or ask "
                "for a float target (--quantize fp16) if a float copy with an INT4 draft is "
                "what you want"
            )
        candidates = [stored, *candidates]
    seen: set[str] = set()
    for asked_for in candidates:
        c = runtime_kv(asked_for, runtime[0])
        if asked_for.kv_dtype == "int8" and c.kv_dtype != "int8":
            c = replace(c, name=c.name.replace(" + kv int8", ""))
            if c.name in seen:  # the same option without its int8 cache: tried already
                why = f"{runtime[0]} holds its KV cache in {c.kv_dtype}, not int8"
                rejected.append({"option": asked_for.name, "reason": why})
                continue
        seen.add(c.name)
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
            chosen = explain(
                spec, profile, c, est, context, batch, latency_ms, runtime, rejected, quantize
            )
            chosen.method = method
            chosen.speculative = spec_choice
            if spec_choice.get("reason"):
                chosen.reasons.append(spec_choice["reason"])
            return chosen
        rejected.append({"option": c.name, "reason": reason or ""})
        if est is not None:
            tried.append((c, est))
    raise PlanError(refusal(spec, profile, tried, context, batch, latency_ms, budget))


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


def runtime_kv(c: Compression, runtime: str) -> Compression:
    """`c` with the KV-cache precision `runtime` really holds its cache in (some take the plan's,
    others have their own, whatever the plan asks)."""
    from infopt.runtimes.registry import names, target

    own = target(runtime).kv_dtype if runtime in names() else None
    if own == "weights":
        kinds = set(c.weights.values())
        own = kinds.pop() if len(kinds) == 1 and kinds <= {"fp32", "fp16", "bf16"} else "fp32"
    return c if own is None or own == c.kv_dtype else replace(c, kv_dtype=own)


def pick_runtime(profile: DeviceProfile) -> tuple[str, str]:
    """(runtime, why): the device's most preferred runtime (a profile names only the targets
    infopt ships: `infopt.device_profiles` checks that on load)."""
    return profile.runtimes[0], f"runtime {profile.runtimes[0]}: {profile.name}'s preferred runtime"


def load_plan(path: str | Path) -> Plan:
    """A plan saved by `infopt-pack plan --json` (possibly edited); unknown keys refused."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"{path}: not a readable plan JSON file ({e})") from e
    names = {f.name for f in fields(Plan)}
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"{path}: a plan is a JSON object")
    optional = {"rejected", "speculative", "method"}  # older plan files lack these
    unknown, missing = set(data) - names, names - optional - set(data)
    if unknown or missing:
        raise InvalidArgumentError(
            f"{path}: not a plan (unknown keys {sorted(unknown)}, missing {sorted(missing)})"
        )
    return Plan(**data)


def replan(
    p: Plan,
    spec: ModelSpec,
    profile: DeviceProfile,
    runtime: str | None = None,
    file_weights: dict[str, str] | None = None,
) -> Plan:
    """`p` as it will be built, re-estimated and re-explained: its compression (edited by hand,
    made symmetric for a target, ...) on `profile`, loaded on `runtime` (default: its own; another
    is one asked for with --runtime), so that the plan a bundle records describes what it holds.
    `file_weights`: the model file's stored schemes, to name a plan that keeps them so."""
    from dataclasses import fields as dataclass_fields

    known = {f.name for f in dataclass_fields(Compression)}
    c = Compression(**{k: v for k, v in p.compression.items() if k in known})
    # the fields the build applies, not the compression record's copies of them
    c = replace(c, mlp_prune=float(p.pruning.get("sparsity") or 0.0), low_rank=p.low_rank_ratio)
    kept = c.weights == file_weights and not c.mlp_prune and not c.low_rank
    c = replace(c, name=f"{c.weights['attention']}{STORED}" if kept else describe_weights(c))
    name = runtime or p.runtime
    c = runtime_kv(c, name)
    est = estimate(spec, profile, c, context=p.context, batch=p.batch, runtime=name)
    if p.speculative.get("bytes"):
        est = replace(
            est, total=est.total + float(p.speculative["bytes"]), draft=p.speculative["bytes"]
        )
    from infopt.runtimes.registry import names

    preferred, reason = pick_runtime(profile)
    if name != p.runtime:
        reason = f"runtime {name}: asked for (--runtime), instead of the plan's {p.runtime}"
    elif name != preferred:
        reason = f"runtime {name}: the plan file's choice, instead of {profile.name}'s {preferred}"
    if name not in names():
        reason += "; infopt has no such runtime, so the bundle carries the reference artifact"
    again = explain(
        spec,
        profile,
        c,
        est,
        p.context,
        p.batch,
        p.latency_target_ms,
        (name, reason),
        [],
        "as built",
    )
    again.method, again.speculative = p.method, p.speculative
    if p.speculative.get("reason"):
        again.reasons.append(p.speculative["reason"])
    return again


def describe_weights(c: Compression) -> str:
    """A compression's name from its weights: one scheme for all, else the blocks' and the
    embeddings'."""
    w = c.weights
    if len(set(w.values())) == 1:
        base = next(iter(w.values()))
    else:
        blocks = w["attention"] if w["attention"] == w["mlp"] else f"{w['attention']}/{w['mlp']}"
        heads = (
            w["embeddings"]
            if w["embeddings"] == w["lm_head"]
            else f"{w['embeddings']}/{w['lm_head']}"
        )
        base = f"{blocks} (embeddings/LM head {heads})"
    extras = [f"kv {c.kv_dtype}"] if c.kv_dtype == "int8" else []
    if c.mlp_prune:
        extras.append(f"MLP channels pruned {c.mlp_prune:.0%}")
    if c.low_rank:
        extras.append(f"low-rank {c.low_rank:.0%}")
    return " + ".join([base, *extras])
