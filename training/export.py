"""Export: plain-torch towers rebuilt from the trained TorchRec weights -> ONNX + artifacts.

TorchRec's KJT modules do not export, so the user tower is rebuilt from plain modules
(`SegmentBag`: an EmbeddingBag without an ONNX Loop, and `nn.Embedding`), fed the very weights the
EmbeddingBagCollection trained, and checked for parity (TorchRec == plain == ONNX Runtime).
The item side is precomputed once into a normalized matrix. The artifact directory
(ONNX + item matrix + vocabularies + manifest JSON) is the only contract with serving; its
schema, file names and atomic publication are `bundle/`'s (bundle.manifest, bundle.write).
"""
from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bundle.manifest import (
    FILES,
    ITEM_EMBEDDINGS_FILE,
    ITEM_VOCAB_FILE,
    ITEMS_FILE,
    SCHEMA_VERSION,
    USER_TOWER_FILE,
    USER_VOCAB_FILE,
    write_manifest,
)
from bundle.write import staging
from features.content import USER_INPUTS, user_inputs
from features.schema import Dataset
from training.blend import SD_FLOOR, EaseBlend
from training.data import CSR, Context, kjt_from_feed, user_feed
from training.model import AGE, AVOIDED, GENDER, HISTORY, LIKED, OCCUPATION, USER_ID, TwoTower

log = logging.getLogger(__name__)



class SegmentBag(nn.Module):
    """`nn.EmbeddingBag` (mode sum or mean, 1-D ids + offsets, optional per-sample weights) as
    differences of a running sum: bag b = prefix[end_b] - prefix[start_b] over the gathered rows.
    Same numbers (the running sum is float64), and an ONNX graph of gathers and one CumSum, with
    no `Loop` and no scatter. The dynamo exporter lowers EmbeddingBag to a `Loop` per table, which
    ONNX Runtime's CUDA provider runs with host copies in the loop body (lent H200: 536 ms for 256
    users vs 10 ms on the CPU provider). A scatter-add bag is fast but races in ORT's multi-threaded
    CPU ScatterND (runs of one input differed by 0.016 on 4 threads); a bags x ids membership
    matmul is exact but as slow as the loop."""

    def __init__(self, weight: torch.Tensor, mode: str):
        super().__init__()
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode: sum or mean, not {mode!r}")
        self.register_buffer("weight", weight)
        self.mode = mode

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.weight[ids].double()
        if per_sample_weights is not None:
            rows = rows * per_sample_weights.double().unsqueeze(1)
        prefix = torch.cat([rows.new_zeros(1, rows.shape[1]), torch.cumsum(rows, 0)])  # (ids + 1, dim)
        ends = torch.cat([offsets[1:], torch.ones_like(offsets[:1]) * ids.shape[0]])
        out = prefix[ends] - prefix[offsets]
        if self.mode == "mean":  # an empty bag stays 0, as in nn.EmbeddingBag
            out = out / (ends - offsets).clamp(min=1).unsqueeze(1).double()
        return out.to(self.weight.dtype)


class EaseBlendArch(nn.Module):
    """The user half of the blend in torch (exported to ONNX with the user tower): the tower's vector
    and the binary history bag z = x[head] P (tail items map to a zero row), each scaled by its
    weight / its per-user score std. The scales are computed in float64: they are sums over up to
    k + d products, and float32 rounding there made ONNX Runtime and torch differ by ~1e-5."""

    def __init__(self, blend: EaseBlend):
        super().__init__()
        table = np.concatenate([blend.user_factors, np.zeros((1, blend.rank), np.float32)])  # row H: the tail's zero
        self.bag = SegmentBag(torch.from_numpy(table).float(), "sum")
        self.register_buffer("rows", torch.from_numpy(blend.head_rows()))
        self.register_buffer("tower_cov", torch.from_numpy(np.asarray(blend.tower_cov, np.float64)))
        self.register_buffer("ease_cov", torch.from_numpy(np.asarray(blend.ease_cov, np.float64)))
        self.weight = float(blend.weight)

    @staticmethod
    def _scaled(v: torch.Tensor, cov: torch.Tensor, weight: float) -> torch.Tensor:
        v = v.double()
        sd = ((v @ cov) * v).sum(1, keepdim=True).clamp(min=0).sqrt()
        return (weight * v / torch.where(sd > SD_FLOOR, sd, torch.full_like(sd, float("inf")))).float()

    def forward(self, tower: torch.Tensor, history: torch.Tensor, history_offsets: torch.Tensor) -> torch.Tensor:
        z = self.bag(self.rows[history], history_offsets)  # binary: every history item once, whatever its rating
        return torch.cat([self._scaled(tower, self.tower_cov, self.weight), self._scaled(z, self.ease_cov, 1 - self.weight)], dim=1)


