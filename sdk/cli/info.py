"""`infopt-pack inspect`: what a model file or a bundle holds, without loading weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from infopt.cli.output import emit_json, friendly_errors, json_option, quality_text, rows
from infopt.core.defaults import DEFAULT_MAX_CONTEXT


@click.command()
@click.argument("model", required=False)
@json_option
@friendly_errors
def inspect(model: str | None, as_json: bool) -> None:
    """Show MODEL's architecture, parameter count, context and tokenizer facts (no weights read).
    For a bundle: its manifest (plan, runtime, KV cache, files), checked against its schema but
    not verified (see `infopt-pack verify`)."""
    from infopt.bundle import is_bundle

    if model is not None and is_bundle(model):
        _inspect_bundle(model, as_json)
        return
    from infopt.core.default_model import default_model_path
    from infopt.importers import open_model

    info = open_model(model if model is not None else default_model_path()).summary()
    if as_json:
        emit_json(info)
        return
    config, tok = info["config"], info["tokenizer"]
    rows(
        [
            ("model", info["path"]),
            ("format", info["format"]),
            ("architecture", info["architecture"]),
            ("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e6:.1f} M)"),
            (
                "layers / hidden / mlp",
                f"{config['num_layers']} / {config['hidden_size']} / {config['intermediate_size']}",
            ),
            (
                "heads / kv heads / head dim",
                f"{config['num_heads']} / {config['num_kv_heads']} / {config['head_dim']}",
            ),
            ("context length", f"{info['context_length']:,}"),
            ("attention", _attention_row(config)),
            (
                "rope",
                f"theta {config['rope_theta']:g}, scaling {config['rope_scaling'] or 'none'}"
                + (
                    f"; sliding layers: theta {config['rope_local_theta']:g}"
                    if config.get("rope_local_theta")
                    else ""
                ),
            ),
            ("tied embeddings", str(config["tie_word_embeddings"])),
            ("vocab size", f"{tok['vocab_size']:,}"),
            ("special tokens", ", ".join(f"{k}={v}" for k, v in tok["special_tokens"].items())),
            ("eos token ids", str(tok["eos_token_ids"])),
            ("chat template", "yes" if tok["chat_template"] else "no"),
            ("tensor types", _tensor_types(info["tensor_types"])),
        ]
    )


def _tensor_types(types: dict[str, dict[str, int]]) -> str:
    """ "Q4_1 ×210, F32 ×61, Q8_0 ×1; 4.93 bits per weight, 98.4 MB": what the file stores."""
    elements = sum(t["elements"] for t in types.values())
    stored = sum(t["bytes"] for t in types.values())
    listed = ", ".join(f"{name} ×{t['tensors']}" for name, t in types.items())
    bits = stored * 8 / elements if elements else 0.0
    return f"{listed}; {bits:.2f} bits per weight, {stored / 1e6:.1f} MB"


def _inspect_bundle(path: str, as_json: bool) -> None:
    from infopt.bundle import open_bundle
    from infopt.runtimes.registry import targets

    bundle = open_bundle(Path(path), verify=False)
    m = bundle.manifest
    if as_json:
        emit_json(m)
        return
    config, kv, plan = m["model"]["config"], m["kv_cache"], m.get("plan") or {}
    draft = bundle.draft or {}
    table = [
        (
            "bundle",
            f"{path} (format {m['format']} {m['version']}, infopt {m.get('infopt_version')})",
        ),
        ("model", f"{m['model']['source']['name']} ({m['model']['architecture']})"),
        ("parameters", f"{m['model']['parameters']:,} ({m['model']['parameters'] / 1e6:.1f} M)"),
        ("stored", f"{sum(f['size'] for f in m['files']) / 1e6:.1f} MB in {len(m['files'])} files"),
        (
            "layers / hidden / mlp",
            f"{config['num_layers']} / {config['hidden_size']} / {config['intermediate_size']}",
        ),
        ("plan", _plan_row(plan, m.get("compression", {}))),
        ("quality", quality_text(m.get("compression", {}).get("quality"))),
        ("matrices", _matrices(m.get("compression", {}).get("matrices"))),
        ("runtime", f"{bundle.default_runtime} (needs {_requirement(m['runtime'])})"),
        ("artifacts", ", ".join(bundle.runtimes)),
        ("KV cache", _kv_row(kv, plan)),
        ("chat template", "yes" if m["tokenizer"].get("chat_template") else "no"),
        ("draft", draft.get("source") or draft.get("kind") or "none"),
    ]
    for name, t in targets().items():  # what an app calling an artifact itself needs
        if name in m["artifacts"]:
            table += t.describe(m["artifacts"][name])
    rows(table)
    for f in m["files"]:
        click.echo(f"  {f['path']:<24} {f['size']:>12,} bytes  sha256 {f['sha256'][:16]}")
    for reason in plan.get("reasons", []):
        click.echo(f"  why: {reason}")


def _plan_row(plan: dict[str, Any], compression: dict[str, Any]) -> str:
    """The plan a bundle was built to, or, for the artifact `infopt.load` converts a model file
    to (no plan), what it stores."""
    if plan:
        return f"{plan['compression']['name']} for {plan['device']}"
    weights = ", ".join(f"{g} {s}" for g, s in compression.get("weights", {}).items())
    return f"none: the model file's own precision ({weights})" if weights else "none"


def _kv_row(kv: dict[str, Any], plan: dict[str, Any]) -> str:
    """The KV cache a bundle is built for; a model file's cached conversion (no plan) holds its
    whole trained context, of which a load takes what `infopt.load` gives the file."""
    row = f"{kv['max_context']} tokens x batch {kv['batch']}, {kv['dtype']}"
    if plan or kv["max_context"] <= DEFAULT_MAX_CONTEXT:
        return row
    return f"{row} at most (a load of the model file takes {DEFAULT_MAX_CONTEXT} unless asked)"


def _matrices(counts: dict[str, int] | None) -> str:
    """ "int8-g32 ×91, int4m-g32 ×27, int8-g16 ×9": how the bundle stores its matrices (a
    model file's mix of block types, kept as they are, differs within a group)."""
    if not counts:
        return "not recorded (an older bundle)"
    return ", ".join(f"{scheme} ×{n}" for scheme, n in counts.items())


def _requirement(section: dict[str, Any]) -> str:
    requires = section.get("requires")
    return f"{requires['package']}{requires['version']}" if requires else "nothing recorded"


def _attention_row(config: dict[str, Any]) -> str:
    """Layer kinds and the features beyond plain pre-norm attention, in a few words."""
    kinds = config.get("layer_types")
    window = config.get("sliding_window")
    if window and kinds:
        sliding = kinds.count("sliding")
        text = f"{sliding} sliding (window {window:,}) + {len(kinds) - sliding} full layers"
    elif window:
        text = f"sliding window {window:,} on every layer"
    else:
        text = "full on every layer"
    extras = [
        name
        for name, on in (
            ("QK-norm", config.get("qk_norm")),
            ("sandwich norms", config.get("sandwich_norms")),
            ("GeGLU", config.get("hidden_act") == "gelu_tanh"),
            (f"score soft-cap {config.get('attn_softcap')}", config.get("attn_softcap")),
            (f"logit soft-cap {config.get('final_softcap')}", config.get("final_softcap")),
        )
        if on
    ]
    return ", ".join([text, *extras])
