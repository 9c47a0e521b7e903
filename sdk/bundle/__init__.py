"""Bundles, the directory an app ships: `manifest` (its schema, read and checked), `files`
(verified before any parser reads them, written atomically), `archive` (one file, safely
unpacked), `reader` (`open_bundle` -> `Bundle`) and `build` (plan -> compress -> export ->
package; it needs torch, so it is imported from its module)."""

from infopt.bundle.archive import extract_archive, write_archive
from infopt.bundle.files import verify_bundle, write_bundle
from infopt.bundle.manifest import MANIFEST, is_bundle, read_manifest
from infopt.bundle.reader import Bundle, open_bundle

__all__ = [
    "MANIFEST",
    "Bundle",
    "extract_archive",
    "is_bundle",
    "open_bundle",
    "read_manifest",
    "verify_bundle",
    "write_archive",
    "write_bundle",
]
