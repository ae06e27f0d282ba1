"""Screenshots of the MLflow UI as a user comparing runs sees it.

Trains two small real runs on synthetic data into a temporary sqlite store (a two-tower, seed 0,
registered as @champion; a hybrid, seed 1, registered as @challenger and then promoted to
@champion), starts `mlflow server` on 127.0.0.1 over that store, and has headless Chromium
(Debian's `chromium`) take PNGs of the experiment's runs table, both run pages and the registered
model. What to look for: the run names (model-dataset-privacy-seed), the Dataset column (name,
digest, context), the grouped params, and the `alias` tag that follows the registry (the first run
says `none` once the second one took @champion).

    python scripts/mlflow_screenshots.py --out /tmp/mlflow-shots
    # then open the PNGs; --keep leaves the store and prints the server command to browse it

Chromium runs headless and is driven over its DevTools protocol (the `websockets` client pinned
in requirements/cpu.txt) rather than with `--screenshot`: MLflow 3.17's UI opens its Assistant side
panel on a first visit from 127.0.0.1, which would cover the runs table's right half, so the script
closes it in the page's localStorage first; it also waits until each page shows the texts it must
show (run names, `alias`, the dataset digest) and fails naming the one that never appeared. The runs
table shows the columns worth comparing through an MLflow shared view (an experiment tag of this
throwaway store): Dataset, Models, test/ndcg_at_10, privacy.mode, alias.

Exit 2 when chromium is missing (`apt-get install -y chromium` on Debian).
"""
from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

WIDTH, HEIGHT = 1600, 1000
RENDER_TIMEOUT_S = 60  # the UI is a React app fetching its data after load
SETTLE_S = 2.0  # after the expected texts appeared: icons, fonts, column widths
# MLflow UI localStorage (key_v<version>, JSON values): the Assistant panel stays closed
LOCAL_STORAGE = {"mlflow.assistant.panelOpen_v1": "false", "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true"}
SHARE_KEY = "trustrec-compare"
# as many as 1600 px show next to the fixed Run Name / Created / Duration columns (the grid scrolls the rest)
COLUMNS = ["attributes.`Dataset`", "attributes.`Models`", "metrics.`test/ndcg_at_10`", "params.`privacy.mode`", "tags.`alias`"]
RUNS = (  # (config, seed, alias it registers under)
    ("two_tower.yaml", 0, "champion"),
    ("hybrid.yaml", 1, "challenger"),
)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_runs(root: Path, epochs: int) -> tuple[str, list[str]]:
    """Two real trainings into `root`'s sqlite store; the second is promoted to @champion."""
    from mlflow import MlflowClient

    from training.config import load_config
    from training.pipeline import train
    from training.tracking import default_artifact_location, promote

    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("trustrec", artifact_location=default_artifact_location(uri))
    run_ids = []
    for i, (config, seed, alias) in enumerate(RUNS):
        cfg = load_config(REPO / "configs" / config, [
            "data.synthetic.n_users=300", "data.synthetic.n_items=200", f"trainer.epochs={epochs}", f"trainer.seed={seed}",
            "trainer.progress=false", f"tracking.tracking_uri={uri}", f"tracking.alias={alias}", f"export.output_dir={root}/artifacts{i}",
            f"store.url=sqlite:///{root}/features.db", f"trainer.checkpoint_dir={root}/checkpoints{i}",
        ])  # fmt: skip
        result = train(cfg)
        run_ids.append(result.run_id)
        print(f"trained {config} seed {seed}: run {result.run_id}, {cfg.tracking.registered_model} v{result.model_version} @{alias}", flush=True)
    promote(run_ids[-1], "champion", "trustrec", uri)  # the challenger wins: the first run's alias tag says `none` now
    # a shared view of the runs table (MLflow UI: ?viewStateShareKey=) with the columns to compare
    client.set_experiment_tag(exp_id, f"mlflow.sharedViewState.{SHARE_KEY}", json.dumps({"selectedColumns": COLUMNS}))
    return exp_id, run_ids


def start_server(root: Path, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow) if mlflow.exists() else "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{(root / 'server.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"mlflow server on port {port} did not answer /health within 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)  # its own session: the server and its uvicorn worker, nothing else
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


class Chromium:
    """Headless Chromium over the DevTools protocol: one page, navigate, wait for texts, screenshot."""

    def __init__(self, binary: str, profile: Path):
        profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--remote-debugging-port=0",
             "--remote-allow-origins=*", f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        from websockets.sync.client import connect

        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.ids = itertools.count(1)
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params) -> dict:
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def text(self) -> str:
        return self.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''", returnByValue=True)["result"].get("value", "")

    def open(self, url: str, expect: list[str]) -> None:
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + RENDER_TIMEOUT_S
        while True:
            shown = self.text()
            missing = [t for t in expect if t not in shown]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}: the page never showed {missing}; it shows:\n{shown[:1500]}")
            time.sleep(0.5)
        time.sleep(SETTLE_S)

    def set_local_storage(self, items: dict[str, str], then_open: str, expect: list[str]) -> None:
        """Write the page origin's localStorage, then load `then_open` afresh (the app reads it at start)."""
        self.call("Runtime.evaluate", expression="".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in items.items()))
        self.call("Page.navigate", url="about:blank")
        self.open(then_open, expect)

    def screenshot(self, png: Path) -> None:
        png.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # its own session: this chromium's processes only
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the PNGs (created)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per training run (default 2)")
    p.add_argument("--port", type=int, default=0, help="mlflow server port (default: a free one)")
    p.add_argument("--keep", action="store_true", help="keep the temporary store and print how to browse it")
    args = p.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("chromium not found: apt-get update && apt-get install -y chromium", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="trustrec-mlflow-shots-"))
    proc = None
    try:
        exp_id, run_ids = train_runs(root, args.epochs)
        from mlflow import MlflowClient

        runs = [MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db").get_run(r) for r in run_ids]
        names = [r.info.run_name for r in runs]
        digest = next(d.dataset.digest for d in runs[0].inputs.dataset_inputs if any(t.value == "training" for t in d.tags))
        port = args.port or free_port()
        proc = start_server(root, port)
        base = f"http://127.0.0.1:{port}/#"
        pages = {  # file -> (url, texts the page must show)
            "experiment_runs.png": (f"{base}/experiments/{exp_id}/runs?viewStateShareKey={SHARE_KEY}", [*names, digest, "alias", "test/ndcg_at_10"]),
            **{f"run_{i + 1}.png": (f"{base}/experiments/{exp_id}/runs/{run.info.run_id}", [run.info.run_name, "alias"]) for i, run in enumerate(runs)},
            "registered_model.png": (f"{base}/models/trustrec", ["champion", "challenger"]),
        }
        browser = Chromium(chromium, root / "chromium-profile")
        try:
            browser.open(f"http://127.0.0.1:{port}/", ["trustrec"])  # the origin, to set its localStorage
            browser.set_local_storage(LOCAL_STORAGE, f"http://127.0.0.1:{port}/", ["trustrec"])
            for name, (url, expect) in pages.items():
                browser.open(url, expect)
                browser.screenshot(out / name)
                print(f"{out / name}  <- {url}", flush=True)
        finally:
            browser.close()
        summary = {"experiment_id": exp_id, "run_ids": run_ids, "run_names": names, "pages": {k: v[0] for k, v in pages.items()}}
        (out / "pages.json").write_text(json.dumps(summary, indent=2))
    finally:
        if proc is not None:
            stop_server(proc)
        if args.keep:
            print(f"store kept: mlflow server --backend-store-uri sqlite:///{root}/mlflow.db --host 127.0.0.1")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
