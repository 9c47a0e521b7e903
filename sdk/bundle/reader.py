"""An opened bundle: `open_bundle(path)` checks it (every file against the manifest, the manifest
against its schema) and returns one `Bundle` object that loading, `run`, `inspect`, `verify`
and `bench` all read: its manifest, tokenizer, generation defaults, the artifact of each
runtime, and its draft. No torch; a runtime's package is imported only when it is loaded."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infopt.bundle.files import safe_relative, verify_bundle
from infopt.bundle.manifest import TOKENIZER, read_manifest
from infopt.errors import BundleError, ModelFormatError
from infopt.runtimes.base import Artifact
from infopt.runtimes.registry import Target, target, targets

if TYPE_CHECKING:
    from infopt.core.spec import ModelSpec
    from infopt.core.tokenizer import Tokenizer
    from infopt.decode.drafters import Drafter
    from infopt.runtimes import Runtime


def open_bundle(
    path: str | Path, *, verify: bool = True, public_key: str | Path | None = None
) -> Bundle:
    """The bundle at `path`. With `verify` (the default) every file is checked against the
    manifest (size, sha256, nothing missing, extra, linked or outside) and a signed manifest
    against its signature before anything reads it; without, only the manifest is read and
    checked against its schema (`inspect`). `public_key`: a PEM file; the bundle must be
    signed by that key (implies `verify`)."""
    root = Path(path)
    if public_key is not None or verify:
        return Bundle(root, verify_bundle(root, public_key))
    return Bundle(root, read_manifest(root))


@dataclass
class Bundle:
    """A bundle as `open_bundle` returns it: its root and its checked manifest, with what
    loading reads from them."""

    root: Path
    manifest: dict[str, Any]

    @property
    def runtimes(self) -> list[str]:
        """The runtimes it carries an artifact for."""
        return sorted(self.manifest["artifacts"])

    @property
    def default_runtime(self) -> str:
        return str(self.manifest["runtime"]["name"])

    @property
    def max_context(self) -> int:
        """The context it was planned and exported for."""
        return int(self.manifest["kv_cache"]["max_context"])

    @property
    def generation_defaults(self) -> dict[str, Any]:
        return dict(self.manifest.get("generation_defaults") or {})

    @property
    def weights(self) -> dict[str, str]:
        """Tensor group -> the scheme its weights are stored in (the plan's, or for a model
        file converted as it is, the file's)."""
        plan = self.manifest.get("plan") or {}
        planned = (plan.get("compression") or {}).get("weights")
        return dict(planned or (self.manifest.get("compression") or {}).get("weights") or {})

    @property
    def draft(self) -> dict[str, Any] | None:
        """The manifest's draft section: prompt lookup, or a draft model's artifacts."""
        return self.manifest.get("draft")

    @cached_property
    def spec(self) -> ModelSpec:
        from infopt.core.spec import spec_from_dict

        try:
            return spec_from_dict(self.manifest["model"]["config"])
        except ModelFormatError as e:
            raise BundleError(f"{self.root}: model.config: {e}") from e

    @cached_property
    def tokenizer(self) -> Tokenizer:
        from tokenizers import Tokenizer as _HFTokenizer

        from infopt.core.tokenizer import Tokenizer, native_errors

        section = self.manifest["tokenizer"]
        path = safe_relative(self.root, section.get("file", TOKENIZER))
        # from_file rather than from_str(read_text()): the text and the parser's buffers would
        # stay with the allocator
        with native_errors(BundleError, f"{path}: not a readable tokenizer"):
            backend = _HFTokenizer.from_file(str(path))
        return Tokenizer(
            backend=backend,
            chat_template=section.get("chat_template"),
            bos_token_id=section.get("bos_token_id"),
            eos_token_ids=tuple(section.get("eos_token_ids") or ()),
            add_bos_token=bool(section.get("add_bos_token", False)),
            special_tokens=dict(section.get("special_tokens") or {}),
        )

    def artifact(self, runtime: str | None = None) -> Artifact:
        """The artifact of `runtime` (default: the manifest's runtime); a `BundleError` naming
        the ones it carries if it has none."""
        name = runtime or self.default_runtime
        if name not in self.manifest["artifacts"]:
            raise BundleError(
                f"{self.root}: no {name!r} artifact in this bundle (it carries "
                f"{self.runtimes}); choose one with runtime=... (CLI: --runtime)"
            )
        entry = self.manifest["artifacts"][name]
        return self._artifact(entry, self.manifest["model"]["config"], self.weights)

    def _artifact(
        self, entry: Mapping[str, Any], config: Mapping[str, Any], weights: Mapping[str, str]
    ) -> Artifact:
        return Artifact(self.root, entry, config, weights, self.manifest["kv_cache"].get("dtype"))

    def read_back(self) -> list[dict[str, Any]]:
        """Each artifact whose target can read it back without running it, checked against what
        the manifest tells an app (a `BundleError` naming each mismatch): one summary each."""
        return [
            t.module("check").check_package(self.root, self.manifest["artifacts"][name])
            for name, t in targets().items()
            if t.reads_back and name in self.manifest["artifacts"]
        ]

    def runnable_artifact(self, runtime: str | None = None) -> tuple[Artifact, Target]:
        """The artifact of `runtime` (default: the manifest's) and its target, refused as a
        load refuses it: not in the bundle, an unknown runtime, its package missing (naming the
        pip extra) or of another version range."""
        artifact = self.artifact(runtime)
        name = runtime or self.default_runtime
        known = target(name)
        main = self.manifest["runtime"]
        requires = artifact.entry.get("requires") or (
            main.get("requires") if main["name"] == name else None
        )
        known.check_requirement(str(self.root), requires)
        return artifact, known

    def load_runtime(
        self,
        runtime: str | None = None,
        *,
        max_context: int,
        device: str | None = None,
        threads: int | None = None,
        numerics: str = "fast",
        slots: int = 1,
    ) -> Runtime:
        """The runtime of one of its artifacts, loaded (`numerics`: see `infopt.load`): a missing
        package is a `RuntimeNotAvailableError` naming the pip extra, another version range a
        `BundleError`."""
        artifact, known = self.runnable_artifact(runtime)
        rt: Runtime = known.module("runtime").from_bundle(
            artifact,
            max_context=max_context,
            device=device,
            threads=threads,
            numerics=numerics,
            slots=slots,
        )
        return rt

    def draft_runtime_for(self, target_runtime: Runtime) -> str | None:
        """The runtime its draft model loads on when none is named: where the target computes
        on a CPU, the installed target with the lowest `draft_rank` that the draft has an
        artifact for (their INT4 kernels are the fast ones); otherwise (a GPU) the target's
        runtime, if the draft has it. None when it carries no draft model."""
        section = self.draft
        if not section or section["kind"] != "model":
            return None
        artifacts = section["artifacts"]
        if not target_runtime.device.startswith("cuda"):
            ranked = sorted(
                (t for t in targets().values() if t.draft_rank is not None),
                key=lambda t: t.draft_rank or 0,
            )
            for t in ranked:
                if t.name in artifacts and t.installed():
                    return t.name
        name = target_runtime.name
        return name if name in artifacts else sorted(artifacts)[0]

    def load_drafter(
        self,
        target_runtime: Runtime,
        runtime: str | None = None,
        *,
        threads: int | None = None,
        device: str | None = None,
    ) -> Drafter | None:
        """The drafter its manifest describes (prompt lookup, or its draft model on `runtime`,
        by default `draft_runtime_for(target_runtime)`), with the target's context; None when
        it carries no draft."""
        from infopt.decode.drafters import ModelDrafter, NgramDrafter

        section = self.draft
        if not section:
            return None
        if section["kind"] == "ngram":
            return NgramDrafter(self.spec.vocab_size, max_ngram=int(section.get("max_ngram", 3)))
        if runtime is not None and runtime not in section["artifacts"]:
            raise BundleError(
                f"{self.root}: its draft has no {runtime!r} artifact (it carries "
                f"{sorted(section['artifacts'])}); choose one with draft_runtime=... "
                "(CLI: --draft-runtime)"
            )
        name = runtime or self.draft_runtime_for(target_runtime)
        assert name is not None
        known = target(name)
        module = known.module("runtime")
        entry = section["artifacts"][name]
        known.check_requirement(f"{self.root} (draft)", entry.get("requires"))
        rt = module.from_bundle(
            self._artifact(entry, section["config"], section.get("weights") or {}),
            max_context=target_runtime.max_context,
            device=device,
            threads=threads,
        )
        return ModelDrafter(rt)
