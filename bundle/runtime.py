"""ONNX Runtime sessions that report the execution provider really in use.

ORT falls back to the CPU without an error when the CUDA provider is listed
but its libraries are missing, so a session silently runs on the wrong device.
`create_session` therefore reads the provider back from the session and
returns it, and logs requested vs actual. Serving and training's offline
evaluation open bundles through it (bundle.load); no torch here.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import onnxruntime as ort

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_PREFERENCE = (CUDA, CPU)  # best first


def preferred_providers(force_cpu: bool = False) -> list[str]:
    """Providers to ask ORT for, best first: CUDA then CPU, limited to those this build offers.

    ``force_cpu`` gives only the CPU provider (reproducible numbers, tests,
    or a GPU kept free for training).
    """
    if force_cpu:
        return [CPU]
    available = set(ort.get_available_providers())
    return [p for p in _PREFERENCE if p in available]


@functools.cache
def load_cuda_libraries() -> None:
    """Load CUDA / cuDNN from the nvidia-* pip packages (what `onnxruntime-gpu[cuda,cudnn]` and a
    CUDA torch install) before the first CUDA session. ORT does not search them by itself: without
    this its CUDA provider fails to load unless torch was imported first, and the session falls back
    to the CPU. Once per process; a build without `preload_dlls` (ORT < 1.21) is left as it is."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as e:  # noqa: BLE001 - a failed preload is reported by the fallback check below
        logger.warning("onnxruntime.preload_dlls failed: %s", e)


def create_session(
    model_path: str | Path, force_cpu: bool = False, intra_op_threads: int | None = None, allow_spinning: bool = False
) -> tuple[ort.InferenceSession, str]:
    """Open `model_path` and return (session, provider actually in use).

    The provider comes from ``session.get_providers()[0]``, not from what was
    requested. ``intra_op_threads`` caps ORT's thread pool (None: ORT default),
    useful when several replicas share one host. ``allow_spinning`` is off by default: ORT's
    idle threads otherwise busy-wait for the next call and take the cores the Serve proxy and the
    other replicas need (measured: serving collapsed below 100 requests/s on 2 cores).
    """
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    options = ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    requested = preferred_providers(force_cpu)
    if CUDA in requested:
        load_cuda_libraries()
    session = ort.InferenceSession(str(path), sess_options=options, providers=requested)
    actual = session.get_providers()[0]
    logger.info("ONNX Runtime session for %s: requested providers %s, using %s", path, requested, actual)
    if requested and actual != requested[0]:
        logger.warning("ONNX Runtime fell back from %s to %s for %s", requested[0], actual, path)
    return session, actual
