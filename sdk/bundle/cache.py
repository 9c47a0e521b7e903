"""The cache of converted model files: `infopt.load("model.gguf")` on a runtime that runs an
exported artifact converts the file once (`infopt.bundle.build.convert`: its own precision,
nothing compressed) and keeps the result as a bundle in the user's cache directory, keyed by the
file's sha256 and the versions of infopt and of the runtime's package. Later loads verify that
bundle and load it: no conversion, no torch. A damaged entry is rebuilt, never loaded. Two
processes loading the same file at once take turns on a lock file per key (`.KEY.lock` in the
cache, kept): the first converts, the second then finds its entry and loads it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from infopt.bundle.manifest import MANIFEST, is_bundle
from infopt.core.progress import Progress
from infopt.errors import BundleError
from infopt.runtimes.registry import target

ENV = "INFOPT_CACHE"  # a directory to cache in instead of the user's cache directory


def cache_root() -> Path:
    """Where converted models are kept: $INFOPT_CACHE, else the platform's user cache
    directory (e.g. ~/.cache/infopt/models on Linux)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("infopt")) / "models"


# Raised whenever an exporter's output changes within one release (e.g. graphs gained a batch
# dimension, stacked q/k/v into one matrix, or kept a GGUF's k-quant blocks), so that entries
# converted before are converted again.
CONVERTER_REVISION = 5


def entry_key(sha256: str, runtime: str) -> str:
    """What identifies an entry: the file's hash, the runtime, and the versions that made the
    artifact (a new infopt, exporter revision or runtime package converts again)."""
    from infopt import __version__

    package = target(runtime).installed_requirement()["version"].removeprefix(">=") or "none"
    return f"{sha256[:16]}-{runtime}{package}-infopt{__version__}r{CONVERTER_REVISION}"


def entry_name(model: str | Path, sha256: str, runtime: str) -> str:
    """The folder a new entry is written to: the file's name (for people reading the cache
    directory), then its key."""
    stem = Path(model).name.replace(" ", "_")[:48]
    return f"{stem}-{entry_key(sha256, runtime)}"


def cached(
    model: str | Path,
    runtime: str,
    *,
    sha256: str,
    progress: Progress | None = None,
) -> Path:
    """The verified bundle of `model` converted for `runtime`, converting it first when the
    cache has no sound entry for its contents (a copy of the file under another name finds
    the entry made for the first)."""
    from filelock import FileLock

    from infopt.bundle.reader import open_bundle

    root = cache_root()
    entry = root / entry_name(model, sha256, runtime)
    key = entry_key(sha256, runtime)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BundleError(f"{root}: cannot cache converted models here ({e.strerror or e})") from e
    # one process at a time per key: a second one waits, then finds the first one's entry (two
    # writing the same entry would race to put it in place, and one would fail)
    with FileLock(root / f".{key}.lock"):
        others = sorted(p for p in root.glob(f"*-{key}") if p != entry)
        for found in [entry, *others]:
            if not is_bundle(found):
                continue
            try:
                open_bundle(found)
                return found
            except BundleError:  # damaged or incomplete: rebuilt below, never loaded
                shutil.rmtree(found, ignore_errors=True)
        _convert(model, entry, runtime, progress)
    return entry


@contextmanager
def converted(model: str | Path, runtime: str, progress: Progress | None = None) -> Iterator[Path]:
    """A bundle of `model` for `runtime` in a temporary directory, removed afterwards (for
    `load(..., cache=False)`)."""
    with tempfile.TemporaryDirectory(prefix="infopt-convert-") as tmp:
        out = Path(tmp) / "bundle"
        _convert(model, out, runtime, progress)
        yield out


def _convert(model: str | Path, out: Path, runtime: str, progress: Progress | None) -> None:
    from infopt.bundle.build import convert
    from infopt.importers import open_model

    source = open_model(model)
    # the stages say what they are part of: a first load's conversion, not the load itself
    step = None
    if progress is not None:
        report = progress

        def step(stage: str, done: int, total: int, detail: str = "") -> None:
            report(f"converting for {runtime}: {stage}", done, total, detail)

    convert(source, out, runtime, source.spec.max_position_embeddings, step)


def entries() -> list[dict[str, Any]]:
    """What the cache holds: each entry's path, model file, runtime, bytes and when it was
    made."""
    import json

    root = cache_root()
    found = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if not is_bundle(entry):
            continue
        try:
            manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
            model, runtime = manifest["model"]["source"]["name"], manifest["runtime"]["name"]
        except (OSError, ValueError, KeyError, TypeError):
            model, runtime = "?", "?"
        found.append(
            {
                "path": str(entry),
                "model": model,
                "runtime": runtime,
                "bytes": sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()),
                "created": time.strftime(
                    "%Y-%m-%d %H:%M", time.localtime((entry / MANIFEST).stat().st_mtime)
                ),
            }
        )
    return found


def clear() -> list[dict[str, Any]]:
    """Remove every entry (and what killed conversions left, and the lock files no load holds);
    returns what was removed."""
    from filelock import FileLock, Timeout

    removed = entries()
    root = cache_root()
    for path in root.iterdir() if root.is_dir() else []:
        if path.is_dir() and (is_bundle(path) or ".partial-" in path.name or ".old-" in path.name):
            shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(".*.lock") if root.is_dir() else []:
        lock = FileLock(path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # a load is converting under it: its file stays
        try:
            path.unlink(missing_ok=True)
        finally:
            lock.release()
    return removed
