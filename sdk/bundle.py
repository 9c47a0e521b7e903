"""Bundles: the directory an app ships. `manifest.json` describes the model, the plan, the runtime,
the KV cache, the tokenizer and every file (path, sha256, size); the files sit beside it.

Opening a bundle verifies it before any parser touches a data file: the bundle and its manifest
are no links, every listed path stays inside, every file matches its size and sha256, and no
file is missing or unlisted. Writing is atomic: the bundle is assembled in a temporary directory
beside its destination and swapped in at the end, so a failed or killed write leaves the
destination as it was. This module imports neither torch nor any runtime.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from infopt.errors import BundleError

FORMAT, VERSION = "infopt-bundle", 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
MAX_MANIFEST_BYTES = 16 << 20


def is_bundle(path: str | Path) -> bool:
    """A directory holding a manifest (whether it verifies is `open_bundle`'s business)."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).exists()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe_relative(root: Path, name: object) -> Path:
    """`name` as a path inside `root`, or a BundleError: relative, no `..`, no backslashes."""
    if not isinstance(name, str) or not name:
        raise BundleError(f"{root}: file entry {name!r} is not a path")
    pure = PurePosixPath(name)
    if (
        pure.is_absolute()
        or "\\" in name
        or any(part in ("..", ".", "") for part in name.split("/"))
        or name == MANIFEST
    ):
        raise BundleError(f"{root}: file path {name!r} leaves the bundle or is not canonical")
    return root.joinpath(*pure.parts)


def _walk(root: Path) -> Iterator[Path]:
    """Every entry under root (files, links, directories), never following links."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            yield Path(dirpath) / name


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Parse and check the manifest's own structure (no data file is opened)."""
    root = Path(path)
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
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{manifest_path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: not an {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise BundleError(
            f"{manifest_path}: format version {manifest.get('version')!r}; this infopt reads "
            f"version {VERSION} (upgrade infopt, or rebuild the bundle)"
        )
    for key in ("model", "runtime", "kv_cache", "tokenizer", "files", "artifacts"):
        if key not in manifest:
            raise BundleError(f"{manifest_path}: missing {key!r}")
    files = manifest["files"]
    if not isinstance(files, list) or not all(
        isinstance(f, dict)
        and isinstance(f.get("sha256"), str)
        and isinstance(f.get("size"), int)
        and not isinstance(f.get("size"), bool)
        for f in files
    ):
        raise BundleError(f"{manifest_path}: 'files' must list {{path, sha256, size}} entries")
    return manifest


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """The manifest of a bundle whose every file checks out; a BundleError naming the first file
    that does not (changed, truncated, missing, unlisted, a link, outside the bundle)."""
    root = Path(path)
    manifest = read_manifest(root)
    listed: dict[Path, dict[str, Any]] = {}
    for entry in manifest["files"]:
        target = _safe_relative(root, entry.get("path"))
        if target in listed:
            raise BundleError(f"{root}: {entry['path']!r} is listed twice")
        listed[target] = entry
    for entry_path in _walk(root):
        if entry_path.is_symlink():
            raise BundleError(f"{entry_path}: links are not allowed in a bundle")
        if entry_path.is_dir():
            continue
        if entry_path != root / MANIFEST and entry_path not in listed:
            raise BundleError(f"{entry_path}: not listed in the manifest")
    for target, entry in listed.items():
        try:
            st = target.lstat()
        except FileNotFoundError:
            raise BundleError(f"{target}: listed in the manifest but missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{target}: not a regular file")
        if st.st_size != entry["size"]:
            raise BundleError(f"{target}: {st.st_size} bytes, the manifest says {entry['size']}")
        if sha256_file(target) != entry["sha256"]:
            raise BundleError(f"{target}: sha256 does not match the manifest (changed)")
    names = {str(PurePosixPath(e["path"])) for e in manifest["files"]}
    for runtime, artifact in manifest["artifacts"].items():
        for f in artifact.get("files", []):
            if f not in names:
                raise BundleError(f"{root}: artifact {runtime!r} names unlisted file {f!r}")
    return manifest


def write_bundle(
    out: str | Path,
    manifest: dict[str, Any],
    writers: dict[str, Callable[[Path], object]],
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write a bundle atomically. `writers` maps each relative file path to a function writing
    that file; `manifest` gets format, version and the files' sizes and hashes. OUT is replaced
    only when everything is written and verified; on any failure it is left as it was."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BundleError(f"{out}: exists and is not a bundle directory; not replacing it")
    if out.exists() and any(out.iterdir()) and not is_bundle(out):
        raise BundleError(f"{out}: a non-empty directory that is not a bundle; not replacing it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files = []
        for rel in sorted(writers):
            target = _safe_relative(tmp, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            if progress:
                progress(f"writing {rel}")
            writers[rel](target)
            files.append(
                {"path": rel, "size": target.stat().st_size, "sha256": sha256_file(target)}
            )
        full = {"format": FORMAT, "version": VERSION, **manifest, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")
        _fsync_tree(tmp)
        verify_bundle(tmp)
        _swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return full


def _fsync_tree(root: Path) -> None:
    for p in [*_walk(root), root]:
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())


_RENAME_EXCHANGE = 2


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Put directory `tmp` at `out`: a plain rename when `out` is absent; an atomic exchange
    (Linux renameat2) when it exists, so no moment leaves `out` missing; elsewhere two renames."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp)  # now holds the previous bundle
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(libc_name, use_errno=True)
        at_fdcwd = -100
        rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
        return bool(rc == 0)
    return False


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


def bundle_tokenizer(root: Path, manifest: dict[str, Any]) -> Any:
    """The Tokenizer a verified bundle carries."""
    from tokenizers import Tokenizer as _HFTokenizer

    from infopt.tokenizer import Tokenizer

    section = manifest["tokenizer"]
    path = _safe_relative(root, section.get("file", TOKENIZER))
    try:
        backend = _HFTokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as e:  # tokenizers raises plain Exception on malformed JSON
        raise BundleError(f"{path}: not a readable tokenizer ({e})") from e
    return Tokenizer(
        backend=backend,
        chat_template=section.get("chat_template"),
        bos_token_id=section.get("bos_token_id"),
        eos_token_ids=tuple(section.get("eos_token_ids") or ()),
        add_bos_token=bool(section.get("add_bos_token", False)),
        special_tokens=dict(section.get("special_tokens") or {}),
    )


def choose_runtime(root: Path, manifest: dict[str, Any], runtime: str | None) -> str:
    """The runtime to load: `runtime` if given, else the manifest's; it must have an artifact."""
    name = runtime or manifest["runtime"]["name"]
    if name not in manifest["artifacts"]:
        raise BundleError(
            f"{root}: no {name!r} artifact in this bundle (it carries "
            f"{sorted(manifest['artifacts'])}); load it with runtime= one of those"
        )
    return str(name)
