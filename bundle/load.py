"""A bundle opened for scoring: its checked manifest, the ONNX Runtime session of its user tower
(with the provider really in use) and its item matrix. Training's offline evaluation, the report,
the privacy audit and serving's `Recommender` all open bundles here, so they score alike:
user vectors from the ONNX user tower, item scores = user vector @ item matrix.T."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bundle.manifest import read_manifest
from bundle.runtime import create_session


@dataclass(frozen=True)
class OpenBundle:
    path: Path
    manifest: dict[str, Any]
    session: Any  # onnxruntime.InferenceSession
    provider: str  # the execution provider the session really uses
    item_vectors: np.ndarray  # float32 (n_items, D)

    def file(self, role: str) -> Path:
        """Path of a file the manifest lists under `files` (user_tower, item_embeddings, items, user_vocab, item_vocab)."""
        return self.path / self.manifest["files"][role]

    def user_vectors(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """The user tower's output for a feed (features.content.user_inputs)."""
        return self.session.run(None, feed)[0]


def open_bundle(path: str | Path, force_cpu: bool = False, intra_op_threads: int | None = None) -> OpenBundle:
    """Open the bundle in directory `path` (see bundle.locate for URIs): manifest schema checked,
    ONNX session created (CUDA when offered and not `force_cpu`), item matrix loaded."""
    path = Path(path)
    manifest = read_manifest(path)
    files = manifest["files"]
    session, provider = create_session(path / files["user_tower"], force_cpu=force_cpu, intra_op_threads=intra_op_threads)
    return OpenBundle(path, manifest, session, provider, np.load(path / files["item_embeddings"]))
