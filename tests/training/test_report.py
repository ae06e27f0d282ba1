"""`trustrec report RUN_ID` on the session's real run (`trained_run`): files, HTML content,
MLflow artifacts and metrics, and the MMR curve's end points."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from training.offline import evaluate_bundle
from training.report import PLOTS, build_report, metric_key, parse_lambdas
from training.tracking import mlflow_key

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.fixture(scope="module")
def report(trained_run, tmp_path_factory):
    return build_report(trained_run.result.run_id, trained_run.tracking_uri, out=tmp_path_factory.mktemp("report"), lambdas=LAMBDAS)


@pytest.fixture(scope="module")
def run(trained_run, report):  # fetched after the report logged to it
    return MlflowClient(tracking_uri=trained_run.tracking_uri).get_run(trained_run.result.run_id)


def check_files(out: Path, run_id: str, test_ndcg: float) -> None:
    page = (out / "index.html").read_text(encoding="utf-8")
    for name in PLOTS.values():
        png = (out / name).read_bytes()
        assert png.startswith(PNG_SIGNATURE), name
        assert len(png) > 10_000, name  # a real plot, not an empty canvas
        assert f'src="{name}"' in page, name
    assert run_id in page
    assert f"{test_ndcg:.4f}" in page
    assert "How to read" in page


def test_writes_html_and_plots(trained_run, report, run):
    assert report.html == report.out_dir / "index.html"
    check_files(report.out_dir, trained_run.result.run_id, run.data.metrics["test/ndcg_at_10"])
    page = report.html.read_text(encoding="utf-8")
    assert "two_tower" in page and "synthetic-seed0" in page and "stratified" in page
    assert "ndcg_at_10/age_56plus" in page and "test/ndcg_at_10" in page  # the names MLflow and the CLI show
    numbers = json.loads((report.out_dir / "report.json").read_text())
    assert numbers["beyond"]["coverage"] == pytest.approx(report.beyond["coverage"])


def test_recomputed_metrics_are_the_exported_models(trained_run, report):
    # the same numbers `trustrec evaluate` gives for the bundle, and the training-time ones up to ONNX parity
    offline = evaluate_bundle(trained_run.cfg, str(trained_run.result.artifact_dir))
    for name, value in report.ranking.items():
        assert value == pytest.approx(offline[f"test/{name}"], abs=1e-12), name
        assert value == pytest.approx(trained_run.result.metrics[f"test/{name}"], abs=1e-4), name
    assert report.beyond["coverage"] == pytest.approx(report.ranking["coverage"])
    assert {"novelty", "ild_genre", "ild_embedding", "arp", "exposure_gini", "calibration_kl"} <= set(report.beyond)
    assert {"ndcg_at_10/gender_F", "ndcg_at_10/gender_M", "ndcg_at_10/gender_max_gap", "ndcg_at_10/age_max_gap"} <= set(report.beyond)
    assert report.beyond["ndcg@10/gender=F"] == report.beyond["ndcg_at_10/gender_F"]  # the computing spelling still reads
    deciles = [report.beyond[f"exposure_decile_{d}"] for d in range(10)]
    assert sum(deciles) == pytest.approx(1.0) and report.catalog_deciles.sum() == pytest.approx(1.0)


def test_mmr_curve_end_points(report, run):
    assert sorted(report.mmr) == list(LAMBDAS)
    # MMR with lambda = 1 is the plain ranking by score
    assert abs(report.mmr[1.0]["ndcg@10"] - report.ranking["ndcg@10"]) <= 1e-9
    assert abs(run.data.metrics["mmr/lambda_1/ndcg_at_10"] - report.ranking["ndcg@10"]) <= 1e-9
    assert report.mmr[0.0]["ild_genre"] >= report.mmr[1.0]["ild_genre"]
    assert report.mmr[1.0]["coverage"] == pytest.approx(report.ranking["coverage"])


def test_logged_to_the_run(trained_run, report, run):
    client = MlflowClient(tracking_uri=trained_run.tracking_uri)
    assert run.info.status == "FINISHED"  # logging afterwards does not reopen the run
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {f"report/{name}" for name in ("index.html", "report.json", *PLOTS.values())} <= artifacts
    m = run.data.metrics
    assert m["beyond/coverage"] == pytest.approx(report.beyond["coverage"])
    assert m["beyond/ndcg_at_10/gender_max_gap"] == pytest.approx(report.beyond["ndcg@10/gender_max_gap"])
    for lam in LAMBDAS:
        for name in ("ndcg_at_10", "ild_genre", "coverage"):
            assert f"mmr/lambda_{lam:g}/{name}" in m, (lam, name)
    assert set(report.logged) <= set(m)
    assert m["test/ndcg_at_10"] == pytest.approx(trained_run.result.metrics["test/ndcg@10"])  # untouched


def test_cli_report_subprocess(trained_run, tmp_path):
    run_id = trained_run.result.run_id
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "report", run_id, "--tracking-uri", trained_run.tracking_uri, "--out", str(tmp_path), "--lambdas", "0,1"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert str(tmp_path / "index.html") in out.stdout
    ndcg = MlflowClient(tracking_uri=trained_run.tracking_uri).get_run(run_id).data.metrics[mlflow_key("test/ndcg@10")]
    check_files(tmp_path, run_id, ndcg)


def test_cli_unknown_run_exits_2(trained_run, tmp_path, capsys):
    from cli.main import main

    out = tmp_path / "never"
    assert main(["report", "0123456789abcdef0123456789abcdef", "--tracking-uri", trained_run.tracking_uri, "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    assert not out.exists()


def test_parse_lambdas_and_metric_keys():
    assert parse_lambdas("1, 0,0.5,0.5") == [0.0, 0.5, 1.0]
    for bad in ("", "0,1.5", "-0.1", "a,b"):
        with pytest.raises(ValueError):
            parse_lambdas(bad)
    assert metric_key("ndcg@10/age=<18") == "ndcg_at_10/age_lt18"
    assert metric_key("ndcg@10/age=56+") == "ndcg_at_10/age_56plus"
    assert metric_key("ndcg@10/gender=F") == "ndcg_at_10/gender_F"
