"""Finding a bundle (a directory, an MLflow pyfunc layout, a models:/ URI) and opening it for scoring,
on a hand-made bundle: a real ONNX file whose "user tower" is y = x @ W, and a 3-item matrix."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bundle.load import open_bundle
from bundle.locate import find_bundle, parse_model_uri, registered_model_name, resolve_model_uri
from bundle.manifest import FILES, SCHEMA_VERSION, ManifestError, write_manifest

W = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)  # (3 inputs, 2 dims)
ITEMS = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)  # 3 items in 2-D


def make_bundle(d, schema_version=SCHEMA_VERSION):
    d.mkdir(parents=True)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["user_embedding"])],
        "tower",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        outputs=[helper.make_tensor_value_info("user_embedding", TensorProto.FLOAT, ["batch", 2])],
        initializer=[numpy_helper.from_array(W, name="W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(d / FILES["user_tower"]))
    np.save(d / FILES["item_embeddings"], ITEMS)
    write_manifest(d, {"schema_version": SCHEMA_VERSION, "files": dict(FILES)})
    if schema_version != SCHEMA_VERSION:
        (d / "manifest.json").write_text(f'{{"schema_version": {schema_version}, "files": {{}}}}')
    return d


def test_open_bundle_scores_as_the_manifest_says(tmp_path):
    b = open_bundle(make_bundle(tmp_path / "b"), force_cpu=True)
    assert b.provider == "CPUExecutionProvider" and b.path == tmp_path / "b"
    assert b.file("user_tower") == tmp_path / "b" / "user_tower.onnx"
    np.testing.assert_array_equal(b.item_vectors, ITEMS)
    # x = [1, 0, 1] -> W rows 0 + 2 = [2, 1]; scores against the items: [2, 1, 0.6*2 + 0.8*1 = 2.0]
    user = b.user_vectors({"x": np.array([[1.0, 0.0, 1.0]], np.float32)})
    np.testing.assert_allclose(user, [[2.0, 1.0]])
    np.testing.assert_allclose(user @ b.item_vectors.T, [[2.0, 1.0, 2.0]], rtol=1e-6)


def test_open_bundle_checks_the_schema_before_opening_anything(tmp_path):
    with pytest.raises(ManifestError, match="schema_version 7 is newer"):
        open_bundle(make_bundle(tmp_path / "b", schema_version=7))  # its files map is empty: never reached


def test_find_bundle_in_a_directory_or_a_pyfunc_model(tmp_path):
    plain = make_bundle(tmp_path / "plain")
    assert find_bundle(plain) == plain
    pyfunc = tmp_path / "model"  # what MLflow downloads for models:/trustrec/N
    (pyfunc / "artifacts").mkdir(parents=True)
    (pyfunc / "MLmodel").write_text("")
    make_bundle(pyfunc / "artifacts" / "bundle")
    assert find_bundle(pyfunc) == pyfunc / "artifacts" / "bundle"
    assert find_bundle(tmp_path / "model" / "artifacts") == pyfunc / "artifacts" / "bundle"  # one level down
    with pytest.raises(FileNotFoundError, match="no manifest.json under"):
        find_bundle(tmp_path / "model" / "artifacts" / "bundle" / "nothing-here")


def test_model_uris(tmp_path):
    assert parse_model_uri("models:/trustrec@champion") == ("trustrec", "champion", None)
    assert parse_model_uri("models:/trustrec/7") == ("trustrec", None, "7")
    for bad in ("models:/trustrec", "models:/", "models://7", "runs:/abc/model"):
        with pytest.raises(ValueError, match="models:/"):
            parse_model_uri(bad)
    assert registered_model_name("models:/recs@champion") == "recs"
    assert registered_model_name("models:/recs/3") == "recs"
    assert registered_model_name("artifacts/two_tower") == "trustrec"  # a directory: the default name
    b = make_bundle(tmp_path / "b")
    assert resolve_model_uri(str(b)) == (b, "local")  # no MLflow for a directory
    with pytest.raises(ValueError, match="want models:/name@alias or models:/name/version"):
        resolve_model_uri("models:/trustrec")  # refused before any registry is asked