class GramEaseTower(nn.Module):
    """DP-EASE's user tower (privacy.mechanism gram, training/privacy/gram.py) with the inputs of
    `features.content.USER_INPUTS`: z = x P, the binary history bag over EASE's user factors P
    (every history item once, whatever its rating); the other inputs are read by no node."""

    def __init__(self, user_factors: np.ndarray):
        super().__init__()
        self.bag = SegmentBag(torch.from_numpy(np.asarray(user_factors, np.float32)), "sum")

    def forward(self, history, history_weights, history_offsets, user, age, gender, occupation, liked, liked_offsets, avoided, avoided_offsets):
        return self.bag(history, history_offsets)


class PlainUserTower(nn.Module):
    """Same math as `UserArch`, with ONNX-exportable modules (bags: `SegmentBag`); inputs follow
    `features.content.USER_INPUTS` (every input always present; unused ones are ignored)."""

    def __init__(self, model: TwoTower, blend: EaseBlend | None = None):
        super().__init__()
        spec, arch = model.spec, model.user_arch
        weights = {name.removeprefix("t_"): bag.weight.detach().float().cpu() for name, bag in arch.ebc.embedding_bags.items()}
        self.features = list(spec.user_features())
        self.history = SegmentBag(weights["history"], "sum")
        self.single = nn.ModuleDict({f: nn.Embedding.from_pretrained(weights[f], freeze=True) for f in (USER_ID, AGE, GENDER, OCCUPATION) if f in weights})
        self.bags = nn.ModuleDict({f: SegmentBag(weights[f], "mean") for f in (LIKED, AVOIDED) if f in weights})
        self.mlp = copy.deepcopy(arch.mlp).float().cpu()
        self.item_bias = spec.item_bias
        self.blend = EaseBlendArch(blend) if blend is not None else None  # blend.ease: EASE's half of the vector

    def forward(self, history, history_weights, history_offsets, user, age, gender, occupation, liked, liked_offsets, avoided, avoided_offsets):
        ids = {USER_ID: user, AGE: age, GENDER: gender, OCCUPATION: occupation}
        bags = {LIKED: (liked, liked_offsets), AVOIDED: (avoided, avoided_offsets)}
        parts = []
        for f in self.features:
            if f == HISTORY:
                parts.append(self.history(history, history_offsets, per_sample_weights=history_weights))
            elif f in ids:
                parts.append(self.single[f](ids[f]))
            else:
                parts.append(self.bags[f](*bags[f]))
        vectors = F.normalize(self.mlp(torch.cat(parts, dim=1)), dim=-1)
        if self.item_bias:  # the constant coordinate that meets each item's bias (model.item_bias)
            vectors = torch.cat([vectors, torch.ones_like(vectors[:, :1])], dim=1)
        if self.blend is not None:
            vectors = self.blend(vectors, history, history_offsets)
        return vectors


def cold_user_ranking(model: TwoTower, item_embeddings: np.ndarray, n: int) -> np.ndarray:
    """Item indices in the order the model ranks them for a user it knows nothing about (empty
    history, no user row, no demographics, no stated genres): the fallback list for private
    models. Counting the training interactions would release raw data outside the DP accountant
    (and outside the clients, for federated runs); this is post-processing of the model only."""
    spec = model.spec
    empty = [np.zeros(0, np.int64)]
    zero = np.zeros(1, np.int64)
    feed = user_inputs(empty, None, np.array([spec.user_oov_index]), zero, zero, zero, empty, empty)
    with torch.no_grad():
        vector = PlainUserTower(model).eval()(*(torch.from_numpy(feed[k]) for k in USER_INPUTS)).numpy()
    scores = (np.asarray(item_embeddings, np.float32) @ vector[0]).astype(np.float64)
    return np.argsort(-scores, kind="stable")[:n]


def export_onnx(tower: PlainUserTower, path: Path, example: dict[str, np.ndarray]) -> None:
    """Dynamo export with dynamic batch and bag-length axes."""
    # the exporter narrates every pass at WARNING; keep the console for what matters
    for name in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    batch = torch.export.Dim("batch", min=1)
    flat = {"history": 0, "history_weights": 0, "liked": 1, "avoided": 2}  # bag values: own lengths
    lengths = [torch.export.Dim(f"n_{name}", min=0) for name in ("history", "liked", "avoided")]
    dynamic = {k: {0: lengths[flat[k]] if k in flat else batch} for k in USER_INPUTS}
    args = tuple(torch.from_numpy(example[k]) for k in USER_INPUTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            tower.eval(),
            args,
            str(path),
            dynamo=True,
            input_names=list(USER_INPUTS),
            output_names=["user_embedding"],
            dynamic_shapes=dynamic,
            external_data=False,
            verbose=False,
        )


