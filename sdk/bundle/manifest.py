"""The bundle manifest (`manifest.json`): what a bundle holds, described by one JSON Schema and
checked against it on every read, so a missing key or a value of the wrong type is a
`BundleError` naming the key before anything else reads the bundle.

Sections: format and version; the model (architecture, config, source and its hash); the plan
(choices, reasons, predicted memory and speed) and what compression did; the runtime to load
and every runtime's artifact (files, package version range, the interface an app calls; each
target's own keys come from its record, `Target.artifact_fields`); the KV cache; the tokenizer
(file, special tokens, chat template); generation defaults; the draft for speculative decoding;
and every file with its size and sha256. Unknown format versions are refused; within a version,
keys this infopt does not know are let through (a newer infopt may add one), and an artifact
of a target it lacks leaves the others loadable. No torch here.
"""

from __future__ import annotations

import functools
import json
import re
import stat
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from infopt.core.schema import (
    BOOL,
    COUNT,
    INT,
    INTS,
    NUM,
    STR,
    STRS,
    nullable,
    open_object,
    typed,
)
from infopt.core.spec import ModelSpec
from infopt.errors import BundleError, InfoptError

FORMAT, VERSION = "infopt-bundle", 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
MAX_MANIFEST_BYTES = 16 << 20

# ModelSpec field annotations -> their JSON types (a new annotation must be added here; the
# schema test enumerates ModelSpec's fields)
SPEC_TYPES: dict[str, dict[str, Any]] = {
    "str": STR,
    "int": COUNT,
    "float": NUM,
    "bool": BOOL,
    "int | None": nullable(INT),
    "dict[str, Any] | None": nullable(open_object()),
    "tuple[int, ...]": INTS,
    "tuple[str, ...] | None": nullable(STRS),
    "float | None": nullable(NUM),
}


def config_schema() -> dict[str, Any]:
    """`ModelSpec.to_dict()`: every field typed, the ones without a default required."""
    props = {f.name: SPEC_TYPES[str(f.type)] for f in fields(ModelSpec)}
    required = tuple(
        f.name for f in fields(ModelSpec) if f.default is MISSING and f.default_factory is MISSING
    )
    return typed(props, required)


REQUIRES = typed({"package": STR, "version": STR}, ("package", "version"))
COMMON_ARTIFACT = {
    "files": {"type": "array", "items": STR, "minItems": 1},
    "format": STR,
    "requires": REQUIRES,
    "max_context": COUNT,
    "kv_dtype": STR,
}
WEIGHTS = open_object(STR)  # tensor group -> scheme


def artifacts_schema() -> dict[str, Any]:
    """Each known target's artifact with its own keys; an unknown target's (a newer infopt's)
    with the keys every artifact has, so the others stay loadable."""
    from infopt.runtimes.registry import targets

    known = {
        name: typed({**COMMON_ARTIFACT, **t.artifact_fields}, ("files", *t.artifact_required))
        for name, t in targets().items()
    }
    return {
        "type": "object",
        "properties": known,
        "additionalProperties": {
            "type": "object",
            "properties": COMMON_ARTIFACT,
            "required": ["files"],
        },
    }


def plan_schema() -> dict[str, Any]:
    compression = {
        "type": "object",
        "properties": {
            "name": STR,
            "weights": WEIGHTS,
            "kv_dtype": STR,
            "mlp_prune": NUM,
            "low_rank": nullable(NUM),
        },
        "required": ["weights"],
    }
    return {
        "type": "object",
        "properties": {
            "model": open_object(),
            "device": STR,
            "runtime": STR,
            "compute_precision": STR,
            "compression": compression,
            "context": COUNT,
            "batch": COUNT,
            "latency_target_ms": nullable(NUM),
            "static_shapes": BOOL,
            "pruning": {"type": "object", "properties": {"kind": STR, "sparsity": NUM}},
            "low_rank_ratio": nullable(NUM),
            "predicted": open_object(),
            "usable_memory": NUM,
            "headroom_bytes": NUM,
            "reasons": STRS,
            "rejected": {"type": "array", "items": typed({"option": STR, "reason": STR})},
            "speculative": {"type": "object", "properties": {"kind": STR}},
        },
    }


def draft_schema() -> dict[str, Any]:
    model = typed(
        {
            "kind": {"const": "model"},
            "source": STR,
            "config": config_schema(),
            "parameters": INT,
            "weights": WEIGHTS,
            "num_draft_tokens": COUNT,
            "artifacts": artifacts_schema(),
        },
        ("kind", "config", "artifacts"),
    )
    ngram = typed(
        {"kind": {"const": "ngram"}, "max_ngram": COUNT, "num_draft_tokens": COUNT}, ("kind",)
    )
    return {"anyOf": [{"type": "null"}, model, ngram]}


