"""Export: TorchRec user tower == plain-torch tower == ONNX Runtime; atomic artifact bundle."""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from features.config import SyntheticConfig
from features.content import USER_INPUTS
from features.synthetic import generate
from features.vocab import Vocab
from training import export
from training.data import Context, rated_csr, user_feed, user_features
from training.export import PlainUserTower, export_onnx, parity, write_artifacts
from training.model import GENRES, HISTORY, ITEM_ID, TowerSpec, TwoTower

CPU = torch.device("cpu")
N_USERS, N_ITEMS = 50, 30


def random_history(seed: int = 0):
    """CSR with 0..6 distinct items per user; users 0, 7 and 8 have no history."""
    rng = np.random.default_rng(seed)
    rows = [np.sort(rng.choice(N_ITEMS, size=rng.integers(0, 7), replace=False)) for _ in range(N_USERS)]
    rows[0] = rows[7] = rows[8] = np.zeros(0, np.int64)
    indptr = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
    return indptr, np.concatenate(rows).astype(np.int64)


@pytest.fixture(scope="module")
def ctx() -> Context:
    """Side features for N_USERS users and N_ITEMS items (the ids-only tower reads none of them)."""
    return Context.from_dataset(generate(SyntheticConfig(n_users=N_USERS, n_items=N_ITEMS, n_genres=4, mean_interactions_per_user=8, seed=9)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ctx):
    spec = TowerSpec(n_users=N_USERS, n_items=N_ITEMS, n_genres=4, embedding_dim=8, hidden_dim=16, output_dim=8, use_user_id=True)
    torch.manual_seed(0)
    model = TwoTower(spec).eval()
    with torch.no_grad():  # move the weights off their init so every table contributes visibly
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    history = random_history()
    tower = PlainUserTower(model).eval()
    path = tmp_path_factory.mktemp("onnx") / "user_tower.onnx"
    export_onnx(tower, path, user_feed(spec, ctx, np.arange(1, 17), history))  # example batch of 16 users with history
    return model, tower, path, history, ctx


def three_ways(model, tower, path, users, history, ctx, user_index=None):
    with torch.no_grad():
        ref = model.user_arch(user_features(model.spec, ctx, users, history, CPU, user_index)).numpy()
        feed = user_feed(model.spec, ctx, users, history, user_index)
        plain = tower(*(torch.from_numpy(feed[k]) for k in USER_INPUTS)).numpy()
    onnx = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    return ref, plain, onnx


@pytest.mark.parametrize(
    "users",
    [np.array([3]), np.array([0]), np.array([0, 7, 8]), np.random.default_rng(1).choice(N_USERS, 37, replace=False), np.arange(N_USERS)],
    ids=["batch1", "batch1-empty", "all-empty", "batch37", "everyone"],
)
def test_torchrec_plain_onnx_parity(exported, users):
    model, tower, path, history, ctx = exported
    ref, plain, onnx = three_ways(model, tower, path, users, history, ctx)
    assert ref.shape == plain.shape == onnx.shape == (len(users), model.spec.output_dim)
    assert np.abs(ref - plain).max() <= 1e-5
    assert np.abs(ref - onnx).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(onnx, axis=1), 1.0, atol=1e-5)


def test_parity_covers_the_oov_user_row(exported):
    model, tower, path, history, ctx = exported
    users = np.arange(5, 42)  # 37 users
    oov = np.full(len(users), model.spec.user_oov_index)
    ref, plain, onnx = three_ways(model, tower, path, users, history, ctx, user_index=oov)
    assert np.abs(ref - onnx).max() <= 1e-5 and np.abs(ref - plain).max() <= 1e-5
    known = three_ways(model, tower, path, users, history, ctx)[2]
    assert np.abs(known - onnx).max() > 1e-3  # the user row really feeds the exported tower


