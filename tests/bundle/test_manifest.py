"""The manifest's schema version: what is read, what is refused and how the refusal reads, on both
sides of the contract (serving's Recommender, training's readers through bundle.load)."""
from __future__ import annotations

import json
import shutil

import pytest

from bundle.load import open_bundle
from bundle.manifest import (
    FILES,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    SUPPORTED_SCHEMA_VERSIONS,
    ManifestError,
    check_schema,
    read_manifest,
    write_manifest,
)


def test_this_code_writes_a_version_it_reads():
    assert SCHEMA_VERSION == 1 and SUPPORTED_SCHEMA_VERSIONS == (1,)
    check_schema({"schema_version": 1})  # no error


@pytest.mark.parametrize(
    ("version", "words"),
    [
        (2, ["schema_version 2", "newer", "schema_version 1", "upgrade trustrec"]),
        (99, ["schema_version 99", "newer", "schema_version 1"]),
        (0, ["schema_version 0", "older", "schema_version 1", "export the model again"]),
    ],
)
def test_another_version_is_refused_naming_it_and_the_supported_one(version, words):
    with pytest.raises(ManifestError) as e:
        check_schema({"schema_version": version}, "b/manifest.json")
    message = str(e.value)
    assert message.startswith("b/manifest.json: ")
    for w in words:
        assert w in message, (w, message)
    assert isinstance(e.value, ValueError)  # the CLI's exit 2, serving's refused swap


@pytest.mark.parametrize(("manifest", "words"), [
    ({}, ["no schema_version", "schema_version 1"]),
    ({"schema_version": "1"}, ["'1' is not an integer", "schema_version 1"]),
    ({"schema_version": True}, ["True is not an integer"]),  # True == 1 in Python: not a version
    ({"schema_version": 1.0}, ["1.0 is not an integer"]),
])  # fmt: skip
def test_a_missing_or_malformed_version_is_refused(manifest, words):
    with pytest.raises(ManifestError) as e:
        check_schema(manifest)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_read_and_write_manifest(tmp_path):
    manifest = {"schema_version": SCHEMA_VERSION, "files": dict(FILES)}
    path = write_manifest(tmp_path, manifest)
    assert path == tmp_path / MANIFEST_FILE and read_manifest(tmp_path) == manifest
    with pytest.raises(ManifestError, match="writing schema_version 2; this trustrec writes 1"):
        write_manifest(tmp_path, {**manifest, "schema_version": 2})
    assert read_manifest(tmp_path) == manifest  # the refused write left the file alone
    (tmp_path / MANIFEST_FILE).write_text('{"schema_version": 1,')  # torn
    with pytest.raises(ManifestError, match="not JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("[1]")
    with pytest.raises(ManifestError, match="not a JSON object"):
        read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"no manifest.json in {tmp_path / 'none'}"):
        read_manifest(tmp_path / "none")


@pytest.fixture()
def copy_with_version(trained_run, tmp_path):
    """A copy of the session's real exported bundle whose manifest claims `version`."""

    def make(version: int):
        bundle = tmp_path / f"bundle-v{version}"
        shutil.copytree(trained_run.result.artifact_dir, bundle)
        manifest = json.loads((bundle / MANIFEST_FILE).read_text())
        manifest["schema_version"] = version
        (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
        return bundle

    return make


@pytest.mark.parametrize(("version", "side"), [(0, "older"), (2, "newer")])
def test_both_readers_refuse_an_older_or_newer_bundle(copy_with_version, version, side):
    from serving.recommender import Recommender

    bundle = copy_with_version(version)
    for load in (Recommender.from_dir, open_bundle):  # serving; training's evaluate / report / audit
        with pytest.raises(ManifestError) as e:
            load(bundle)
        assert f"schema_version {version} is {side}" in str(e.value) and "(schema_version 1)" in str(e.value)


def test_both_readers_load_the_current_version(copy_with_version):
    from serving.recommender import Recommender

    bundle = copy_with_version(SCHEMA_VERSION)
    opened = open_bundle(bundle, force_cpu=True)
    rec = Recommender.from_dir(bundle, force_cpu=True)
    assert opened.manifest == rec.manifest and opened.provider == rec.provider == "CPUExecutionProvider"
    assert (opened.item_vectors == rec.item_vectors).all()
