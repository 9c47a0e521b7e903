"""Signing a bundle: an Ed25519 signature over its manifest, which holds every file's sha256.

`build --sign KEY` writes `manifest.sig` beside `manifest.json` before the bundle is swapped
into place; `verify --key PUB` (and `load(public_key=...)`) requires a signature by that key.
A bundle carrying a signature is always checked against the key it names, so a manifest edited
after signing is refused even when no key is given; only a pinned key also refuses a bundle
whose signature was removed or replaced. Keys are PEM files: PKCS#8 private keys (e.g. from
`openssl genpkey -algorithm ed25519` or `infopt-pack keygen`) and SubjectPublicKeyInfo public
keys (`openssl pkey -pubout`). The cryptography is the `cryptography` package's; nothing here
is home-made but the file layout.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infopt.bundle.manifest import MANIFEST
from infopt.errors import BundleError, InvalidArgumentError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

SIGNATURE = "manifest.sig"
SIGNATURE_FORMAT = "infopt-signature"
ALGORITHM = "ed25519"
MAX_SIGNATURE_BYTES = 4096
MAX_KEY_BYTES = 16384
# The passphrase of an encrypted private key, read from the environment, never from arguments
# (which other users of the machine can see in the process list).
PASSPHRASE_ENV = "INFOPT_KEY_PASSPHRASE"


def key_id(public: Ed25519PublicKey) -> str:
    """A short fingerprint of a public key: sha256 of its 32 raw bytes, first 16 hex digits."""
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def _raw(public: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _read_key_file(path: str | Path, what: str) -> bytes:
    p = Path(path).expanduser()
    try:
        if p.stat().st_size > MAX_KEY_BYTES:
            raise InvalidArgumentError(f"{p}: too large for a PEM {what}")
        return p.read_bytes()
    except OSError as e:
        raise InvalidArgumentError(f"{what} {str(p)!r}: cannot be read ({e.strerror})") from None


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (encrypted ones take $INFOPT_KEY_PASSPHRASE)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_key_file(path, "private key")
    passphrase = os.environ.get(PASSPHRASE_ENV)
    try:
        key = serialization.load_pem_private_key(
            data, password=passphrase.encode() if passphrase else None
        )
    except TypeError:  # encrypted without a passphrase, or a passphrase for a plain key
        raise InvalidArgumentError(
            f"{path}: the key is encrypted; set {PASSPHRASE_ENV} to its passphrase"
            if not passphrase
            else f"{path}: the key is not encrypted; unset {PASSPHRASE_ENV}"
        ) from None
    except ValueError as e:
        raise InvalidArgumentError(
            f"{path}: not a PEM private key (or a wrong passphrase): {e}"
        ) from None
    except Exception as e:  # cryptography's UnsupportedAlgorithm and the like
        raise InvalidArgumentError(f"{path}: not a usable private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidArgumentError(
            f"{path}: a {type(key).__name__.removeprefix('_')} key; infopt signs with Ed25519 "
            "(make one with `infopt-pack keygen` or `openssl genpkey -algorithm ed25519`)"
        )
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (a private key's file works too)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _read_key_file(path, "public key")
    if b"PRIVATE KEY" in data:
        return load_private_key(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except Exception as e:  # ValueError for bad PEM, UnsupportedAlgorithm for other kinds
        raise InvalidArgumentError(f"{path}: not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidArgumentError(
            f"{path}: a {type(key).__name__.removeprefix('_')} key; infopt verifies Ed25519"
        )
    return key


def generate_key(out: str | Path) -> tuple[Path, Path, str]:
    """A new Ed25519 key pair: OUT (private, PKCS#8 PEM, mode 600) and OUT.pub; neither may
    exist. Returns both paths and the key id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path = Path(out).expanduser()
    public_path = private_path.with_name(private_path.name + ".pub")
    for p in (private_path, public_path):
        if p.exists() or p.is_symlink():
            raise InvalidArgumentError(f"{p}: exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    created: list[Path] = []
    try:
        for path, data, mode in (
            (private_path, private_pem, 0o600),
            (public_path, public_pem, 0o644),
        ):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            created.append(path)  # ours from here on: removed if a later step fails
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    except OSError as e:
        for path in created:
            path.unlink(missing_ok=True)
        raise InvalidArgumentError(f"{out}: cannot write the key ({e.strerror or e})") from None
    return private_path, public_path, key_id(key.public_key())


def sign_bundle(root: Path, key: Ed25519PrivateKey) -> dict[str, Any]:
    """Write `manifest.sig`: the key's public half and its signature of manifest.json's bytes."""
    manifest = (root / MANIFEST).read_bytes()
    public = key.public_key()
    record = {
        "format": SIGNATURE_FORMAT,
        "version": 1,
        "algorithm": ALGORITHM,
        "key_id": key_id(public),
        "public_key": base64.b64encode(_raw(public)).decode(),
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "signature": base64.b64encode(key.sign(manifest)).decode(),
    }
    (root / SIGNATURE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def read_signature(root: Path) -> dict[str, Any] | None:
    """The bundle's signature record, shape-checked; None for an unsigned bundle."""
    path = root / SIGNATURE
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        raise BundleError(f"{path}: not a regular file")
    if path.stat().st_size > MAX_SIGNATURE_BYTES:
        raise BundleError(f"{path}: too large for a signature")
    try:
        record = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        raise BundleError(f"{path}: not a readable signature record") from None
    fields = ("format", "version", "algorithm", "key_id", "public_key", "signature")
    if not isinstance(record, dict) or any(k not in record for k in fields):
        raise BundleError(f"{path}: not a signature record (needs {list(fields)})")
    if record["format"] != SIGNATURE_FORMAT or record["version"] != 1:
        raise BundleError(
            f"{path}: format {record['format']!r} version {record['version']!r}; this infopt "
            f"reads {SIGNATURE_FORMAT!r} version 1"
        )
    if record["algorithm"] != ALGORITHM:
        raise BundleError(f"{path}: algorithm {record['algorithm']!r}; expected {ALGORITHM!r}")
    return record


def check_signature(
    root: Path, public_key: str | Path | None = None, manifest: bytes | None = None
) -> str | None:
    """Check the bundle's signature, if it has one, against the key it names and, with
    `public_key`, against that key too (then an unsigned bundle is refused), over `manifest`
    (the manifest's bytes as the caller read them; else read here). Returns the signer's key
    id, or None for an unsigned bundle loaded without a key."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    trusted = load_public_key(public_key) if public_key is not None else None
    record = read_signature(root)
    if record is None:
        if trusted is not None:
            raise BundleError(
                f"{root}: not signed ({SIGNATURE} is missing), but a signature by key "
                f"{key_id(trusted)} is required"
            )
        return None
    where = root / SIGNATURE
    try:
        named = Ed25519PublicKey.from_public_bytes(base64.b64decode(record["public_key"]))
        signature = base64.b64decode(record["signature"], validate=True)
    except (ValueError, TypeError):
        raise BundleError(f"{where}: the public key or signature is not valid base64") from None
    if record["key_id"] != key_id(named):  # the id shown to users must be the verified key's
        raise BundleError(
            f"{where}: key_id {record['key_id']!r} is not the id of the key it carries "
            f"({key_id(named)}); refused"
        )
    if trusted is not None and _raw(trusted) != _raw(named):
        raise BundleError(
            f"{root}: signed by key {key_id(named)}, not by the required key {key_id(trusted)}"
        )
    try:
        named.verify(
            signature, manifest if manifest is not None else (root / MANIFEST).read_bytes()
        )
    except InvalidSignature:
        raise BundleError(
            f"{root}: the signature does not match {MANIFEST} (changed after signing); refused"
        ) from None
    return key_id(named)
