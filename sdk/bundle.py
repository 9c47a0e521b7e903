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
    for key in ("model", "runtime", "kv_cache", "tokenizer", "artifacts"):
        if not isinstance(manifest.get(key), dict):
            raise BundleError(f"{manifest_path}: {key!r} is missing or not an object")
    if not isinstance(manifest["model"].get("config"), dict):
        raise BundleError(f"{manifest_path}: model.config is missing")
    if not isinstance(manifest["runtime"].get("name"), str):
        raise BundleError(f"{manifest_path}: runtime.name is missing")
    context = manifest["kv_cache"].get("max_context")
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise BundleError(f"{manifest_path}: kv_cache.max_context {context!r} is not a count")
    for name, artifact in manifest["artifacts"].items():
        if not isinstance(artifact, dict) or not all(
            isinstance(f, str) for f in artifact.get("files", [None])
        ):
            raise BundleError(f"{manifest_path}: artifact {name!r} must list its files")
    _check_draft_section(manifest_path, manifest.get("draft"))
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


def _check_draft_section(manifest_path: Path, draft: object) -> None:
    """`draft`: null, {"kind": "ngram", ...} or {"kind": "model", "config", "artifacts"}."""
    if draft is None:
        return
    if not isinstance(draft, dict) or (kind := draft.get("kind")) not in ("ngram", "model"):
        raise BundleError(f"{manifest_path}: draft must be null or have kind 'ngram' or 'model'")
    if kind == "model" and not (
        isinstance(draft.get("config"), dict)
        and isinstance(draft.get("artifacts"), dict)
        and all(
            isinstance(a, dict) and all(isinstance(f, str) for f in a.get("files", [None]))
            for a in draft["artifacts"].values()
        )
    ):
        raise BundleError(f"{manifest_path}: a draft model needs its config and artifacts' files")


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
    drafts = (manifest.get("draft") or {}).get("artifacts") or {}
    for label, arts in (("artifact", manifest["artifacts"]), ("draft artifact", drafts)):
        for runtime, artifact in arts.items():
            for f in artifact.get("files", []):
                if f not in names:
                    raise BundleError(f"{root}: {label} {runtime!r} names unlisted file {f!r}")
    return manifest


