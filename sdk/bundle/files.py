"""A bundle's files: checked against the manifest before any parser reads them, and written
atomically.

Verifying: the bundle and its manifest are no links, every listed path stays inside, every file
matches its size and sha256, and no file is missing or unlisted. Writing: the bundle is
assembled in a temporary directory beside its destination and swapped in at the end, so a
failed or killed write leaves the destination as it was. No torch, no runtime package.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from infopt.bundle.manifest import (
    FORMAT,
    MANIFEST,
    VERSION,
    is_bundle,
    manifest_bytes,
    parse_manifest,
)
from infopt.bundle.signing import SIGNATURE, check_signature, sign_bundle
from infopt.core.progress import Progress, silent
from infopt.errors import BundleError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_relative(root: Path, name: object) -> Path:
    """`name` as a path inside `root`, or a BundleError: relative, no `..`, no backslashes."""
    if not isinstance(name, str) or not name:
        raise BundleError(f"{root}: file entry {name!r} is not a path")
    pure = PurePosixPath(name)
    if (
        pure.is_absolute()
        or any(ord(c) < 32 for c in name)  # NUL and other control characters
        or "\\" in name
        or any(part in ("..", ".", "") for part in name.split("/"))
        or name in (MANIFEST, SIGNATURE)
    ):
        raise BundleError(f"{root}: file path {name!r} leaves the bundle or is not canonical")
    return root.joinpath(*pure.parts)


def walk(root: Path) -> Iterator[Path]:
    """Every entry under root (files, links, directories), never following links."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            yield Path(dirpath) / name


def verify_bundle(path: str | Path, public_key: str | Path | None = None) -> dict[str, Any]:
    """The manifest of a bundle whose every file checks out; a BundleError naming the first file
    that does not (changed, truncated, missing, unlisted, a link, outside the bundle). A signed
    bundle's signature must match its manifest; with `public_key` (a PEM file) the bundle must
    be signed by that key (`infopt.bundle.signing`)."""
    root = Path(path)
    raw = manifest_bytes(root)  # read once: the bytes signed are the bytes checked and parsed
    check_signature(root, public_key, raw)
    manifest = parse_manifest(raw, root / MANIFEST)
    listed: dict[Path, dict[str, Any]] = {}
    for entry in manifest["files"]:
        target = safe_relative(root, entry.get("path"))
        if target in listed:
            raise BundleError(f"{root}: {entry['path']!r} is listed twice")
        listed[target] = entry
    holders = {p for t in listed for p in t.relative_to(root).parents}
    for entry_path in walk(root):
        if entry_path.is_symlink():
            raise BundleError(f"{entry_path}: links are not allowed in a bundle")
        if entry_path.is_dir():
            if entry_path.relative_to(root) not in holders:  # holds no listed file
                raise BundleError(f"{entry_path}: a directory the manifest does not list")
            continue
        if entry_path not in (root / MANIFEST, root / SIGNATURE) and entry_path not in listed:
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
    check_vocabulary(root, manifest)
    names = {str(PurePosixPath(e["path"])) for e in manifest["files"]}
    drafts = (manifest.get("draft") or {}).get("artifacts") or {}
    for label, arts in (("artifact", manifest["artifacts"]), ("draft artifact", drafts)):
        for runtime, artifact in arts.items():
            for f in artifact.get("files", []):
                if f not in names:
                    raise BundleError(f"{root}: {label} {runtime!r} names unlisted file {f!r}")
    return manifest


def check_vocabulary(root: Path, manifest: dict[str, Any]) -> None:
    """The tokenizer's vocabulary fits the model's (its ids index the embedding and logits)."""
    from tokenizers import Tokenizer

    name = (manifest.get("tokenizer") or {}).get("file")
    vocab = ((manifest.get("model") or {}).get("config") or {}).get("vocab_size")
    if name is None or vocab is None:
        return
    path = safe_relative(root, name)
    from infopt.core.tokenizer import native_errors

    with native_errors(BundleError, f"{path}: not a tokenizer the tokenizers library reads"):
        size = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    if size > vocab:
        raise BundleError(
            f"{path}: {size} tokens, more than the model's vocabulary (model.config.vocab_size "
            f"{vocab})"
        )


