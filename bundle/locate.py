"""Where a bundle is: a local directory, or a model in the MLflow registry (`models:/name@alias`,
`models:/name/N`), downloaded to a temporary directory. MLflow is imported only for a `models:/` URI."""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bundle.manifest import MANIFEST_FILE

MODELS_SCHEME = "models:/"
DOWNLOAD_PREFIX = "trustrec-model-"  # the temporary directory a registry model is downloaded to


def find_bundle(root: str | Path) -> Path:
    """The directory holding manifest.json: `root` itself or the pyfunc model's artifacts/<name>/."""
    root = Path(root)
    if (root / MANIFEST_FILE).exists():
        return root
    found = sorted(root.glob(f"artifacts/*/{MANIFEST_FILE}")) + sorted(root.glob(f"*/{MANIFEST_FILE}"))
    if not found:
        raise FileNotFoundError(f"no {MANIFEST_FILE} under {root}")
    return found[0].parent


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of `models:/name@alias` or `models:/name/version`; exactly one of
    alias and version is set."""
    if not uri.startswith(MODELS_SCHEME):
        raise ValueError(f"{uri}: not a models:/ URI")
    name, _, alias = uri[len(MODELS_SCHEME) :].partition("@")
    if alias:
        return name, alias, None
    name, _, version = name.partition("/")
    if not name or not version:
        raise ValueError(f"{uri}: want models:/name@alias or models:/name/version")
    return name, None, version


def registered_model_name(uri: str, default: str = "trustrec") -> str:
    """The registered model's name in a `models:/` URI; `default` for a local directory."""
    if not uri.startswith(MODELS_SCHEME):
        return default
    return uri[len(MODELS_SCHEME) :].split("@")[0].split("/")[0]


class ModelNotFoundError(ValueError):
    """A `models:/` URI names a model, alias or version the registry does not hold."""


def sqlite_registry(tracking_uri: str | None) -> Path | None:
    """The file of a `sqlite:///PATH` tracking URI (None for any other)."""
    prefix = "sqlite:///"
    if tracking_uri and tracking_uri.startswith(prefix) and ":memory:" not in tracking_uri:
        return Path(tracking_uri[len(prefix) :])
    return None


TRAIN_FIRST = "train a model first (`trustrec train` registers it as @champion)"
NO_VERSION_HINT = "`trustrec train` registers @champion, `trustrec promote` moves an alias"


def missing_registry(tracking_uri: str | None) -> str | None:
    """Why a `models:/` URI cannot resolve before MLflow is asked (it would create an empty SQLite
    registry and then say the model does not exist): "no MLflow registry at PATH (tracking_uri URI)",
    else None. Shared by `resolve_model_uri` and `trustrec serve`'s preflight, which add their way out."""
    registry = sqlite_registry(tracking_uri)
    if registry is not None and not registry.exists():
        return f"no MLflow registry at {registry.resolve()} (tracking_uri {tracking_uri})"
    return None


def no_version(tracking_uri: str | None, why: object) -> str:
    """The reason of a registry that lacks the named model, alias or version."""
    return f"the registry at {tracking_uri} has no such model version ({why})"


def resolve_model_uri(uri: str, tracking_uri: str | None = None) -> tuple[Path, str]:
    """(local bundle dir, model version) for a path or an MLflow `models:/name@alias` URI; a local
    directory's version is "local". A SQLite registry that is not there is a FileNotFoundError (MLflow
    would create an empty one), a model / alias / version it lacks a ModelNotFoundError; both say
    what to do."""
    if not uri.startswith(MODELS_SCHEME):
        return find_bundle(Path(uri)), "local"
    name, alias, version = parse_model_uri(uri)
    if missing := missing_registry(tracking_uri):
        raise FileNotFoundError(f"{uri}: {missing}; {TRAIN_FIRST}, or give a bundle directory")
    import mlflow
    from mlflow.exceptions import MlflowException

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    if alias:
        try:
            version = mlflow.MlflowClient().get_model_version_by_alias(name, alias).version
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise ModelNotFoundError(f"{uri}: {no_version(tracking_uri, e.message)}; {NO_VERSION_HINT}") from None
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX))
    return find_bundle(Path(local)), str(version)


@contextmanager
def fetched_model(uri: str, tracking_uri: str | None = None) -> Iterator[tuple[Path, str]]:
    """`resolve_model_uri` for a caller that loads the bundle into memory: a registry model's
    downloaded copy is removed on exit. Each load (a replica's start or swap, a preflight,
    `trustrec recommend`) downloaded a fresh copy into the temporary directory and left it there."""
    bundle, version = resolve_model_uri(uri, tracking_uri)
    try:
        yield bundle, version
    finally:
        if uri.startswith(MODELS_SCHEME):
            root = next((p for p in (bundle, *bundle.parents) if p.name.startswith(DOWNLOAD_PREFIX)), None)
            if root is not None:
                shutil.rmtree(root, ignore_errors=True)