def write_bundle(
    out: str | Path,
    manifest: dict[str, Any],
    writers: dict[str, Callable[[Path], object]],
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write a bundle atomically. `writers` maps each relative file path to a function writing
    that file (and any siblings it needs); `manifest` gets format, version and the sizes and
    hashes of every file written. OUT is replaced
    only when everything is written and verified; on any failure it is left as it was."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BundleError(f"{out}: exists and is not a bundle directory; not replacing it")
    if out.exists() and any(out.iterdir()) and not is_bundle(out):
        raise BundleError(f"{out}: a non-empty directory that is not a bundle; not replacing it")
    tmp = _partial_dir(out)
    try:
        for rel in sorted(writers):
            target = _safe_relative(tmp, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            if progress:
                progress(f"writing {rel}")
            writers[rel](target)
        files = [  # what the writers wrote (a writer may add siblings: ONNX external data)
            {
                "path": p.relative_to(tmp).as_posix(),
                "size": p.stat().st_size,
                "sha256": sha256_file(p),
            }
            for p in sorted(_walk(tmp))
            if p.is_file()
        ]
        full = {"format": FORMAT, "version": VERSION, **manifest, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")
        _fsync_tree(tmp)
        verify_bundle(tmp)
        _swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return full


def _partial_dir(out: Path) -> Path:
    """A fresh work directory beside `out`, named after this process; those left by killed
    processes (their pid gone) are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.partial-"
    for stale in out.parent.glob(f"{prefix}*"):
        pid = stale.name[len(prefix) :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        # from_file rather than from_str(read_text()): the text and the parser's buffers would
        # stay with the allocator (runtime_bench measures what the tokenizer keeps)
        backend = _HFTokenizer.from_file(str(path))
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
            f"{sorted(manifest['artifacts'])}); choose one with runtime=... (CLI: --runtime)"
        )
    return str(name)


ARCHIVE_KINDS = ("tar", "zip")
MAX_ARCHIVE_MEMBERS = 1000
MAX_ARCHIVE_BYTES = 64 << 30


def write_archive(bundle: str | Path, kind: str = "tar") -> Path:
    """Pack a verified bundle into one file beside it (BUNDLE.tar or BUNDLE.zip), atomically.
    Members are the bundle's files under its directory name, stored without compression
    (weights do not compress) and without owners, links or modes beyond plain files."""
    import tarfile
    import zipfile

    if kind not in ARCHIVE_KINDS:
        raise BundleError(f"archive kind {kind!r}: expected one of {list(ARCHIVE_KINDS)}")
    root = Path(bundle)
    manifest = verify_bundle(root)
    names = [MANIFEST] + [e["path"] for e in manifest["files"]]
    target = root.with_name(f"{root.name}.{kind}")
    tmp = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        if kind == "tar":
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                for name in names:
                    info = tar.gettarinfo(str(root / name), arcname=f"{root.name}/{name}")
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mode = 0o644
                    with (root / name).open("rb") as f:
                        tar.addfile(info, f)
        else:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name in names:
                    zf.write(root / name, f"{root.name}/{name}")
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def extract_archive(archive: str | Path, out: str | Path) -> dict[str, Any]:
    """Unpack a bundle archive into directory `out` (atomically, replacing a previous bundle
    there) and verify it. Refused before anything is written: absolute paths, `..`, links of
    any kind, devices and other non-files, more than MAX_ARCHIVE_MEMBERS members or
    MAX_ARCHIVE_BYTES bytes, and members outside one top-level directory."""
    import tarfile
    import zipfile

    archive, out = Path(archive), Path(out)
    members: list[tuple[str, int]] = []  # (name, size)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            _check_count(archive, len(infos))
            for zi in infos:
                kind = (zi.external_attr >> 16) & 0o170000
                if zi.is_dir():
                    continue
                if kind not in (0, stat.S_IFREG):
                    raise BundleError(f"{archive}: member {zi.filename!r} is not a regular file")
                members.append((zi.filename, zi.file_size))
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            infos_t = tar.getmembers()
            _check_count(archive, len(infos_t))
            for ti in infos_t:
                if ti.isdir():
                    continue
                if not ti.isreg():
                    raise BundleError(
                        f"{archive}: member {ti.name!r} is a link or special file; refused"
                    )
                members.append((ti.name, ti.size))
    else:
        raise BundleError(f"{archive}: neither a tar nor a zip archive")
    tops = set()
    for name, _ in members:
        pure = PurePosixPath(name)
        if pure.is_absolute() or "\\" in name or any(p in ("..", "") for p in name.split("/")):
            raise BundleError(f"{archive}: member path {name!r} leaves the archive; refused")
        if len(pure.parts) < 2:
            raise BundleError(f"{archive}: member {name!r} is not inside the bundle directory")
        tops.add(pure.parts[0])
    if len(tops) != 1:
        raise BundleError(f"{archive}: expected one bundle directory, found {sorted(tops)}")
    total = sum(size for _, size in members)
    if total > MAX_ARCHIVE_BYTES:
        raise BundleError(f"{archive}: {total} bytes unpacked exceeds {MAX_ARCHIVE_BYTES}")
    (top,) = tops
    if out.is_symlink() or (out.exists() and any(out.iterdir()) and not is_bundle(out)):
        raise BundleError(f"{out}: exists and is not a bundle; not replacing it")
    tmp = _partial_dir(out)
    try:
        for name, size in members:
            rel = PurePosixPath(name).relative_to(top)
            target = tmp.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with _open_member(archive, name) as src, target.open("xb") as dst:
                copied = _copy_capped(src, dst, size)
            if copied != size:
                raise BundleError(f"{archive}: member {name!r} is not {size} bytes as declared")
        manifest = verify_bundle(tmp)
        _swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _check_count(archive: Path, n: int) -> None:
    if n > MAX_ARCHIVE_MEMBERS:
        raise BundleError(f"{archive}: {n} members; a bundle has at most {MAX_ARCHIVE_MEMBERS}")


@contextlib.contextmanager
def _open_member(archive: Path, name: str) -> Iterator[Any]:
    import tarfile
    import zipfile

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf, zf.open(name) as f:
            yield f
    else:
        with tarfile.open(archive) as tar:
            member = tar.extractfile(name)
            if member is None:
                raise BundleError(f"{archive}: member {name!r} has no data")
            with member:
                yield member


def _copy_capped(src: Any, dst: Any, size: int) -> int:
    """Copy at most size + 1 bytes (so a lying header is caught, not followed)."""
    copied = 0
    while copied <= size:
        chunk = src.read(min(1 << 20, size + 1 - copied))
        if not chunk:
            break
        dst.write(chunk)
        copied += len(chunk)
    return copied