@functools.cache
def schema() -> dict[str, Any]:
    """The manifest's JSON Schema (draft 2020-12)."""
    model = typed(
        {
            "architecture": STR,
            "config": config_schema(),
            "parameters": INT,
            "source": typed({"name": STR, "format": STR, "sha256": STR}, ("name",)),
        },
        ("architecture", "config", "parameters", "source"),
    )
    kv_cache = typed(
        {
            "max_context": COUNT,
            "batch": COUNT,
            "dtype": nullable(STR),
            "layout": STR,
            "kv_heads": COUNT,
            "head_dim": COUNT,
            "layers": COUNT,
        },
        ("max_context", "batch", "dtype"),
    )
    tokenizer = typed(
        {
            "file": STR,
            "bos_token_id": nullable(INT),
            "eos_token_ids": INTS,
            "add_bos_token": BOOL,
            "special_tokens": open_object(STR),
            "chat_template": nullable(STR),
        }
    )
    runtime = typed({"name": STR, "requires": REQUIRES, "artifact_built": BOOL}, ("name",))
    compression = typed(
        {
            "stored_dtype": STR,
            "quantization": STR,
            "mlp_intermediate_size": COUNT,
            "low_rank_layers": INT,
            "weights": WEIGHTS,  # without a plan: the schemes of a model file kept as it is
        }
    )
    entry = typed(
        {
            "path": STR,
            "size": {"type": "integer", "minimum": 0},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        },
        ("path", "size", "sha256"),
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{FORMAT} manifest, version {VERSION}",
        **typed(
            {
                "format": {"const": FORMAT},
                "version": {"const": VERSION},
                "infopt_version": STR,
                "model": model,
                "plan": nullable(plan_schema()),
                "compression": compression,
                "runtime": runtime,
                "artifacts": artifacts_schema(),
                "kv_cache": kv_cache,
                "tokenizer": tokenizer,
                "generation_defaults": nullable(open_object()),
                "draft": draft_schema(),
                "files": {"type": "array", "items": entry},
            },
            (
                "format",
                "version",
                "model",
                "runtime",
                "artifacts",
                "kv_cache",
                "tokenizer",
                "files",
            ),
        ),
    }


def is_bundle(path: str | Path) -> bool:
    """A directory holding a manifest (whether it verifies is `open_bundle`'s business)."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).exists()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the bundle at `path`, checked against the schema (no data file is
    opened): a `BundleError` naming the first key that is missing or of the wrong type."""
    return parse_manifest(manifest_bytes(path), Path(path) / MANIFEST)


def manifest_bytes(path: str | Path) -> bytes:
    """The bytes of the bundle's manifest file, read once (a bounded regular file)."""
    root = Path(path)
    if not root.exists() and not root.is_symlink():
        raise BundleError(f"{root}: no such bundle (the path does not exist)")
    if root.is_symlink() or not root.is_dir():
        raise BundleError(f"{root}: a bundle is a directory (not a link or a file)")
    manifest_path = root / MANIFEST
    try:
        st = manifest_path.lstat()
    except FileNotFoundError:
        raise BundleError(f"{root}: no {MANIFEST}; not an infopt bundle") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{manifest_path}: must be a regular file, not a link")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{manifest_path}: {st.st_size} bytes is too large for a manifest")
    with manifest_path.open("rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{manifest_path}: too large for a manifest")
    return raw