def check_out(out: str | Path) -> Path:
    """`out` as a bundle's destination: absent, empty, or a bundle (which a new one replaces);
    a `BundleError` for anything else (callers check before any work, and again on writing)."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BundleError(f"{out}: exists and is not a bundle directory; not replacing it")
    if out.exists() and any(out.iterdir()) and not is_bundle(out):
        raise BundleError(f"{out}: a non-empty directory that is not a bundle; not replacing it")
    return out


def write_bundle(
    out: str | Path,
    manifest: dict[str, Any],
    writers: dict[str, Callable[[Path], object]],
    progress: Progress | None = None,
    sign: Ed25519PrivateKey | None = None,
) -> dict[str, Any]:
    """Write a bundle atomically. `writers` maps each relative file path to a function writing
    that file (and any siblings it needs: an exporter converts as it writes); `manifest` gets
    format, version and the sizes and hashes of every file written. OUT is replaced
    only when everything is written and verified; on any failure it is left as it was.
    `progress` hears of each file as it is written ("write files") and of the check. With
    `sign`, the manifest is signed before the bundle is swapped in."""
    out = check_out(out)
    tmp = partial_dir(out)
    try:
        step = progress or silent
        for i, rel in enumerate(sorted(writers)):
            step("write files", i, len(writers), rel)
            target = safe_relative(tmp, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            writers[rel](target)
        step("write files", len(writers), len(writers))
        for path in walk(tmp):  # readable by all, whatever mode a writer's library chose
            path.chmod(0o755 if path.is_dir() else 0o644)
        files = [  # what the writers wrote (a writer may add siblings: ONNX external data)
            {
                "path": p.relative_to(tmp).as_posix(),
                "size": p.stat().st_size,
                "sha256": sha256_file(p),
            }
            for p in sorted(walk(tmp))
            if p.is_file()
        ]
        full = {"format": FORMAT, "version": VERSION, **manifest, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")
        if sign is not None:
            sign_bundle(tmp, sign)
        fsync_tree(tmp)
        verify_bundle(tmp)
        swap_into_place(tmp, out)
    except OSError as e:  # a full disk, a file system that refuses: OUT is left as it was
        raise BundleError(f"{out}: writing the bundle failed ({e}); {out} is unchanged") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return full


def partial_dir(out: Path) -> Path:
    """A fresh work directory beside `out`, named after this process; what killed processes
    left beside `out` (work directories, a replaced bundle being removed, an archive being
    written) is removed first, never what a live process is writing."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        tmp = out.parent / f".{out.name}.partial-{owner_tag()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise BundleError(f"{out}: cannot write here ({e.strerror or e})") from e
    return tmp


def owner_tag() -> str:
    """This process in a temporary name: its pid and start time (a pid alone can be reused by
    another process after a kill, which would keep the leftover forever)."""
    pid = os.getpid()
    return f"{pid}.{_start_time(pid)}"


def remove_stale(out: Path) -> None:
    """Remove `.OUT.partial-*`, `.OUT.old-*` and `.OUT.<kind>.partial-*` entries beside `out`
    whose process is gone."""
    for kind in ("partial", "old"):
        for prefix in (
            f".{out.name}.{kind}-",
            f".{out.name}.tar.{kind}-",
            f".{out.name}.zip.{kind}-",
        ):
            for stale in out.parent.glob(f"{prefix}*"):
                if not _owner_alive(stale.name[len(prefix) :].split("-")[0]):
                    if stale.is_dir() and not stale.is_symlink():
                        shutil.rmtree(stale, ignore_errors=True)
                    else:
                        stale.unlink(missing_ok=True)


def _owner_alive(tag: str) -> bool:
    """Whether the process a temporary name's tag (`pid` or `pid.start`) names still runs; a
    name without a readable tag is kept (not ours to judge)."""
    pid, _, start = tag.partition(".")
    if not pid.isdigit():
        return True
    if not _alive(int(pid)):
        return False
    return not start or start == _start_time(int(pid))


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), or "" where unknown."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat_line.rsplit(")", 1)[-1].split()[19]  # field 22, after the command's parentheses


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_tree(root: Path) -> None:
    for p in [*walk(root), root]:
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())


_RENAME_EXCHANGE = 2


def swap_into_place(tmp: Path, out: Path) -> None:
    """Put directory `tmp` at `out`: a plain rename when `out` is absent; an atomic exchange
    (Linux renameat2) when it exists, so no moment leaves `out` missing; elsewhere two renames."""
    if not out.exists():
        try:
            os.rename(tmp, out)
            return
        except OSError as e:  # another writer put its OUT there meanwhile: replace it below
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if _exchange(tmp, out):
        shutil.rmtree(tmp)  # now holds the previous bundle
        return
    old = out.parent / f".{out.name}.old-{owner_tag()}-{uuid.uuid4().hex[:8]}"
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
