"""Quality of a model on a text: sliding-window perplexity, and against a reference model the
mean KL divergence KL(reference || model) and top-1 agreement, over the same positions.

`score` works over any runtime through the protocol's `forward` (all-position logits);
`evaluate` scores a model file, alone or against a compressed copy of it (quantized here, or an
infopt weight file made from it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infopt.core.progress import Progress
from infopt.errors import InvalidArgumentError
from infopt.runtimes import Runtime


@dataclass(frozen=True)
class Quality:
    perplexity: float
    tokens: int  # positions scored
    kl: float | None = None  # mean KL(reference || model), nats per token
    top1: float | None = None  # fraction of positions where both argmaxes agree
    reference_perplexity: float | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def windows(n: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, first scored position) covering tokens 1..n-1 once each: every window
    after the first re-reads window - stride tokens of context and scores only the new ones."""
    if not 0 < stride <= window:
        raise InvalidArgumentError(f"stride={stride}: must be in (0, window={window}]")
    if n < 2:
        raise InvalidArgumentError(f"the evaluation text is too short: {n} tokens, need >= 2")
    scored = 1
    start = 0
    while scored < n:
        end = min(start + window, n)
        yield start, end, scored
        scored = end
        start = max(0, end - (window - stride)) if end < n else end


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def score(
    runtime: Runtime,
    ids: Sequence[int],
    reference: Runtime | None = None,
    *,
    window: int = 512,
    stride: int | None = None,
    progress: Progress | None = None,
    pass_tokens: int | None = None,
) -> Quality:
    """Perplexity of `ids` under `runtime` (and KL / top-1 against `reference`); windows of
    `window` tokens (at most the runtime's context) advance by `stride` (default: half);
    `progress` hears of each window ("perplexity"). `pass_tokens`: `runtime` reads each window in
    passes of that many tokens, so that most positions attend to keys and values read back from
    its KV cache (as when decoding), not to the ones computed in the same pass: what a cache
    stored at a lower precision changes shows only so."""
    window = min(window, runtime.max_context)
    stride = max(1, window // 2) if stride is None else stride
    nll, kl, agree, ref_nll, count = 0.0, 0.0, 0, 0.0, 0
    spans = list(windows(len(ids), window, stride))
    for i, (start, end, first) in enumerate(spans):
        if progress:
            progress("perplexity", i, len(spans), f"window {i + 1}/{len(spans)}")
        chunk = list(ids[start:end])
        runtime.reset()
        if pass_tokens:
            passes = [runtime.forward(chunk[i : i + pass_tokens])
                      for i in range(0, len(chunk), pass_tokens)]  # fmt: skip
            logits = np.concatenate(passes)
        else:
            logits = runtime.forward(chunk)
        logp = _log_softmax(logits)[first - start - 1 : end - start - 1]
        targets = np.asarray(ids[first:end])
        rows = np.arange(len(targets))
        nll -= logp[rows, targets].sum()
        count += len(targets)
        if reference is not None:
            reference.reset()
            ref = _log_softmax(reference.forward(chunk))[first - start - 1 : end - start - 1]
            ref_nll -= ref[rows, targets].sum()
            kl += (np.exp(ref) * (ref - logp)).sum()
            agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
    if progress:
        progress("perplexity", len(spans), len(spans))
    if reference is None:
        return Quality(float(np.exp(nll / count)), count)
    return Quality(
        float(np.exp(nll / count)),
        count,
        float(kl / count),
        agree / count,
        float(np.exp(ref_nll / count)),
    )


def evaluate(
    model: str | Path | None,
    text_file: str | Path,
    *,
    quantize: str | None = None,
    weights: str | Path | None = None,
    method: str | None = None,
    calibration: str | Path | None = None,
    window: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Perplexity of `model` (a model path; None: the default model) on a UTF-8 text file; with
    `quantize` (blocks in that scheme: int8, int4-g32, int4s-g64, ...; embeddings and LM head
    int8, by `method`: "rtn", or "gptq" on `calibration` or the text shipped with infopt; by
    default GPTQ when a calibration text is given, else RTN, as `build` rounds) or `weights` (an
    infopt weight file made from `model`: pruned, distilled, ...), also the KL divergence and
    top-1 agreement of the compressed model against `model`, on the same positions. Windows
    of `window` tokens (default 512, or the model's context if less) advance by `stride`
    (default: half a window)."""
    import infopt
    from infopt.bundle.manifest import is_bundle
    from infopt.compress.calibration import calibration_ids, read_text
    from infopt.compress.quantize import quantize_model
    from infopt.core.default_model import default_model_path
    from infopt.core.model import load_core
    from infopt.core.weights import load_model
    from infopt.importers import load_spec, open_model
    from infopt.runtimes.registry import reference

    if quantize is not None and weights is not None:
        raise InvalidArgumentError("give --quantize or --weights, not both")
    # a window scores the tokens after its first, so it needs two; so does the text
    for name, value, least in (
        ("window", window, 2),
        ("stride", stride, 1),
        ("max_tokens", max_tokens, 2),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < least
        ):
            raise InvalidArgumentError(f"{name}={value!r}: expected an integer >= {least}")
    text = read_text(text_file, "evaluation text")
    if not text.strip():
        raise InvalidArgumentError(f"{text_file} is empty")
    if window is None:
        spec = load_spec(model if model is not None else default_model_path())
        window = min(512, spec.max_position_embeddings)
    runtime = reference()
    # a model file is scored on the reference runtime, a bundle on the runtime it names
    on = None if model is not None and is_bundle(model) else runtime.name
    base = infopt.load(model, threads=threads, max_context=window, runtime=on)
    ids = base.tokenizer.encode(text)[:max_tokens]
    result: dict[str, Any] = {"model": base.source, "text": str(text_file), "tokens": len(ids)}
    if weights is not None:
        core = load_model(weights)
        if core.spec.vocab_size != base.spec.vocab_size:
            raise InvalidArgumentError(
                f"{weights} has a vocabulary of {core.spec.vocab_size}, "
                f"MODEL has {base.spec.vocab_size}: it was not made from MODEL"
            )
        result["weights"] = str(weights)
        compressed = runtime.module("runtime").from_model(core, max_context=window)
        q = score(compressed, ids, base.runtime, window=window, stride=stride, progress=progress)
        result.update(q.to_dict())
        return result
    if quantize is None:
        q = score(base.runtime, ids, window=window, stride=stride, progress=progress)
        result.update(q.to_dict())
        return result
    source = open_model(model if model is not None else default_model_path())
    core = load_core(source, window, device=None)  # on CUDA when present
    if method is None:
        method = "gptq" if calibration is not None else "rtn"
    cal = calibration_ids(source.tokenizer, calibration) if method == "gptq" else None
    start = time.perf_counter()
    layers, done = len(core.layers), [0]
    label = f"{method} {quantize}"

    def on_block(_message: str) -> None:
        done[0] += 1
        if progress:
            progress(label, done[0], layers)

    quantize_model(
        core,
        {"embeddings": "int8", "lm_head": "int8", "attention": quantize, "mlp": quantize},
        method=method,
        calibration=cal,
        progress=on_block,
    )
    core.setup_cache(window)
    compressed = runtime.module("runtime").from_model(core, max_context=window, threads=threads)
    result["quantize_seconds"] = round(time.perf_counter() - start, 1)
    result["scheme"], result["method"] = quantize, method
    q = score(compressed, ids, base.runtime, window=window, stride=stride, progress=progress)
    result.update(q.to_dict())
    return result
