"""ONNX Runtime session factory on a tiny real model (MatMul by a constant)."""
from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from bundle.runtime import create_session, preferred_providers

W = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=np.float32)  # (3, 2)
CUDA_BUILD = "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.fixture
def model_path(tmp_path):
    """y = x @ W for x of shape (batch, 3), saved as a real .onnx file."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "matmul",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[numpy_helper.from_array(W, name="W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path = tmp_path / "matmul.onnx"
    onnx.save(model, str(path))
    return path


def run(session, x):
    return session.run(["y"], {"x": x})[0]


def test_session_runs_and_reports_provider(model_path):
    session, provider = create_session(model_path)
    x = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=np.float32)
    # row 0 picks W's first row [1, 2]; row 1 sums the rows: [1+3+5, 2+4+6]
    np.testing.assert_allclose(run(session, x), [[1.0, 2.0], [9.0, 12.0]])
    assert provider == session.get_providers()[0]
    if not CUDA_BUILD:
        assert provider == "CPUExecutionProvider"


def test_force_cpu(model_path):
    assert preferred_providers(force_cpu=True) == ["CPUExecutionProvider"]
    session, provider = create_session(model_path, force_cpu=True, intra_op_threads=1)
    assert provider == "CPUExecutionProvider"
    assert session.get_providers() == ["CPUExecutionProvider"]
    np.testing.assert_allclose(run(session, np.ones((1, 3), dtype=np.float32)), [[9.0, 12.0]])


def test_preferred_providers_follow_the_build():
    providers = preferred_providers()
    assert providers[-1] == "CPUExecutionProvider"
    assert set(providers) <= set(onnxruntime.get_available_providers())
    assert "AzureExecutionProvider" not in providers  # only CUDA and CPU are ever requested


def test_missing_model_names_the_path(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        create_session(missing)


@pytest.mark.skipif(CUDA_BUILD, reason="needs a CPU-only onnxruntime build to observe the CUDA fallback")
def test_reports_actual_provider_when_cuda_is_advertised_but_unusable(model_path, monkeypatch, caplog):
    # The only mock: pretend the build offers CUDA. The session itself is real and,
    # on this CPU-only machine, ends up on the CPU; create_session must say so.
    monkeypatch.setattr(
        onnxruntime,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider", "CUDAExecutionProvider"],
    )
    assert preferred_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert preferred_providers(force_cpu=True) == ["CPUExecutionProvider"]

    with caplog.at_level(logging.INFO, logger="bundle.runtime"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ORT's own "not in available provider names" warning
        session, provider = create_session(model_path)
    assert provider == "CPUExecutionProvider"
    assert session.get_providers()[0] == "CPUExecutionProvider"
    np.testing.assert_allclose(run(session, np.eye(3, dtype=np.float32)), W)
    messages = [r.getMessage() for r in caplog.records]
    assert any("CUDAExecutionProvider" in m and "using CPUExecutionProvider" in m for m in messages)
    assert any("fell back" in m for m in messages)


def test_idle_threads_do_not_spin_unless_asked(model_path):
    # spinning ORT threads busy-wait between calls and starve the Serve proxy on small hosts
    session, _ = create_session(model_path, intra_op_threads=1)
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session.get_session_options().intra_op_num_threads == 1
    spinning, _ = create_session(model_path, allow_spinning=True)
    assert spinning.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_cuda_libraries_are_loaded_once_before_a_cuda_session(model_path, monkeypatch):
    # onnxruntime-gpu does not look in the nvidia-* pip packages unless preload_dlls runs (the
    # lent H200 served on CUDA with it); a CPU build never asks for CUDA, so stand one in
    from bundle import runtime

    calls = []
    monkeypatch.setattr(runtime, "preferred_providers", lambda force_cpu=False: [runtime.CPU] if force_cpu else [runtime.CUDA, runtime.CPU])
    monkeypatch.setattr(runtime.ort, "preload_dlls", lambda *a, **k: calls.append(1), raising=False)
    runtime.load_cuda_libraries.cache_clear()
    model = model_path
    runtime.create_session(model, force_cpu=True)
    assert calls == []
    for _ in range(2):
        session, provider = runtime.create_session(model)
        assert provider == runtime.CPU  # no CUDA in this build: it falls back, and says so
    assert calls == [1]
    runtime.load_cuda_libraries.cache_clear()
