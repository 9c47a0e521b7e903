"""Accuracy-aware plan search: every candidate plan that fits a device is compressed for real and
measured, and the Pareto front of size, quality and speed decides, not the planner's ladder alone.

A candidate is one compression (weight schemes and group sizes, RTN or GPTQ, structured MLP
pruning, low-rank factors). Each one runs as a job (`evaluate_candidate`, on a local process
pool or Ray: `infopt.plan.executors`): the model file is loaded, compressed as the candidate
says, and scored on a held-out text against the uncompressed model (perplexity, KL divergence,
top-1 agreement); where the device is this machine, its decode speed is measured on the
device's runtime, elsewhere predicted by the speed model. Results are cached by content (the
model file's hash, the candidate, the evaluation settings, infopt's version), so a rerun or a
wider search computes only what is new, and an interrupted one resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from infopt.core.defaults import DEFAULT_MAX_CONTEXT
from infopt.core.spec import ModelSpec
from infopt.device_profiles import DeviceProfile
from infopt.errors import InvalidArgumentError, PlanError
from infopt.plan.costs import Compression, estimate, group_fits, matrices
from infopt.plan.executors import Needs, Outcome, make_executor
from infopt.plan.explain import HEADROOM, STORED, Plan, explain
from infopt.plan.planner import _int4, pick_runtime, quantized_kv, runtime_kv

# Raised whenever the evaluation changes what a result means: cached results of another
# revision are not reused.
REVISION = 1
TEXT_TOKENS = 1024  # held-out tokens scored per candidate (the text's first ones)
WINDOW = 256  # perplexity window; the stride is half of it
SPEED_TOKENS = 32  # decode steps timed per candidate (after a short prompt)
MIN_TOKENS = 64
KV_CHUNK = 16  # tokens per pass when scoring a candidate with an int8 KV cache


@dataclass(frozen=True)
class Candidate:
    compression: Compression
    method: str = "rtn"  # how quantized groups are rounded: "rtn" | "gptq"
    stored: bool = False  # the model file's own blocks, kept as they are (not rounded again)

    @property
    def name(self) -> str:
        return self.compression.name + (" GPTQ" if self.method == "gptq" else "")

    def key(self) -> dict[str, Any]:
        """What the result depends on (the name does not)."""
        c = self.compression
        key = {
            "weights": dict(sorted(c.weights.items())),
            "mlp_prune": c.mlp_prune,
            "low_rank": c.low_rank,
            "method": self.method,
        }
        if self.compression.kv_dtype == "int8":  # measured with an int8 cache
            key["kv_dtype"] = "int8"
        return {**key, "stored": True} if self.stored else key


def candidates(
    spec: ModelSpec,
    profile: DeviceProfile,
    context: int,
    batch: int = 1,
    wide: bool = False,
    file_weights: dict[str, str] | None = None,
    gptq: bool = True,
) -> tuple[list[Candidate], list[dict[str, str]]]:
    """(the candidates that fit `profile`, the others with the reason). The default set: the
    device's float format, INT8, INT4 at each group size that divides the model (RTN and
    GPTQ), and the coarsest INT4 with 25 % of the MLP channels pruned or low-rank factors
    keeping 80 % of the parameters (by RTN: GPTQ on factors is not built); `wide` adds INT4
    tables, symmetric INT4, harder pruning, lower ranks and pruning with GPTQ; a model file
    that stores its blocks quantized (a GGUF's Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q2_K–Q6_K) adds
    them as they are."""
    every = ("embeddings", "lm_head", "attention", "mlp")
    kv = quantized_kv(profile)
    floats = [p for p in ("fp32", "bf16", "fp16") if p in profile.weight_precisions]
    out: list[Candidate] = []
    if floats:
        out.append(Candidate(Compression(floats[0], dict.fromkeys(every, floats[0]), floats[0])))
    if "int8" in profile.weight_precisions:
        out.append(Candidate(Compression("int8", dict.fromkeys(every, "int8"), kv)))
    # a GGUF's Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q2_K–Q6_K as they are, wherever the device stores
    # INT4: measured on every device (the planner's `as_stored` offers them first only where
    # they are also fast)
    if file_weights and "int4" in profile.weight_precisions:
        name = f"{file_weights['attention']}{STORED}"
        out.append(Candidate(Compression(name, dict(file_weights), kv), stored=True))
    shapes = matrices(spec)
    blocks = shapes["attention"] + shapes["mlp"]
    groups = [g for g in (32, 64, 128) if group_fits(f"int4-g{g}", blocks)]
    if "int4" in profile.weight_precisions and groups:
        for g in groups:
            c = Compression(f"int4 g{g}", _int4(g), kv)
            out += [Candidate(c), Candidate(c, "gptq")] if gptq else [Candidate(c)]
        coarse = Compression(f"int4 g{groups[-1]}", _int4(groups[-1]), kv)
        out.append(
            Candidate(replace(coarse, name=f"{coarse.name} + MLP pruned 25%", mlp_prune=0.25))
        )
        out.append(Candidate(replace(coarse, name=f"{coarse.name} + low-rank 80%", low_rank=0.8)))
        if wide:
            fine = groups[0]
            out.append(
                Candidate(Compression(f"int4 g{fine} everywhere", _int4(fine, f"int4-g{fine}"), kv))
            )
            sym = {g: f"int4s-g{fine}" for g in ("attention", "mlp")}
            out.append(Candidate(Compression(f"int4s g{fine}", {**_int4(fine), **sym}, kv)))
            out.append(
                Candidate(replace(coarse, name=f"{coarse.name} + MLP pruned 50%", mlp_prune=0.5))
            )
            out.append(
                Candidate(replace(coarse, name=f"{coarse.name} + low-rank 60%", low_rank=0.6))
            )
            if gptq:
                pruned_gptq = replace(
                    coarse, name=f"{coarse.name} + MLP pruned 25%", mlp_prune=0.25
                )
                out.append(Candidate(pruned_gptq, "gptq"))
    runtime = pick_runtime(profile)[0]
    # an int8 KV cache: where the device's runtime keeps the plan's cache precision; the others
    # keep their own, whatever the plan says
    quantized = [c for c in out if c.compression.weights["mlp"] in ("int8", *_int4s(groups))]
    kv_int8 = [
        Candidate(replace(c.compression, name=f"{c.name} + kv int8", kv_dtype="int8"), c.method)
        for c in quantized
        if c.method == "rtn" and not c.compression.mlp_prune and not c.compression.low_rank
    ]
    own = runtime_kv(Compression("probe", {}, "int8"), runtime).kv_dtype
    fitting: list[Candidate] = []
    rejected: list[dict[str, str]] = []
    if own == "int8":
        out += kv_int8
    else:
        rejected += [
            {"option": c.name, "reason": f"{runtime} holds its KV cache in {own}, not int8"}
            for c in kv_int8
        ]
    budget = profile.usable_bytes * (1 - HEADROOM)
    for cand in out:
        c = runtime_kv(cand.compression, runtime)
        pruned = matrices(spec, 1.0 - c.mlp_prune)
        if not all(group_fits(c.weights[g], s) for g, s in pruned.items() if s):
            rejected.append({"option": cand.name, "reason": "a group size does not divide"})
            continue
        est = estimate(spec, profile, c, context=context, batch=batch, runtime=runtime)
        if est.total > budget:
            rejected.append({"option": cand.name, "reason": f"needs {est.total / 1e9:.2f} GB"})
            continue
        fitting.append(Candidate(c, cand.method, cand.stored))
    fitting.sort(key=lambda c: c.compression.kv_dtype == "int8")  # plain caches first
    return fitting, rejected


def _int4s(groups: list[int]) -> list[str]:
    return [f"int4-g{g}" for g in groups]


def job_needs(spec: ModelSpec, threads: int = 1) -> Needs:
    """One job holds the float model twice (the reference and the copy it compresses) plus a
    runtime's copy of the compressed one: the planner's memory model, at fp32; and the CPUs
    its threads use."""
    from infopt.device_profiles import load_profile
    from infopt.runtimes.registry import reference

    host = load_profile("host")
    fp32 = Compression("fp32", dict.fromkeys(("embeddings", "lm_head", "attention", "mlp"), "fp32"))
    one = estimate(spec, host, fp32, context=WINDOW, runtime=reference().name).total
    return Needs(cpus=threads, memory=3 * one)


def result_key(model_hash: str, candidate: Candidate, settings: dict[str, Any]) -> str:
    from infopt import __version__

    payload = {
        "model": model_hash,
        "candidate": candidate.key(),
        "settings": settings,
        "infopt": __version__,
        "revision": REVISION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_dir() -> Path:
    from infopt.bundle.cache import cache_root

    return cache_root().parent / "search"


def _cached(key: str) -> dict[str, Any] | None:
    path = cache_dir() / f"{key}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent, or damaged: computed again
    return data if isinstance(data, dict) and data.get("key") == key else None


def _store(key: str, result: dict[str, Any]) -> None:
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({**result, "key": key}, indent=1), encoding="utf-8")
    os.replace(tmp, folder / f"{key}.json")  # whole or absent, whoever writes it


def evaluate_candidate(job: dict[str, Any]) -> dict[str, Any]:
    """One candidate, compressed and measured (a job of the executors: plain data in and out).

    job: model (path), device (profile name), candidate (`Candidate.key()` and its name),
    context, batch, text (held-out token ids), calibration (token id windows, GPTQ), measure
    (time decode on the device's runtime here), threads."""
    import torch

    from infopt.compress.apply import apply_plan
    from infopt.core.model import load_core
    from infopt.device_profiles import load_profile
    from infopt.importers import open_model
    from infopt.measure.quality import score
    from infopt.runtimes.registry import reference, target

    started = time.perf_counter()
    torch.set_num_threads(job.get("threads") or 1)
    source = open_model(job["model"])
    spec, profile = source.spec, load_profile(job["device"])
    key = job["candidate"]
    c = Compression(job["name"], key["weights"], job["kv_dtype"], key["mlp_prune"], key["low_rank"])
    runtime = pick_runtime(profile)
    est = estimate(spec, profile, c, context=job["context"], batch=job["batch"], runtime=runtime[0])
    p = explain(spec, profile, c, est, job["context"], job["batch"], None, runtime, [], "search")
    p.method = key["method"]
    runs = reference().module("runtime")
    base = runs.from_model(load_core(source, WINDOW, device="cpu"), max_context=WINDOW)
    core = load_core(source, WINDOW, device="cpu", stored=bool(key.get("stored")))
    calibration = torch.tensor(job["calibration"], dtype=torch.long)
    apply_plan(core, p, calibration, gptq=key["method"] == "gptq")
    kv8 = key.get("kv_dtype") == "int8"
    if kv8:  # the device's runtime keeps such a cache (only those get the candidate), exact
        runs_kv = target(runtime[0]).module("runtime")
        compressed = runs_kv.from_model(core, max_context=WINDOW, kv_dtype="int8", numerics="exact")
    else:
        compressed = runs.from_model(core, max_context=WINDOW)
    # an int8 cache matters only where keys are read back from it: the windows in short passes
    q = score(compressed, job["text"], base, window=WINDOW, pass_tokens=KV_CHUNK if kv8 else None)
    ref = q.reference_perplexity or q.perplexity
    speed: dict[str, Any] = {"tok_s": round(est.decode_tok_s, 1), "speed": "predicted"}
    if job.get("measure"):
        speed = {
            "tok_s": _decode_speed(target(runtime[0]).module("runtime"), core, job),
            "speed": "measured",
        }
    return {
        "name": job["name"],
        "candidate": key,
        "bytes": round(est.weights),
        "memory_bytes": round(est.total),
        "perplexity": round(q.perplexity, 4),
        "reference_perplexity": round(ref, 4),
        "ppl_delta": round(q.perplexity / ref - 1, 5),
        "kl": round(q.kl or 0.0, 6),
        "top1": round(q.top1 or 0.0, 4),
        "tokens": q.tokens,
        **speed,
        "runtime": runtime[0],
        "measured_on": _machine() if job.get("measure") else None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _decode_speed(runs: Any, core: Any, job: dict[str, Any]) -> float:
    """Decode tokens/s of the compressed core on the device's runtime: the median step over
    SPEED_TOKENS single-token passes after a 16-token prompt."""
    rt = runs.from_model(core, max_context=WINDOW, threads=job.get("threads") or 1)
    ids = list(job["text"][:16])
    rt.forward(ids, only_last=True)
    steps = []
    token = ids[-1]
    for _ in range(SPEED_TOKENS):
        t = time.perf_counter()
        logits = rt.forward([token], only_last=True)
        steps.append(time.perf_counter() - t)
        token = int(logits[-1].argmax())
    return round(1.0 / statistics.median(steps), 1)


def pareto(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results no other beats on all of size (the memory the plan needs: weights, KV cache,
    activations), perplexity and speed, and strictly on one; smallest first."""
    rows = list(results)

    def beats(a: dict[str, Any], b: dict[str, Any]) -> bool:
        no_worse = (
            a["memory_bytes"] <= b["memory_bytes"]
            and a["perplexity"] <= b["perplexity"]
            and a["tok_s"] >= b["tok_s"]
        )
        better = (
            a["memory_bytes"] < b["memory_bytes"]
            or a["perplexity"] < b["perplexity"]
            or a["tok_s"] > b["tok_s"]
        )
        return no_worse and better

    front = [r for r in rows if not any(beats(o, r) for o in rows if o is not r)]
    return sorted(front, key=lambda r: (r["memory_bytes"], r["perplexity"]))


def choose(
    results: list[dict[str, Any]], max_ppl_delta: float | None, latency_ms: float | None
) -> dict[str, Any] | None:
    """The smallest result (in memory) within the perplexity increase and the latency asked
    for (the lower perplexity between equal sizes); None when none is."""
    ok = [
        r
        for r in results
        if (max_ppl_delta is None or r["ppl_delta"] <= max_ppl_delta)
        and (latency_ms is None or 1000.0 / r["tok_s"] <= latency_ms)
    ]
    return min(ok, key=lambda r: (r["memory_bytes"], r["perplexity"])) if ok else None


DEFAULT_MAX_PPL_DELTA = 0.05  # when neither bound is given: within 5 % of the model's perplexity


def search(
    model: str | Path | None,
    device: str,
    *,
    context: int | None = None,
    batch: int = 1,
    max_ppl_delta: float | None = None,
    latency_ms: float | None = None,
    executor: str = "local",
    address: str | None = None,
    workers: int = 1,
    wide: bool = False,
    gptq: bool = True,
    text_file: str | Path | None = None,
    tokens: int = TEXT_TOKENS,
    threads: int = 1,
    plan_out: str | Path | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Search the candidate plans of `model` (None: the default model) for `device`; returns
    the candidates' results (cached ones marked), the Pareto front, the chosen one (and its
    plan, written to `plan_out` for `build --plan`), failures and the rejected candidates.
    `gptq=False` leaves out the GPTQ candidates (the slow ones)."""
    from infopt.compress.calibration import calibration_ids, read_text, shipped_text
    from infopt.core.default_model import default_model_path
    from infopt.device_profiles import load_profile
    from infopt.importers import content_hash, open_model

    for name, count in (("batch", batch), ("threads", threads), ("tokens", tokens)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidArgumentError(f"{name}={count!r}: expected an integer >= 1")
    if tokens < MIN_TOKENS:
        raise InvalidArgumentError(f"tokens={tokens}: the search scores at least {MIN_TOKENS}")
    for name, value in (("max_ppl_delta", max_ppl_delta), ("latency_ms", latency_ms)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
        ):
            raise InvalidArgumentError(f"{name}={value!r}: expected a number > 0")
    if max_ppl_delta is None and latency_ms is None:
        max_ppl_delta = DEFAULT_MAX_PPL_DELTA
    path = Path(model) if model is not None else default_model_path()
    source = open_model(path)
    spec, profile = source.spec, load_profile(device)
    context = (
        context if context is not None else min(spec.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    )
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise InvalidArgumentError(f"context={context!r}: expected an integer >= 1")
    if context > spec.max_position_embeddings:
        raise InvalidArgumentError(
            f"context={context} exceeds the model's trained context of "
            f"{spec.max_position_embeddings}"
        )
    text = read_text(text_file, "held-out text") if text_file else shipped_text("quality.txt")
    ids = source.tokenizer.encode(text)[:tokens]
    if len(ids) < MIN_TOKENS:
        raise InvalidArgumentError(
            f"the held-out text has {len(ids)} tokens; the search scores at least {MIN_TOKENS}"
        )
    found, rejected = candidates(
        spec, profile, context, batch, wide, source.stored_weights(), gptq=gptq
    )
    if not found:
        raise PlanError(f"no candidate plan fits {profile.name}: {rejected}")
    measure = device == "host"
    settings: dict[str, Any] = {
        # the profile's contents, not its name: an edited .toml is another device
        "device": hashlib.sha256(
            json.dumps(profile.to_dict(), sort_keys=True, default=str).encode()
        ).hexdigest(),
        "context": context,
        "batch": batch,
        "text": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
        "measure": measure,
        "threads": threads,
    }
    if measure:  # a timing belongs to the machine and to the jobs running beside it
        settings.update(machine=_machine(), executor=executor, workers=workers, address=address)
    model_hash = content_hash(path)
    calibration = calibration_ids(source.tokenizer).tolist()
    results: list[dict[str, Any]] = []
    jobs = []
    for cand in found:
        key = result_key(model_hash, cand, settings)
        hit = _cached(key)
        if hit is not None:
            hit["cached"] = True
            results.append(hit)
            if on_result:
                on_result(hit)
            continue
        jobs.append(
            {
                "key": key,
                "model": str(path),
                "device": device,
                "name": cand.name,
                "candidate": cand.key(),
                "kv_dtype": cand.compression.kv_dtype,
                "context": context,
                "batch": batch,
                "text": ids,
                "calibration": calibration,
                "measure": measure,
                "threads": threads,
            }
        )
    failures = []
    if jobs:
        runner = make_executor(executor, workers=workers, address=address)
        outcome: Outcome
        for outcome in runner.run(evaluate_candidate, jobs, job_needs(spec, threads)):
            if outcome.result is None:
                failures.append({"name": outcome.job["name"], "error": outcome.error})
                continue
            _store(outcome.job["key"], outcome.result)
            row = {**outcome.result, "cached": False}
            results.append(row)
            if on_result:
                on_result(row)
    results.sort(key=lambda r: (r["memory_bytes"], r["perplexity"]))
    front = pareto(results)
    chosen = choose(results, max_ppl_delta, latency_ms)
    plan_dict = None
    if chosen is not None:
        plan_dict = _plan_of(spec, profile, chosen, context, batch, latency_ms, max_ppl_delta)
        if plan_out is not None:
            Path(plan_out).write_text(json.dumps(plan_dict, indent=2), encoding="utf-8")
    return {
        "model": str(path),
        "device": profile.name,
        "executor": executor,
        "threads": threads,
        "constraints": {"max_ppl_delta": max_ppl_delta, "latency_ms": latency_ms},
        "results": results,
        "front": [r["name"] for r in front],
        "chosen": chosen["name"] if chosen else None,
        "plan": plan_dict,
        "plan_file": str(plan_out) if plan_out is not None and chosen is not None else None,
        "failures": failures,
        "rejected": rejected,
    }


def _plan_of(
    spec: ModelSpec,
    profile: DeviceProfile,
    row: dict[str, Any],
    context: int,
    batch: int,
    latency_ms: float | None,
    max_ppl_delta: float | None,
) -> dict[str, Any]:
    """The plan `build --plan` takes for a chosen result, its reasons saying why."""
    key = row["candidate"]
    kv = quantized_kv(profile)
    floats = set(key["weights"].values()) <= {"fp32", "bf16", "fp16"}
    c = Compression(
        row["name"],
        key["weights"],
        key.get("kv_dtype") or (next(iter(key["weights"].values())) if floats else kv),
        key["mlp_prune"],
        key["low_rank"],
    )
    runtime = pick_runtime(profile)
    c = runtime_kv(c, runtime[0])
    est = estimate(spec, profile, c, context=context, batch=batch, runtime=runtime[0])
    p: Plan = explain(spec, profile, c, est, context, batch, latency_ms, runtime, [], "search")
    p.method = key["method"]
    bound = (
        f"perplexity within {max_ppl_delta:.1%} of the model's" if max_ppl_delta is not None else ""
    )
    if latency_ms is not None:
        bound += (" and " if bound else "") + f"{latency_ms:g} ms/token"
    p.reasons.insert(
        0,
        f"search: the smallest of the measured candidates with {bound}: perplexity "
        f"{row['perplexity']:.3f} against {row['reference_perplexity']:.3f} "
        f"({row['ppl_delta']:+.2%}), KL {row['kl']:.4f}, top-1 {row['top1']:.3f}, "
        f"{row['tok_s']:.1f} tok/s {row['speed']}",
    )
    return p.to_dict()


def plot_front(out: dict[str, Any], path: str | Path) -> None:
    """Size against perplexity, every candidate a point (the front joined), speed in the
    labels; matplotlib draws it (`pip install matplotlib`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidArgumentError("--plot needs matplotlib: pip install matplotlib") from None
    rows = out["results"]
    front = [r for r in rows if r["name"] in set(out["front"])]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter([r["bytes"] / 1e6 for r in rows], [r["perplexity"] for r in rows], color="0.6")
    ax.plot([r["bytes"] / 1e6 for r in front], [r["perplexity"] for r in front], "o-", color="C0")
    for r in rows:
        ax.annotate(
            f"{r['name']} ({r['tok_s']:.0f} tok/s)",
            (r["bytes"] / 1e6, r["perplexity"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("weights (MB, log scale)")
    ax.set_ylabel("perplexity (held-out text)")
    ax.set_title(f"{Path(out['model']).name} on {out['device']}: the front in blue")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _machine() -> str:
    """This machine, for the timings measured on it: its name and processor."""
    import platform
    import socket

    return f"{socket.gethostname()} ({platform.processor() or platform.machine()})"