@torch.no_grad()
def parity(model: TwoTower, ctx: Context, tower: PlainUserTower, onnx_path: Path, users: np.ndarray, history: CSR) -> dict[str, float]:
    """Max |difference| of user embeddings: TorchRec vs plain torch vs ONNX Runtime (CPU)."""
    import onnxruntime as ort

    model.eval()
    device = next(model.parameters()).device
    feed = user_feed(model.spec, ctx, users, history)
    torchrec_out = model.user_arch(kjt_from_feed(model.spec, feed, device)).float().cpu()
    if tower.blend is not None:  # the same EASE half on top of the TorchRec tower's vectors
        torchrec_out = tower.blend(torchrec_out, torch.from_numpy(feed["history"]), torch.from_numpy(feed["history_offsets"]))
    torchrec_out = torchrec_out.numpy()
    plain_out = tower(*(torch.from_numpy(feed[k]) for k in USER_INPUTS)).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, feed)[0]
    return {
        "parity/torchrec_vs_plain": float(np.abs(torchrec_out - plain_out).max()),
        "parity/torchrec_vs_onnx": float(np.abs(torchrec_out - onnx_out).max()),
    }


def write_artifacts(
    model: TwoTower,
    ctx: Context,
    item_embeddings: np.ndarray,
    dataset: Dataset,
    history: CSR,
    out_dir: str | Path,
    metrics: dict[str, float],
    provenance: dict[str, Any],
    popularity: list[str],
    parity_atol: float = 1e-5,
    blend: EaseBlend | None = None,
) -> dict[str, Any]:
    """Write the artifact directory atomically and return the manifest: every file goes into a
    temporary sibling of `out_dir`, which replaces `out_dir` by a rename only once the ONNX parity
    check passed and the manifest is written (bundle.write.staging), so a reader never sees a
    half-written bundle and a failed export leaves the old one in place.
    With `blend` (blend.ease) the user tower and the item vectors carry EASE's half as well."""
    out_dir = Path(out_dir)
    with staging(out_dir) as tmp:
        tower = PlainUserTower(model, blend).eval()
        if blend is not None:
            item_embeddings = blend.item_vectors(item_embeddings)
        sample = np.arange(min(model.spec.n_users, 64))
        export_onnx(tower, tmp / USER_TOWER_FILE, user_feed(model.spec, ctx, sample, history))
        checks = parity(model, ctx, tower, tmp / USER_TOWER_FILE, sample, history)
        worst = max(checks.values())
        if worst > parity_atol:
            raise RuntimeError(f"ONNX parity check failed: max abs diff {worst:.3g} > {parity_atol:g} ({checks})")
        np.save(tmp / ITEM_EMBEDDINGS_FILE, item_embeddings.astype(np.float32))
        write_catalog(tmp, dataset)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "model": {"kind": "hybrid" if len(model.spec.user_features()) > 1 or model.spec.use_content else "two_tower", "spec": asdict(model.spec)},
            "inputs": list(USER_INPUTS),
            "features": {
                "user": model.spec.user_features(),
                "item": model.spec.item_features(),
                "rating_weighted": ctx.rating_weighted,
                "gender_vocab": ctx.users.gender_vocab,
                "occupation_vocab": ctx.users.occupation_vocab,
                "doc": "features.content.user_inputs builds the feed; categorical index 0 = missing",
            },
            "output": {
                "name": "user_embedding", "dtype": "float32", "shape": ["batch", item_embeddings.shape[1]],
                "l2_normalized": not model.spec.item_bias and blend is None, "item_bias": model.spec.item_bias,
                # the leading coordinates that say how alike two items are (MMR, explanations): the
                # towers' unit vectors, without an item bias or the EASE half
                "similarity_dims": model.spec.output_dim,
            },  # fmt: skip
            "score": "user_embedding @ item_embeddings.T ("
            + ("two-tower and EASE blend, each scaled per user: training/blend.py" if blend is not None
               else "cosine similarity" + (" + item bias: the last coordinate is 1 for users, the bias for items" if model.spec.item_bias else ""))
            + ")",
            "blend": blend.describe() if blend is not None else None,
            "user_oov_index": model.spec.user_oov_index,
            "genres": dataset.genre_names,
            "files": dict(FILES),
            "popularity": popularity,
            "metrics": dict(metrics),  # a snapshot: callers may keep adding to theirs
            "parity": checks,
            "provenance": {**provenance, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        }
        write_manifest(tmp, manifest)
    log.info("artifacts written to %s (parity max abs %.2e)", out_dir, worst)
    return manifest


