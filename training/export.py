"""Export: plain-torch towers rebuilt from the trained TorchRec weights -> ONNX + artifacts.

TorchRec's KJT modules do not export, so the user tower is rebuilt from plain
`nn.EmbeddingBag(mode="mean")` with offsets and `nn.Embedding`, fed the very weights the
EmbeddingBagCollection trained, and checked for parity (TorchRec == plain == ONNX Runtime).
The item side is precomputed once into a normalized matrix. The artifact directory
(ONNX + item matrix + vocabularies + manifest JSON) is the only contract with serving.
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from features.schema import Dataset
from training.data import CSR, user_features
from training.model import TowerSpec, TwoTower

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
USER_TOWER_FILE, ITEM_EMBEDDINGS_FILE, ITEMS_FILE = "user_tower.onnx", "item_embeddings.npy", "items.json"
USER_VOCAB_FILE, ITEM_VOCAB_FILE, MANIFEST_FILE = "user_vocab.json", "item_vocab.json", "manifest.json"


class PlainUserTower(nn.Module):
    """Same math as `UserArch`, with ONNX-exportable modules.

    Inputs: `history` int64[N] (item indices of all users, concatenated), `offsets` int64[B]
    (start of each user's slice), `user` int64[B] (user index, or the OOV row).
    """

    def __init__(self, model: TwoTower):
        super().__init__()
        spec, arch = model.spec, model.user_arch
        weights = {name: bag.weight.detach().float().cpu() for name, bag in arch.ebc.embedding_bags.items()}
        self.history = nn.EmbeddingBag.from_pretrained(weights["t_history"], freeze=True, mode="mean")
        self.user = nn.Embedding.from_pretrained(weights["t_user_id"], freeze=True) if spec.use_user_id else None
        self.mlp = copy.deepcopy(arch.mlp).float().cpu()

    def forward(self, history: torch.Tensor, offsets: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        x = self.history(history, offsets)
        if self.user is not None:
            x = torch.cat([x, self.user(user)], dim=1)
        return F.normalize(self.mlp(x), dim=-1)


def flat_inputs(spec: TowerSpec, users: np.ndarray, history: CSR, user_index: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The ONNX feed for a batch of users (the same layout serving builds)."""
    indptr, indices = history
    lengths = indptr[users + 1] - indptr[users]
    parts = [indices[indptr[u] : indptr[u + 1]] for u in users]
    return {
        "history": np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64),
        "offsets": np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64),
        "user": (users if user_index is None else user_index).astype(np.int64),
    }


def export_onnx(tower: PlainUserTower, path: Path, example: dict[str, np.ndarray]) -> None:
    # the exporter narrates every pass at WARNING; keep the console for what matters
    for name in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    batch, n_history = torch.export.Dim("batch", min=1), torch.export.Dim("n_history", min=0)
    args = tuple(torch.from_numpy(example[k]) for k in ("history", "offsets", "user"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            tower.eval(),
            args,
            str(path),
            dynamo=True,
            input_names=["history", "offsets", "user"],
            output_names=["user_embedding"],
            dynamic_shapes={"history": {0: n_history}, "offsets": {0: batch}, "user": {0: batch}},
            external_data=False,
            verbose=False,
        )


@torch.no_grad()
def parity(model: TwoTower, tower: PlainUserTower, onnx_path: Path, users: np.ndarray, history: CSR) -> dict[str, float]:
    """Max |difference| of user embeddings: TorchRec vs plain torch vs ONNX Runtime (CPU)."""
    import onnxruntime as ort

    model.eval()
    device = next(model.parameters()).device
    torchrec_out = model.user_arch(user_features(model.spec, users, history, device)).float().cpu().numpy()
    feed = flat_inputs(model.spec, users, history)
    plain_out = tower(*(torch.from_numpy(feed[k]) for k in ("history", "offsets", "user"))).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, feed)[0]
    return {
        "parity/torchrec_vs_plain": float(np.abs(torchrec_out - plain_out).max()),
        "parity/torchrec_vs_onnx": float(np.abs(torchrec_out - onnx_out).max()),
    }


def write_artifacts(
    model: TwoTower,
    item_embeddings: np.ndarray,
    dataset: Dataset,
    history: CSR,
    out_dir: str | Path,
    metrics: dict[str, float],
    provenance: dict[str, Any],
    popularity: list[str],
    parity_atol: float = 1e-5,
) -> dict[str, Any]:
    """Write the artifact directory atomically (temp dir, then rename) and return the manifest."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        tower = PlainUserTower(model).eval()
        sample = np.arange(min(model.spec.n_users, 64))
        export_onnx(tower, tmp / USER_TOWER_FILE, flat_inputs(model.spec, sample, history))
        checks = parity(model, tower, tmp / USER_TOWER_FILE, sample, history)
        worst = max(checks.values())
        if worst > parity_atol:
            raise RuntimeError(f"ONNX parity check failed: max abs diff {worst:.3g} > {parity_atol:g} ({checks})")
        np.save(tmp / ITEM_EMBEDDINGS_FILE, item_embeddings.astype(np.float32))
        dataset.user_vocab.save(tmp / USER_VOCAB_FILE)
        dataset.item_vocab.save(tmp / ITEM_VOCAB_FILE)
        items = [
            {"item_id": raw, "title": dataset.items.title[i], "genres": [dataset.genre_names[g] for g in dataset.items.genres[i]]}
            for i, raw in enumerate(dataset.item_vocab.ids)
        ]
        (tmp / ITEMS_FILE).write_text(json.dumps(items))
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "model": {"kind": "two_tower", "spec": asdict(model.spec)},
            "inputs": {
                "history": {"dtype": "int64", "shape": ["n_history"], "doc": "item indices of every user's history, concatenated"},
                "offsets": {"dtype": "int64", "shape": ["batch"], "doc": "start of each user's slice in history"},
                "user": {"dtype": "int64", "shape": ["batch"], "doc": "user index; user_oov_index for users the model never saw"},
            },
            "output": {"name": "user_embedding", "dtype": "float32", "shape": ["batch", model.spec.output_dim], "l2_normalized": True},
            "score": "user_embedding @ item_embeddings.T (cosine similarity)",
            "user_oov_index": model.spec.user_oov_index,
            "genres": dataset.genre_names,
            "files": {
                "user_tower": USER_TOWER_FILE,
                "item_embeddings": ITEM_EMBEDDINGS_FILE,
                "items": ITEMS_FILE,
                "user_vocab": USER_VOCAB_FILE,
                "item_vocab": ITEM_VOCAB_FILE,
            },
            "popularity": popularity,
            "metrics": dict(metrics),  # a snapshot: callers may keep adding to theirs
            "parity": checks,
            "provenance": {**provenance, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        log.info("artifacts written to %s (parity max abs %.2e)", out_dir, worst)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
