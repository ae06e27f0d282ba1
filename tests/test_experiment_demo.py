"""`trustrec experiment demo` end to end at a small size: two trained models, Ray Serve over HTTP
with three arms, simulated clicks through /v1/events, the report and the off-policy estimate."""
import pytest

from cli.main import main


@pytest.mark.ray
def test_experiment_demo_runs_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRUSTREC_EXPERIMENT_KEY", "demo-test-key-0123456789abcdef")
    code = main(["experiment", "demo", "--dir", str(tmp_path / "demo"), "--users", "40", "--rounds", "1", "--epochs", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert "served 40 lists to 40 simulated users" in out and "experiment demo: control popularity" in out
    for arm in ("popularity", "champion", "challenger"):
        assert f"  {arm}" in out
    assert (tmp_path / "demo" / "report" / "report.html").is_file() and "off-policy" in out
