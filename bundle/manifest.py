"""The manifest (`manifest.json`): what a bundle holds and how to score it, and its schema version.

`SCHEMA_VERSION` is what `training.export` writes; `SUPPORTED_SCHEMA_VERSIONS` are what readers
load. A manifest of another version is refused with a message naming its version and the supported
ones, never half-read. Bump the version when a reader written for the old one would misread the new
one (a renamed or re-meant key, not an added optional one), and list the versions a reader still
understands in `SUPPORTED_SCHEMA_VERSIONS`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)

MANIFEST_FILE = "manifest.json"
USER_TOWER_FILE, ITEM_EMBEDDINGS_FILE, ITEMS_FILE = "user_tower.onnx", "item_embeddings.npy", "items.json"
USER_VOCAB_FILE, ITEM_VOCAB_FILE = "user_vocab.json", "item_vocab.json"
FILES = {  # manifest["files"]: role -> file name inside the bundle
    "user_tower": USER_TOWER_FILE,
    "item_embeddings": ITEM_EMBEDDINGS_FILE,
    "items": ITEMS_FILE,
    "user_vocab": USER_VOCAB_FILE,
    "item_vocab": ITEM_VOCAB_FILE,
}


class ManifestError(ValueError):
    """A manifest this code cannot read: missing, not JSON, or of an unsupported schema version."""


def _supported() -> str:
    return ", ".join(map(str, SUPPORTED_SCHEMA_VERSIONS))


def check_schema(manifest: dict[str, Any], where: str | Path = MANIFEST_FILE) -> None:
    """Raise ManifestError unless `manifest["schema_version"]` is one this code reads; the message
    names the version found and the supported ones, and says which side is behind."""
    version = manifest.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version in SUPPORTED_SCHEMA_VERSIONS:
        return
    if "schema_version" not in manifest:
        raise ManifestError(f"{where}: no schema_version (this trustrec reads schema_version {_supported()})")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ManifestError(f"{where}: schema_version {version!r} is not an integer (this trustrec reads schema_version {_supported()})")
    if version > max(SUPPORTED_SCHEMA_VERSIONS):
        raise ManifestError(
            f"{where}: schema_version {version} is newer than this trustrec reads (schema_version {_supported()}); "
            "upgrade trustrec where the bundle is read, or export the model with this version"
        )
    raise ManifestError(
        f"{where}: schema_version {version} is older than this trustrec reads (schema_version {_supported()}); "
        "export the model again (`trustrec export`) or train it again"
    )


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """The manifest of the bundle in `bundle_dir`, schema version checked."""
    path = Path(bundle_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST_FILE} in {bundle_dir}") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: not a JSON object")
    check_schema(manifest, path)
    return manifest


def write_manifest(bundle_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write `manifest` into `bundle_dir` (a staging directory, see bundle.write); it must carry
    this code's SCHEMA_VERSION."""
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(f"writing schema_version {manifest.get('schema_version')!r}; this trustrec writes {SCHEMA_VERSION}")
    path = Path(bundle_dir) / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2))
    return path
