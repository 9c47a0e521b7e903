"""Bundle archives: one file (tar or zip) holding a verified bundle, and its safe extraction."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from infopt.bundle.files import (
    owner_tag,
    partial_dir,
    remove_stale,
    swap_into_place,
    verify_bundle,
)
from infopt.bundle.manifest import MANIFEST, is_bundle
from infopt.bundle.signing import MAX_SIGNATURE_BYTES, SIGNATURE
from infopt.errors import BundleError

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
    if (root / SIGNATURE).is_file():
        names.append(SIGNATURE)
    target = root.with_name(f"{root.name}.{kind}")
    remove_stale(root)
    tmp = target.with_name(f".{target.name}.partial-{owner_tag()}-{uuid.uuid4().hex[:8]}")
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


def extract_archive(
    archive: str | Path, out: str | Path, public_key: str | Path | None = None
) -> dict[str, Any]:
    """Unpack a bundle archive into directory `out` (atomically, replacing a previous bundle
    there) and verify it. Refused before anything is written: absolute paths, `..`, links of
    any kind, devices and other non-files, more than MAX_ARCHIVE_MEMBERS members or
    MAX_ARCHIVE_BYTES bytes, members outside one top-level directory, compressed members
    expanding more than MAX_RATIO times, and any member the archive's own manifest does not
    list at that size; a truncated or malformed archive is a BundleError too. With
    `public_key`, the bundle must be signed by that key (checked before it is swapped in)."""
    import tarfile
    import zipfile
    import zlib

    try:
        return _extract(Path(archive), Path(out), public_key)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise BundleError(f"{archive}: a damaged or truncated archive ({e})") from None
    except OSError as e:  # a full disk, a file system that refuses: OUT is left as it was
        raise BundleError(f"{archive}: unpacking into {out} failed ({e})") from e


MAX_RATIO = 100  # bundles are stored uncompressed; weights barely compress


def _extract(archive: Path, out: Path, public_key: str | Path | None) -> dict[str, Any]:
    import tarfile
    import zipfile

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
                if zi.file_size > MAX_RATIO * max(zi.compress_size, 1 << 10):
                    raise BundleError(
                        f"{archive}: member {zi.filename!r} expands {zi.compress_size} bytes to "
                        f"{zi.file_size} (more than {MAX_RATIO}×); refused"
                    )
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
    _check_listed(archive, top, members)
    if out.is_symlink() or (out.exists() and any(out.iterdir()) and not is_bundle(out)):
        raise BundleError(f"{out}: exists and is not a bundle; not replacing it")
    tmp = partial_dir(out)
    try:
        for name, size in members:
            rel = PurePosixPath(name).relative_to(top)
            target = tmp.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with _open_member(archive, name) as src, target.open("xb") as dst:
                copied = _copy_capped(src, dst, size)
            if copied != size:
                raise BundleError(f"{archive}: member {name!r} is not {size} bytes as declared")
        manifest = verify_bundle(tmp, public_key)
        swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _check_listed(archive: Path, top: str, members: list[tuple[str, int]]) -> None:
    """Every member is a file the archive's manifest lists, at the size it lists (read from the
    archive, bounded, before any byte is written)."""
    import json

    from infopt.bundle.manifest import MAX_MANIFEST_BYTES

    sizes = dict(members)
    name = f"{top}/{MANIFEST}"
    if name not in sizes:
        raise BundleError(f"{archive}: no {name}; not a bundle archive")
    if sizes[name] > MAX_MANIFEST_BYTES:
        raise BundleError(f"{archive}: {name} is {sizes[name]} bytes, too large for a manifest")
    with _open_member(archive, name) as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    try:
        files = json.loads(raw)["files"]
        listed = {f"{top}/{e['path']}": int(e["size"]) for e in files}
    except (ValueError, KeyError, TypeError, RecursionError):
        raise BundleError(f"{archive}: {name} is not a readable bundle manifest") from None
    listed[f"{top}/{SIGNATURE}"] = sizes.get(f"{top}/{SIGNATURE}", 0)
    if listed[f"{top}/{SIGNATURE}"] > MAX_SIGNATURE_BYTES:
        raise BundleError(f"{archive}: {top}/{SIGNATURE} is too large for a signature")
    for member, size in members:
        if member != name and listed.get(member) != size:
            raise BundleError(
                f"{archive}: member {member!r} ({size} bytes) is not a file its manifest lists "
                "at that size; refused before unpacking"
            )


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