def test_onnx_inputs_have_dynamic_axes(exported):
    path = exported[2]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    # every input of the contract, in order, even those this ids-only tower ignores (serving sends them all)
    assert list(inputs) == list(USER_INPUTS) == [
        "history", "history_weights", "history_offsets", "user", "age", "gender", "occupation",
        "liked", "liked_offsets", "avoided", "avoided_offsets",
    ]  # fmt: skip
    assert inputs["history_weights"].type == "tensor(float)"
    assert all(i.type == "tensor(int64)" for name, i in inputs.items() if name != "history_weights")
    assert all(len(i.shape) == 1 and isinstance(i.shape[0], str) for i in inputs.values())  # symbolic, not the example's 16
    per_user = ["history_offsets", "user", "age", "gender", "occupation", "liked_offsets", "avoided_offsets"]
    assert {inputs[k].shape[0] for k in per_user} == {inputs["user"].shape[0]}  # one batch axis
    # bag values have their own length axes (history and its weights share one)
    assert inputs["history"].shape[0] == inputs["history_weights"].shape[0]
    assert len({inputs[k].shape[0] for k in ("user", "history", "liked", "avoided")}) == 4
    assert [o.name for o in session.get_outputs()] == ["user_embedding"]
    assert session.get_outputs()[0].shape[0] == inputs["user"].shape[0]


def test_parity_function_reports_both_differences(exported):
    model, tower, path, history, ctx = exported
    checks = parity(model, ctx, tower, path, np.arange(N_USERS), history)
    assert set(checks) == {"parity/torchrec_vs_plain", "parity/torchrec_vs_onnx"}
    assert all(0.0 <= v <= 1e-5 for v in checks.values())
    # a tower with different weights is caught
    other = PlainUserTower(model)
    with torch.no_grad():
        other.mlp[0].bias.add_(1.0)
    assert parity(model, ctx, other, path, np.arange(N_USERS), history)["parity/torchrec_vs_plain"] > 1e-3


def test_user_feed_layout(ctx):
    spec = TowerSpec(n_users=N_USERS, n_items=10, n_genres=4)
    history = (np.array([0, 2, 2, 5, *[5] * (N_USERS - 3)]), np.array([4, 9, 1, 2, 3]))
    feed = user_feed(spec, ctx, np.array([2, 1, 0]), history)
    assert list(feed) == list(USER_INPUTS)
    assert feed["history"].tolist() == [1, 2, 3, 4, 9]
    assert feed["history_offsets"].tolist() == [0, 3, 3]  # user 1 is empty: its slice is [3, 3)
    np.testing.assert_allclose(feed["history_weights"], [1 / 3, 1 / 3, 1 / 3, 1 / 2, 1 / 2], rtol=1e-6)  # a mean per user
    assert feed["user"].tolist() == [2, 1, 0]
    u = ctx.users
    assert feed["age"].tolist() == u.age[[2, 1, 0]].tolist() and feed["gender"].tolist() == u.gender[[2, 1, 0]].tolist()
    assert feed["occupation"].tolist() == u.occupation[[2, 1, 0]].tolist()
    assert min(feed["age"].min(), feed["gender"].min(), feed["occupation"].min()) >= 1  # the synthetic users have all three
    # the stated genres of users 2, 1, 0 (two liked, one avoided each in the synthetic data)
    liked = [u.liked[1][u.liked[0][x] : u.liked[0][x + 1]].tolist() for x in (2, 1, 0)]
    assert feed["liked"].tolist() == sum(liked, []) and feed["liked_offsets"].tolist() == [0, 2, 4]
    assert feed["avoided_offsets"].tolist() == [0, 1, 2] and len(feed["avoided"]) == 3
    assert feed["history_weights"].dtype == np.float32
    assert all(v.dtype == np.int64 for k, v in feed.items() if k != "history_weights")
    # user_index overrides the id; demographics=False blanks them to 0 (missing); liked/avoided override
    feed = user_feed(spec, ctx, np.array([2, 1]), history, user_index=np.array([N_USERS, 1]), demographics=np.array([False, True]),
                     liked=[np.array([3]), np.zeros(0, np.int64)], avoided=[np.zeros(0, np.int64), np.array([0, 1])])  # fmt: skip
    assert feed["user"].tolist() == [N_USERS, 1]
    assert feed["age"].tolist() == [0, u.age[1]] and feed["gender"].tolist() == [0, u.gender[1]] and feed["occupation"].tolist() == [0, u.occupation[1]]
    assert feed["liked"].tolist() == [3] and feed["liked_offsets"].tolist() == [0, 1]
    assert feed["avoided"].tolist() == [0, 1] and feed["avoided_offsets"].tolist() == [0, 0]


