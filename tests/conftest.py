"""Shared fixtures: one real end-to-end training run (synthetic data, real MLflow sqlite
store, real SQLite feature store, real ONNX export) reused by the training and serving tests."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.pg import pg_url, postgres  # noqa: F401 - a throw-away PostgreSQL server for any test (tests/pg.py)

REPO = Path(__file__).resolve().parents[1]


def _private_ray_and_flower_state() -> None:
    """Ray >= 2.60 turns token authentication on for every new local cluster and writes the token
    to ~/.ray/auth_token; Flower writes ~/.flwr. Tests write neither into a user's home: every Ray
    the suite starts in this process (Serve, Tune, Train, Flower's simulation) uses one random token
    in a private 0600 file, and Flower a temporary home. Subprocesses that must find their own way
    (the CLI tests) strip RAY_AUTH_* from their environment."""
    import os
    import secrets
    import tempfile

    if "RAY_AUTH_TOKEN_PATH" not in os.environ and "RAY_AUTH_MODE" not in os.environ:
        folder = Path(tempfile.mkdtemp(prefix="trustrec-tests-"))  # 0700
        token = folder / "ray_auth_token"
        token.touch(mode=0o600)
        token.write_text(secrets.token_hex(32))
        os.environ["RAY_AUTH_MODE"], os.environ["RAY_AUTH_TOKEN_PATH"] = "token", str(token)
    os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="trustrec-flwr-"))


_private_ray_and_flower_state()


def _short_serve_drain() -> None:
    """Behind the HAProxy ingress, Ray Serve keeps a stopping replica reachable for 30 s so load
    balancers in front can deregister it (RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S), which made
    every in-process `launch.stop()` of an HAProxy app wait 30 s. No test here has a load balancer in
    front or measures that window; the lifecycle tests strip this, as a new user's shell would not
    have it, and stop `trustrec serve` at Ray's default."""
    import os

    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")


_short_serve_drain()


def load_script(relpath: str):
    """A repo script (benchmarks/x.py, scripts/y.py) as a module, loaded by path: `import
    benchmarks.x` would find the top-level `benchmarks` package opacus installs instead."""
    import importlib.util
    import sys

    name = "trustrec_" + relpath.removesuffix(".py").replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_overrides(root: Path) -> list[str]:
    """Overrides that point every output of a run into `root`."""
    return [
        f"tracking.tracking_uri=sqlite:///{root}/mlflow.db",
        f"export.output_dir={root}/artifacts",
        f"store.url=sqlite:///{root}/features.db",
        f"trainer.checkpoint_dir={root}/checkpoints",
        "trainer.progress=false",
    ]


@dataclass
class TrainedRun:
    root: Path
    cfg: object  # training.config.TrainConfig
    result: object  # training.pipeline.RunResult

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root}/mlflow.db"

    @property
    def store_url(self) -> str:
        return f"sqlite:///{self.root}/features.db"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    from training.config import load_config
    from training.pipeline import train

    root = tmp_path_factory.mktemp("run")
    cfg = load_config(REPO / "configs" / "two_tower.yaml", tiny_overrides(root) + ["trainer.epochs=30"])
    return TrainedRun(root, cfg, train(cfg))