def parse_manifest(raw: bytes, manifest_path: Path) -> dict[str, Any]:
    """A manifest's bytes parsed and checked against the schema and its own claims."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{manifest_path}: not valid JSON ({e})") from e
    except RecursionError:  # nested deeper than any manifest is
        raise BundleError(f"{manifest_path}: JSON nested too deeply for a manifest") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: not an {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise BundleError(
            f"{manifest_path}: format version {manifest.get('version')!r}; this infopt reads "
            f"version {VERSION} (upgrade infopt, or rebuild the bundle)"
        )
    check_manifest(manifest, str(manifest_path))
    check_claims(manifest, str(manifest_path))
    return manifest


_CLAUSE = re.compile(r"(>=|<=|==|<|>)\d+(\.\d+)*")


def check_claims(manifest: dict[str, Any], where: str) -> None:
    """What the schema cannot say: the manifest's parts agree with each other (token ids inside
    the vocabulary, the plan's and the cache's shapes the model's, a runtime infopt has and the
    bundle carries, version ranges that can be read, the tokenizer a listed file, generation
    defaults that generate). A `BundleError` naming the key and both values."""
    from infopt.decode.generate import GenerateOptions
    from infopt.errors import InvalidArgumentError
    from infopt.runtimes.registry import names, target

    config = (manifest.get("model") or {}).get("config") or {}
    if config:
        from infopt.core.spec import spec_from_dict

        try:  # the model's config as loading reads it: every value in range
            spec_from_dict(config)
        except InfoptError as e:
            raise BundleError(f"{where}: model.config: {e}") from None
    vocab = config.get("vocab_size", 2**63)
    tok = manifest.get("tokenizer") or {}
    ids = {
        "tokenizer.eos_token_ids": tok.get("eos_token_ids") or [],
        "tokenizer.bos_token_id": [tok.get("bos_token_id")],
    }
    ids |= {"model.config.eos_token_ids": config.get("eos_token_ids") or [],
            "model.config.bos_token_id": [config.get("bos_token_id")]}  # fmt: skip
    for key, values in ids.items():
        for i in values:
            if i is not None and not (isinstance(i, int) and 0 <= i < vocab):
                raise BundleError(f"{where}: {key}: {i!r} is not a token id of the model's "
                                  f"vocabulary (model.config.vocab_size {vocab})")  # fmt: skip
    planned = (manifest.get("plan") or {}).get("model") or {}
    kv = manifest.get("kv_cache") or {}
    pairs = [
        ("plan.model.hidden_size", planned.get("hidden_size"), config.get("hidden_size")),
        ("plan.model.layers", planned.get("layers"), config.get("num_layers")),
        ("kv_cache.layers", kv.get("layers"), config.get("num_layers")),
        ("kv_cache.head_dim", kv.get("head_dim"), config.get("head_dim")),
    ]
    for key, claimed, model in pairs:
        if None not in (claimed, model) and claimed != model:
            raise BundleError(f"{where}: {key} is {claimed!r} where the model's config says "
                              f"{model!r}")  # fmt: skip
    runtime = manifest["runtime"]["name"]
    built = manifest["runtime"].get("artifact_built", True)
    if built and runtime not in names():  # a plan's unknown runtime says it built none
        raise BundleError(f"{where}: runtime.name {runtime!r}: infopt has no such runtime "
                          f"({', '.join(names())})")  # fmt: skip
    if built and runtime not in manifest["artifacts"]:
        raise BundleError(f"{where}: runtime.name {runtime!r} has no artifact in the bundle")
    drafts = (manifest.get("draft") or {}).get("artifacts") or {}
    for label, arts in (("artifacts", manifest["artifacts"]), ("draft.artifacts", drafts)):
        for name, artifact in arts.items():  # exported graphs hold rotary tables of a length
            if name in names() and not target(name).reference and "max_context" not in artifact:
                raise BundleError(f"{where}: {label}.{name} lacks max_context (the positions "
                                  "its graph was exported for)")  # fmt: skip
    requires = [("runtime", manifest["runtime"].get("requires") or {})]
    requires += [
        (f"artifacts.{n}", a.get("requires") or {}) for n, a in manifest["artifacts"].items()
    ]
    requires += [(f"draft.artifacts.{n}", a.get("requires") or {}) for n, a in drafts.items()]
    for key, req in requires:
        spec = req.get("version", "")
        clauses = [c.strip() for c in spec.split(",") if c.strip()] if isinstance(spec, str) else []
        if not isinstance(spec, str) or not all(_CLAUSE.fullmatch(c) for c in clauses):
            raise BundleError(f"{where}: {key}.requires.version {spec!r}: not a version range "
                              "(comma-separated >=, <=, ==, <, > clauses)")  # fmt: skip
    listed = {e.get("path") for e in manifest["files"]}
    if "file" in tok and tok["file"] not in listed:
        raise BundleError(f"{where}: tokenizer.file {tok['file']!r} is not one of the bundle's "
                          "files")  # fmt: skip
    try:
        GenerateOptions().sampling(manifest.get("generation_defaults") or {})
    except (InvalidArgumentError, TypeError) as e:
        raise BundleError(f"{where}: generation_defaults: {e}") from None


def check_manifest(manifest: object, where: str) -> None:
    """`manifest` against the schema; a `BundleError` naming the key and what is wrong."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
    if error is not None:
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise BundleError(f"{where}: {key}: {error.message}")


def tokenizer_section(tokenizer: Any) -> dict[str, Any]:
    """The manifest's tokenizer entry for an infopt Tokenizer (its backend goes to TOKENIZER)."""
    return {
        "file": TOKENIZER,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_ids": list(tokenizer.eos_token_ids),
        "add_bos_token": tokenizer.add_bos_token,
        "special_tokens": dict(tokenizer.special_tokens),
        "chat_template": tokenizer.chat_template,
    }