def test_user_feed_rating_weights(ctx):
    spec = TowerSpec(n_users=N_USERS, n_items=10, n_genres=4)
    history = (np.array([0, 2, 2, 5, *[5] * (N_USERS - 3)]), np.array([4, 9, 1, 2, 3]), np.array([3, 1, 5, 4, 1], np.float32))
    rated = Context(ctx.users, ctx.items, rating_weighted=True)
    # user 2: ratings [5, 4, 1] -> [0.5, 0.4, 0.1]; user 0: [3, 1] -> [0.75, 0.25]
    np.testing.assert_allclose(user_feed(spec, rated, np.array([2, 1, 0]), history)["history_weights"], [0.5, 0.4, 0.1, 0.75, 0.25], rtol=1e-6)
    np.testing.assert_allclose(user_feed(spec, ctx, np.array([2, 1, 0]), history)["history_weights"], [1 / 3, 1 / 3, 1 / 3, 0.5, 0.5], rtol=1e-6)


# -- artifact bundle ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle_inputs():
    ds = generate(SyntheticConfig(n_users=40, n_items=30, n_genres=4, mean_interactions_per_user=8, seed=4))
    spec = TowerSpec(n_users=ds.n_users, n_items=ds.n_items, n_genres=4, embedding_dim=8, hidden_dim=16, output_dim=8, use_user_id=False)
    torch.manual_seed(1)
    model = TwoTower(spec).eval()
    history = rated_csr(ds.interactions, ds.n_users)
    item_vec = np.random.default_rng(0).normal(size=(ds.n_items, 8)).astype(np.float32)
    return model, Context.from_dataset(ds), item_vec, ds, history


def write(bundle_inputs, out_dir, **kw):
    model, ctx, item_vec, ds, history = bundle_inputs
    return write_artifacts(model, ctx, item_vec, ds, history, out_dir, {"test/ndcg@10": 0.5}, {"run_id": "r1"}, ["i3", "i1"], **kw)


def leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}-")]