def write_catalog(tmp: Path, dataset: Dataset) -> None:
    """What every bundle holds of the data besides its model: both vocabularies and the items' titles and genres."""
    dataset.user_vocab.save(tmp / USER_VOCAB_FILE)
    dataset.item_vocab.save(tmp / ITEM_VOCAB_FILE)
    items = [
        {"item_id": raw, "title": dataset.items.title[i], "genres": [dataset.genre_names[g] for g in dataset.items.genres[i]]}
        for i, raw in enumerate(dataset.item_vocab.ids)
    ]
    (tmp / ITEMS_FILE).write_text(json.dumps(items))


def write_ease_artifacts(model: Any, dataset: Dataset, history: CSR, out_dir: str | Path, metrics: dict[str, float],
                         provenance: dict[str, Any], popularity: list[str], parity_atol: float = 1e-5) -> dict[str, Any]:
    """The bundle of a DP-EASE model (training.privacy.gram.GramEase), written atomically like
    `write_artifacts`: user_tower.onnx (`GramEaseTower` over the history), the item factors as item
    vectors, vocabularies, items and the manifest; parity: numpy x P (float64) vs torch vs ONNX Runtime."""
    import onnxruntime as ort

    out_dir = Path(out_dir)
    with staging(out_dir) as tmp:
        tower = GramEaseTower(model.user_factors).eval()
        sample = np.arange(min(dataset.n_users, 64))
        indptr, indices = np.asarray(history[0]), np.asarray(history[1])
        histories = [np.unique(indices[indptr[u] : indptr[u + 1]]).astype(np.int64) for u in sample]  # binary: each item once
        zero = np.zeros(len(sample), np.int64)
        empty = [np.zeros(0, np.int64)] * len(sample)
        feed = user_inputs(histories, None, sample, zero, zero, zero, empty, empty)
        export_onnx(tower, tmp / USER_TOWER_FILE, feed)
        x = np.zeros((len(sample), dataset.n_items))
        for row, h in enumerate(histories):
            x[row, h] = 1.0
        reference = model.user_vectors(x)
        with torch.no_grad():
            plain = tower(*(torch.from_numpy(feed[k]) for k in USER_INPUTS)).numpy()
        onnx_out = ort.InferenceSession(str(tmp / USER_TOWER_FILE), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        checks = {"parity/numpy_vs_plain": float(np.abs(reference - plain).max()), "parity/numpy_vs_onnx": float(np.abs(reference - onnx_out).max())}
        worst = max(checks.values())
        if worst > parity_atol:
            raise RuntimeError(f"ONNX parity check failed: max abs diff {worst:.3g} > {parity_atol:g} ({checks})")
        item_embeddings = model.item_vectors()
        np.save(tmp / ITEM_EMBEDDINGS_FILE, item_embeddings)
        write_catalog(tmp, dataset)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "model": {"kind": model.kind, "spec": {"n_users": dataset.n_users, "n_items": dataset.n_items, **model.describe()}},
            "inputs": list(USER_INPUTS),
            "features": {
                "user": [HISTORY],
                "item": [],
                "rating_weighted": False,
                "gender_vocab": [],
                "occupation_vocab": [],
                "doc": "features.content.user_inputs builds the feed; only the history bag is read (binary)",
            },
            "output": {
                "name": "user_embedding", "dtype": "float32", "shape": ["batch", item_embeddings.shape[1]],
                "l2_normalized": False, "item_bias": False, "similarity_dims": item_embeddings.shape[1],
            },  # fmt: skip
            "score": f"user_embedding @ item_embeddings.T (EASE on {model.statistic}: x_u B; training/privacy/gram.py)",
            "blend": None,
            "ease": model.describe(),
            "user_oov_index": dataset.n_users,
            "genres": dataset.genre_names,
            "files": dict(FILES),
            "popularity": popularity,
            "metrics": dict(metrics),
            "parity": checks,
            "provenance": {**provenance, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        }
        write_manifest(tmp, manifest)
    log.info("EASE artifacts (%s) written to %s (parity max abs %.2e)", model.kind, out_dir, worst)
    return manifest
