"""Signed bundles: `build --sign KEY` signs the manifest (every file's sha256); a signed bundle
with any change refuses to verify or load, and `--key PUB` requires that key's signature."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

import infopt
from infopt.bundle import MANIFEST, verify_bundle
from infopt.bundle.archive import extract_archive, write_archive
from infopt.bundle.build import build
from infopt.bundle.signing import SIGNATURE, generate_key, load_private_key, sign_bundle
from infopt.cli import main
from infopt.errors import BundleError, InvalidArgumentError


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    code, out, err = invoke("keygen", str(folder / "release.key"), "--json")
    assert code == 0, err
    made = json.loads(out)
    other, other_pub, _ = generate_key(folder / "other.key")
    return {
        "private": Path(made["private_key"]),
        "public": Path(made["public_key"]),
        "other": other,
        "other_pub": other_pub,
    }


@pytest.fixture(scope="module")
def signed(
    tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, keys: dict[str, Path]
) -> Path:
    out = tmp_path_factory.mktemp("signed") / "bundle"
    summary = build(tiny_gguf, out, device="host", runtime="pytorch", sign=keys["private"])
    assert summary["signed_by"] and (out / SIGNATURE).is_file()
    return out


def copy(bundle: Path, tmp_path: Path) -> Path:
    shutil.copytree(bundle, tmp_path / "copy")
    return tmp_path / "copy"


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(
    keys: dict[str, Path],
) -> None:
    assert stat.S_IMODE(keys["private"].stat().st_mode) == 0o600
    assert b"PUBLIC KEY" in keys["public"].read_bytes()
    code, _, err = invoke("keygen", str(keys["private"]))
    assert code == 1 and "exists" in err


def test_a_signed_bundle_verifies_and_loads_with_its_key(
    signed: Path, keys: dict[str, Path]
) -> None:
    code, out, err = invoke("verify", str(signed), "--key", str(keys["public"]))
    assert code == 0, err
    assert "signed by key" in out
    model = infopt.load(signed, public_key=keys["public"])
    assert len(model.generate("hello", max_new_tokens=2).token_ids) == 2


def test_a_signed_manifest_changed_after_signing_is_refused_even_without_a_key(
    signed: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    bundle = copy(signed, tmp_path)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["generation_defaults"] = {"temperature": 0.9}  # a claim, every sha256 unchanged
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    with pytest.raises(BundleError, match="changed after signing"):
        verify_bundle(bundle)
    with pytest.raises(BundleError, match="changed after signing"):
        infopt.load(bundle)
    code, _, err = invoke("run", str(bundle), "--prompt", "hi", "--key", str(keys["public"]))
    assert code == 1 and "changed after signing" in err and "Traceback" not in err


def test_a_changed_file_of_a_signed_bundle_is_refused(signed: Path, tmp_path: Path) -> None:
    bundle = copy(signed, tmp_path)
    tokenizer = bundle / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"hello"', '"hallo"', 1) + " ")
    with pytest.raises(BundleError, match="tokenizer.json"):
        infopt.load(bundle)


def test_a_pinned_key_refuses_an_unsigned_a_resigned_or_a_stripped_bundle(
    signed: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    resigned = copy(signed, tmp_path)
    sign_bundle(resigned, load_private_key(keys["other"]))  # an attacker's own valid signature
    verify_bundle(resigned)  # self-consistent ...
    with pytest.raises(BundleError, match="not by the required key"):
        verify_bundle(resigned, keys["public"])  # ... but not by the key the user trusts
    (resigned / SIGNATURE).unlink()
    with pytest.raises(BundleError, match="not signed"):
        infopt.load(resigned, public_key=keys["public"])
    code, _, err = invoke("verify", str(resigned), "--key", str(keys["public"]))
    assert code == 1 and "not signed" in err


def test_a_damaged_signature_record_is_a_typed_error(signed: Path, tmp_path: Path) -> None:
    for content in (b"{", b"[]", b'{"format": "x"}', b"x" * 5000):
        bundle = copy(signed, tmp_path / str(len(content)))
        (bundle / SIGNATURE).write_bytes(content)
        with pytest.raises(BundleError):
            verify_bundle(bundle)
    bundle = copy(signed, tmp_path / "b64")
    record = json.loads((bundle / SIGNATURE).read_text())
    (bundle / SIGNATURE).write_text(json.dumps({**record, "signature": "!!"}))
    with pytest.raises(BundleError, match="base64"):
        verify_bundle(bundle)


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_a_signed_bundle_travels_in_an_archive(
    signed: Path, keys: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    archive = write_archive(copy(signed, tmp_path), kind)
    extract_archive(archive, tmp_path / "out", public_key=keys["public"])
    assert (tmp_path / "out" / SIGNATURE).is_file()
    with pytest.raises(BundleError, match="not by the required key"):
        extract_archive(archive, tmp_path / "out2", public_key=keys["other_pub"])
    assert not (tmp_path / "out2").exists()  # nothing left behind


def test_keys_openssl_makes_work_and_other_kinds_are_refused_by_name(
    tmp_path: Path, signed: Path
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    ed, rsa = tmp_path / "ed.pem", tmp_path / "rsa.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", ed], check=True)
    subprocess.run(["openssl", "genpkey", "-algorithm", "rsa", "-out", rsa], check=True,
                   capture_output=True)  # fmt: skip
    bundle = copy(signed, tmp_path)
    sign_bundle(bundle, load_private_key(ed))
    verify_bundle(bundle, ed)  # a private key's file names its public half too
    with pytest.raises(InvalidArgumentError, match="Ed25519"):
        load_private_key(rsa)


def test_bad_key_files_are_typed_errors(tmp_path: Path, tiny_gguf: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    with pytest.raises(InvalidArgumentError, match="not a PEM"):
        load_private_key(junk)
    with pytest.raises(InvalidArgumentError, match="cannot be read"):
        load_private_key(tmp_path / "missing.pem")
    with pytest.raises(InvalidArgumentError, match="not a PEM"):  # before any build work
        build(tiny_gguf, tmp_path / "out", device="host", sign=junk)
    assert not (tmp_path / "out").exists()
    with pytest.raises(InvalidArgumentError, match="model file"):
        infopt.load(tiny_gguf, public_key=junk)


def test_a_signature_claiming_another_key_id_is_refused(
    signed: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    """An attacker's valid signature whose record shows the publisher's key id: the id users
    read must be the verified key's."""
    bundle = copy(signed, tmp_path)
    publisher = json.loads((bundle / SIGNATURE).read_text())["key_id"]
    sign_bundle(bundle, load_private_key(keys["other"]))
    record = json.loads((bundle / SIGNATURE).read_text())
    (bundle / SIGNATURE).write_text(json.dumps({**record, "key_id": publisher}))
    with pytest.raises(BundleError, match="is not the id of the key it carries"):
        verify_bundle(bundle)
    code, out, _ = invoke("verify", str(bundle))
    assert code == 1 and publisher not in out


def test_a_file_changed_with_its_hash_updated_is_caught_by_the_signature(
    signed: Path, tmp_path: Path
) -> None:
    import hashlib

    bundle = copy(signed, tmp_path)
    tokenizer = bundle / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text() + " ")
    manifest = json.loads((bundle / MANIFEST).read_text())
    for entry in manifest["files"]:  # what an attacker would do: the manifest made consistent
        if entry["path"] == "tokenizer.json":
            entry["size"] = tokenizer.stat().st_size
            entry["sha256"] = hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    with pytest.raises(BundleError, match="changed after signing"):
        infopt.load(bundle)


def test_a_pinned_key_is_checked_before_any_file_is_hashed_and_covers_the_draft(
    signed: Path, tiny_gguf: Path, tmp_path: Path, keys: dict[str, Path]
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    code, _, err = invoke("run", str(signed), "--prompt", "hi", "--key", str(junk))
    assert code == 1 and "InvalidArgumentError" in err and "not a PEM" in err
    with pytest.raises(InvalidArgumentError, match="draft must be a bundle signed"):
        infopt.load(signed, public_key=keys["public"], draft=tiny_gguf)