def test_write_artifacts_bundle_and_manifest(bundle_inputs, tmp_path):
    model, ctx, item_vec, ds, history = bundle_inputs
    out = tmp_path / "models" / "bundle"  # parent does not exist yet
    manifest = write(bundle_inputs, out)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["schema_version"] == export.SCHEMA_VERSION == 1
    assert on_disk["files"] == manifest["files"]
    for name in on_disk["files"].values():
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.iterdir()) == sorted([*on_disk["files"].values(), "manifest.json"])
    assert leftovers(out.parent, "bundle") == []
    assert len(Vocab.load(out / on_disk["files"]["user_vocab"])) == ds.n_users == 40
    assert len(Vocab.load(out / on_disk["files"]["item_vocab"])) == ds.n_items == 30
    np.testing.assert_array_equal(np.load(out / on_disk["files"]["item_embeddings"]), item_vec)
    items = json.loads((out / on_disk["files"]["items"]).read_text())
    assert len(items) == 30 and items[0]["item_id"] == "i1" and items[0]["title"] == ds.items.title[0]
    assert on_disk["popularity"] == ["i3", "i1"]
    assert on_disk["model"]["spec"] == asdict(model.spec)
    assert on_disk["user_oov_index"] == 40
    assert on_disk["output"]["shape"] == ["batch", 8]
    assert on_disk["metrics"] == {"test/ndcg@10": 0.5}
    assert on_disk["provenance"]["run_id"] == "r1" and "exported_at" in on_disk["provenance"]
    assert set(on_disk["parity"]) == {"parity/torchrec_vs_plain", "parity/torchrec_vs_onnx"}
    assert max(on_disk["parity"].values()) <= 1e-5
    assert on_disk["inputs"] == list(USER_INPUTS)
    assert on_disk["features"]["user"] == [HISTORY] and on_disk["features"]["item"] == [ITEM_ID, GENRES]
    assert on_disk["features"]["rating_weighted"] is False
    assert on_disk["features"]["gender_vocab"] == ctx.users.gender_vocab == ["F", "M"]
    assert on_disk["features"]["occupation_vocab"] == ctx.users.occupation_vocab == sorted(set(ds.users.occupation))
    # the exported tower has no user-id (or side-feature) table but still takes every input serving sends
    feed = user_feed(model.spec, ctx, np.array([0]), history)
    out_vec = ort.InferenceSession(str(out / "user_tower.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert out_vec.shape == (1, 8)
    with torch.no_grad():
        ref = model.user_arch(user_features(model.spec, ctx, np.array([0]), history, CPU)).numpy()
    assert np.abs(out_vec - ref).max() <= 1e-5


def test_returned_manifest_is_what_was_written(bundle_inputs, tmp_path):
    model, ctx, item_vec, ds, history = bundle_inputs
    metrics = {"test/ndcg@10": 0.5}
    manifest = write_artifacts(model, ctx, item_vec, ds, history, tmp_path / "b", metrics, {}, [])
    metrics["later"] = 1.0  # the caller keeps using its dict (the pipeline adds the parity numbers)
    assert manifest == json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["metrics"] == {"test/ndcg@10": 0.5}


def test_write_artifacts_is_atomic_on_parity_failure(bundle_inputs, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    real_parity = export.parity

    def broken_parity(*args, **kwargs):
        checks = real_parity(*args, **kwargs)
        return {**checks, "parity/torchrec_vs_onnx": 0.5}  # as if ONNX disagreed

    # 1) no previous bundle: nothing is created, no temp dir survives
    monkeypatch.setattr(export, "parity", broken_parity)
    with pytest.raises(RuntimeError, match="parity check failed"):
        write(bundle_inputs, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []

    # 2) a previous bundle survives a failed export byte for byte
    monkeypatch.setattr(export, "parity", real_parity)
    write(bundle_inputs, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(export, "parity", broken_parity)
    with pytest.raises(RuntimeError, match="parity check failed"):
        write(bundle_inputs, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_write_artifacts_tolerance_is_enforced(bundle_inputs, tmp_path, monkeypatch):
    # real parity numbers, impossible tolerance: any nonzero ONNX difference fails
    monkeypatch.setattr(export, "parity", lambda *a, **k: {"parity/torchrec_vs_plain": 0.0, "parity/torchrec_vs_onnx": 3e-7})
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "old.txt").write_text("previous")
    with pytest.raises(RuntimeError, match="3e-07 > 1e-07"):
        write(bundle_inputs, tmp_path / "bundle", parity_atol=1e-7)
    assert [p.name for p in (tmp_path / "bundle").iterdir()] == ["old.txt"]
    assert leftovers(tmp_path, "bundle") == []
    # within tolerance: the old contents are replaced as a whole
    write(bundle_inputs, tmp_path / "bundle", parity_atol=1e-6)
    assert not (tmp_path / "bundle" / "old.txt").exists() and (tmp_path / "bundle" / "manifest.json").exists()
    assert leftovers(tmp_path, "bundle") == []


@pytest.mark.parametrize("layers", [0, 2])
def test_parity_with_linear_and_deeper_towers(tmp_path, ctx, layers):
    """model.hidden_layers changes only the layers inside `mlp`: the export keeps parity (0 = one Linear)."""
    spec = TowerSpec(n_users=N_USERS, n_items=N_ITEMS, n_genres=4, embedding_dim=8, hidden_dim=16, output_dim=8, hidden_layers=layers)
    torch.manual_seed(1)
    model = TwoTower(spec).eval()
    assert sum(isinstance(m, torch.nn.Linear) for m in model.user_arch.mlp) == layers + 1
    history = random_history(3)
    tower = PlainUserTower(model).eval()
    path = tmp_path / "user_tower.onnx"
    export_onnx(tower, path, user_feed(spec, ctx, np.arange(1, 17), history))
    ref, plain, onnx = three_ways(model, tower, path, np.arange(N_USERS), history, ctx)
    assert np.abs(ref - plain).max() <= 1e-5 and np.abs(ref - onnx).max() <= 1e-5


def test_segment_bag_by_hand_and_against_embedding_bag(tmp_path):
    from training.export import SegmentBag

    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    ids, offsets = torch.tensor([0, 2, 1, 1]), torch.tensor([0, 0, 2, 4])  # bags: [], [0, 2], [1, 1], []
    w = torch.tensor([0.5, 1.0, 2.0, 1.0])
    # sum, weighted: bag 1 = 0.5*[1,0] + 1*[3,3] = [3.5, 3]; bag 2 = 2*[0,2] + 1*[0,2] = [0, 6]
    torch.testing.assert_close(SegmentBag(weight, "sum")(ids, offsets, w), torch.tensor([[0.0, 0.0], [3.5, 3.0], [0.0, 6.0], [0.0, 0.0]]))
    # mean: bag 1 = ([1,0] + [3,3]) / 2 = [2, 1.5]; bag 2 = [0, 2]; empty bags stay 0
    torch.testing.assert_close(SegmentBag(weight, "mean")(ids, offsets), torch.tensor([[0.0, 0.0], [2.0, 1.5], [0.0, 2.0], [0.0, 0.0]]))

    g = torch.Generator().manual_seed(0)
    table = torch.randn(40, 6, generator=g)
    lengths = torch.tensor([0, 5, 1, 0, 0, 7, 3, 0])
    ids = torch.randint(0, 40, (int(lengths.sum()),), generator=g)
    w = torch.rand(len(ids), generator=g)
    offsets = torch.cumsum(lengths, 0) - lengths
    for mode, weights in (("sum", w), ("sum", None), ("mean", None)):
        expected = torch.nn.EmbeddingBag.from_pretrained(table, mode=mode)(ids, offsets, per_sample_weights=weights)
        torch.testing.assert_close(SegmentBag(table, mode)(ids, offsets, weights), expected)
    with pytest.raises(ValueError, match="mode"):
        SegmentBag(table, "max")


def test_exported_tower_has_no_loop(exported):
    # ORT's CUDA provider runs a Loop with host copies per bag: 50x slower than the CPU (lent H200)
    ops = {node.op_type for node in onnx.load(str(exported[2])).graph.node}
    assert "Loop" not in ops and "CumSum" in ops and not ops & {"ScatterND", "ScatterElements"}


def test_exported_bag_is_deterministic_on_many_threads(tmp_path):
    # a scatter-add bag raced in ORT's multi-threaded CPU ScatterND: runs of one input differed
    from training.export import SegmentBag

    class Bag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = SegmentBag(torch.randn(500, 32, generator=torch.Generator().manual_seed(0)), "sum")

        def forward(self, ids, weights, offsets):
            return self.bag(ids, offsets, weights)

    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 120, 512)
    ids = rng.integers(0, 500, int(lengths.sum())).astype(np.int64)
    feed = {"ids": ids, "weights": rng.random(len(ids)).astype(np.float32), "offsets": (np.cumsum(lengths) - lengths).astype(np.int64)}
    n, bags = torch.export.Dim("n", min=0), torch.export.Dim("bags", min=1)
    path = tmp_path / "bag.onnx"
    torch.onnx.export(Bag(), tuple(torch.from_numpy(v) for v in feed.values()), str(path), dynamo=True, input_names=list(feed),
                      dynamic_shapes={"ids": {0: n}, "weights": {0: n}, "offsets": {0: bags}}, verbose=False)  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = 4
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    first = session.run(None, feed)[0]
    expected = torch.nn.EmbeddingBag.from_pretrained(Bag().bag.weight, mode="sum")(
        torch.from_numpy(feed["ids"]), torch.from_numpy(feed["offsets"]), per_sample_weights=torch.from_numpy(feed["weights"])
    )
    np.testing.assert_allclose(first, expected.numpy(), atol=1e-4)
    for _ in range(10):
        np.testing.assert_array_equal(session.run(None, feed)[0], first)
