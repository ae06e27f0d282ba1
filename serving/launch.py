"""Start / reload / stop the Ray Serve app on loopback (used by `trustrec serve`, the demo and tests).

The app is deployed *declaratively* from the config file, exactly as `serve run configs/serve.yaml`
does, so a later deploy that only changes the model deployment's `user_config` is applied in
place (`reconfigure` on the running replicas, no restart). `reload` uses that for hot swaps: it
re-resolves the model alias to a version and pushes `user_config.model_uri = models:/name/<version>`.

Ray Serve has no public Python call for a declarative deploy (the `serve` CLI uses the same
private client below); it is pinned with ray==2.60.0 in requirements/cpu.txt.

Ray >= 2.60 turns on token authentication for a new local cluster (RAY_AUTH_MODE unset -> token) and
would write the token to ~/.ray/auth_token. `start` gives each app its own token in a private 0600 file
(RAY_AUTH_TOKEN_PATH) and notes that path in the state file, so `reload` -- another process, which Ray
never auto-enables auth for when it names an address -- can authenticate. A caller's own RAY_AUTH_MODE /
RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH always win.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from bundle.locate import NO_VERSION_HINT, TRAIN_FIRST, missing_registry, no_version
from serving.config import MODEL_DEPLOYMENT, AppArgs, load_serve_config
from serving.ingress import cleanup as cleanup_ingress
from serving.ingress import configure as configure_ingress

log = logging.getLogger(__name__)

APP_NAME = "trustrec"
_started: dict[str, Any] = {}  # what this process started: state file to remove on stop()


def absolute_urls(args: AppArgs) -> AppArgs:
    """Pin relative sqlite paths and model dirs to this process's cwd: replicas run elsewhere."""

    def fix_sqlite(url: str | None) -> str | None:
        prefix = "sqlite:///"
        if url and url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
            return prefix + str(Path(url[len(prefix) :]).resolve())
        return url

    model_uri = args.model_uri if "://" in args.model_uri or args.model_uri.startswith("models:/") else str(Path(args.model_uri).resolve())
    return args.model_copy(update={"tracking_uri": fix_sqlite(args.tracking_uri), "store_url": fix_sqlite(args.store_url), "model_uri": model_uri})


def deploy_config(config_path: str | Path, model_uri: str | None = None, port: int | None = None, host: str | None = None) -> dict:
    """The config file as a Ray Serve deploy config, with overrides applied and paths made absolute."""
    raw = yaml.safe_load(Path(config_path).read_text()) or {}
    http, args, entry = load_serve_config(config_path)
    args = absolute_urls(args.model_copy(update={"model_uri": model_uri}) if model_uri else args)
    app = copy.deepcopy(entry)
    app.setdefault("name", APP_NAME)
    app["args"] = args.model_dump()
    deployments = app.setdefault("deployments", [])
    model = next((d for d in deployments if d.get("name") == MODEL_DEPLOYMENT), None)
    if model is None:
        deployments.append(model := {"name": MODEL_DEPLOYMENT})
    model["user_config"] = {**(model.get("user_config") or {}), "model_uri": args.model_uri}
    apps = [a for a in raw.get("applications") or [] if a.get("name", APP_NAME) != app["name"]] + [app]
    http_options = {**(raw.get("http_options") or {}), "host": host or http.host, "port": port or http.port}
    return {**raw, "http_options": http_options, "applications": apps}


def admission(config: dict) -> dict[str, int | None]:
    """The Model deployment's `max_ongoing_requests` / `max_queued_requests` in a deploy config
    (None where it sets none): what the HAProxy ingress enforces at the edge (serving/ingress.py)."""
    app = next((a for a in config.get("applications") or [] if a.get("name", APP_NAME) == APP_NAME), {})
    model = next((d for d in app.get("deployments") or [] if d.get("name") == MODEL_DEPLOYMENT), {})
    return {k: model.get(k) for k in ("max_ongoing_requests", "max_queued_requests")}


def state_file(port: int) -> Path:
    """Where `trustrec serve` notes its Ray address, so `trustrec serve --reload` finds that cluster
    (and never another one running on the same machine)."""
    return Path(tempfile.gettempdir()) / f"trustrec-serve-{port}.json"


def ray_token_auth(port: int) -> str | None:
    """Before `ray.init` starts a node: token auth with a token only this user can read, outside $HOME.
    Returns the token file to note in the state file (None where the caller chose RAY_AUTH_* itself)."""
    if any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        return os.environ.get("RAY_AUTH_TOKEN_PATH")
    import secrets

    path = Path(tempfile.mkdtemp(prefix=f"trustrec-serve-{port}-")) / "ray_auth_token"  # dir 0700
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"  # inherited by Ray's own processes
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    _started["token_file"] = path
    return str(path)


def local_only_ray() -> None:
    """Make the Ray node this process starts use the loopback address, as Ray does by default on
    macOS / Windows: its metrics agent binds every interface unless the node's address is 127.0.0.1
    (`ray.init(_node_ip_address="127.0.0.1")` is turned back into the host's address). The node is
    this machine alone, so loopback also keeps Ray's other ports off the network. The knob is Ray's
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when ray is imported (so also set on the imported
    constant, where this process imported ray already) and inherited by Ray's own processes."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


class PortInUseError(ValueError):
    """The HTTP port is taken (by another `trustrec serve`, or anything else)."""


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Refuse a port something already listens on, naming the `trustrec serve` that holds it when its
    state file says so. Without this a second server on a port started a whole Ray cluster whose
    ingress could not bind, and overwrote the first server's state file (so `--reload` lost it)."""
    import errno
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port a stopped server left in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            holder = ""
            path = state_file(port)
            try:
                pid = json.loads(path.read_text()).get("pid")
                holder = f" by `trustrec serve` (pid {pid}, {path})" if pid_alive(pid) else ""
            except (OSError, ValueError):
                pass
            raise PortInUseError(f"{flag} {port}: {host}:{port} is already in use{holder}; stop that server, or pick another port "
                                 "(`trustrec serve --reload` hot-swaps the model of a running one)") from None


def start(
    config_path: str | Path,
    model_uri: str | None = None,
    port: int | None = None,
    num_cpus: float | None = None,
    host: str | None = None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    ingress: str = "proxy",
    after_init: Callable[[], Any] | None = None,
) -> str:
    """Start Ray (if needed) and deploy the app; returns the base URL once every replica is up and /healthz answers.
    `metrics_port`: Ray's Prometheus export port (Serve's and trustrec's metrics at /metrics), on
    `metrics_host`: 127.0.0.1, or 0.0.0.0 for every interface. `ingress`: the HTTP data plane,
    `proxy` (Ray Serve's proxy actor) or `haproxy` (serving/ingress.py), set before Ray starts.
    `after_init`: called once the Ray node this call starts is up (`serve_forever` puts its signal
    handlers back there: `ray.init` replaced SIGTERM's)."""
    config = deploy_config(config_path, model_uri, port, host)
    host, port = config["http_options"]["host"], config["http_options"]["port"]
    new_node = "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    token_path = None
    if new_node:
        check_port_free(host, port)  # before Ray starts: a second server on a port must not start a cluster, nor touch the first's state file
    if new_node:  # Ray's settings come from the environment, read when ray is imported or its processes start
        if metrics_host != "0.0.0.0":
            local_only_ray()
        token_path = ray_token_auth(port)
        _started["ingress_dir"] = configure_ingress(ingress, **admission(config))
    import ray
    from ray.serve._private.api import serve_start  # the `serve run` CLI's own call (see module doc)
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)  # a bad deployments section fails here, by name
    if new_node:
        init: dict[str, Any] = dict(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False, namespace="serve")
        if metrics_port:
            init["_metrics_export_port"] = metrics_port
        ray.init(**init)
        if after_init is not None:
            after_init()
    http_options = {**config["http_options"], "location": schema.proxy_location.value if schema.proxy_location else "HeadOnly"}
    client = serve_start(http_options=http_options, global_logging_config=config.get("logging_config"))  # the proxy's logging too
    client.deploy_apps(schema, _blocking=False)
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    wait_running()
    _wait_healthy(url)
    path = state_file(port)
    path.write_text(json.dumps({"address": ray.get_runtime_context().gcs_address, "pid": os.getpid(), "url": url,
                                "auth_token_path": token_path or os.environ.get("RAY_AUTH_TOKEN_PATH")}))
    _started["state_file"] = path
    return url


def wait_running(timeout_s: float = 180.0) -> None:
    """Block until the app is RUNNING (all replicas up); a failed deploy raises with Serve's message."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(APP_NAME)
        status = app.status if app else "NOT_STARTED"
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            raise RuntimeError(f"Ray Serve app {APP_NAME} failed to deploy: {app.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ray Serve app {APP_NAME} is {status} after {timeout_s:.0f}s")
        time.sleep(0.25)


def _wait_healthy(url: str, timeout_s: float = 60.0) -> dict:
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = requests.get(f"{url}/healthz", timeout=5)
            if r.status_code == 200:
                return r.json()
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/healthz not ready after {timeout_s:.0f}s")
        time.sleep(0.25)


def pin_version(model_uri: str, tracking_uri: str | None) -> str:
    """`models:/name@alias` -> `models:/name/<version the alias points at now>`; other URIs unchanged."""
    if not model_uri.startswith("models:/") or "@" not in model_uri:
        return model_uri
    import mlflow

    name, _, alias = model_uri[len("models:/") :].partition("@")
    version = mlflow.MlflowClient(tracking_uri=tracking_uri).get_model_version_by_alias(name, alias).version
    return f"models:/{name}/{version}"


def validate_bundle(model_uri: str, args: AppArgs, starting: bool = False) -> None:
    """Load the model a swap would push, run its ONNX user tower once and query the feature store,
    here, before any replica switches (what each replica's `reconfigure` would do). Raises
    ValueError naming the reason: a missing or broken bundle never reaches the running app.
    `starting`: the same check before a server starts (`preflight`), worded for that."""
    from features.store import FeatureStore
    from serving.recommender import Recommender, probe

    store = FeatureStore(args.store_url, consent=args.consent) if args.store_url else None
    try:
        rec = Recommender.from_uri(model_uri, store, args.tracking_uri, args.force_cpu, args.diversity_lambda, args.index.model_dump())
        probe(rec, store)
    except Exception as e:  # noqa: BLE001 - every failure means "do not push"; the reason goes to the operator
        if starting:
            raise ValueError(f"cannot serve {model_uri}: it does not load ({type(e).__name__}: {e})") from None
        raise ValueError(f"not swapping to {model_uri}: it does not load ({type(e).__name__}: {e}); the running model keeps serving") from None
    finally:
        if store is not None:
            store.close()


def preflight(config_path: str | Path, model_uri: str | None = None, port: int | None = None, host: str | None = None,
              metrics_port: int | None = None, metrics_host: str = "127.0.0.1") -> str:
    """Before `trustrec serve` starts Ray: the port must be free, and the model it would serve must
    resolve and load here.
    Without this, a new user who ran `trustrec serve` before `trustrec train` waited ~80 s for a
    traceback saying "Failed to update the deployments ['Model']" (and got an empty mlflow.db).
    Returns the pinned model URI; raises ValueError naming the reason and the way out."""
    http, args, _ = load_serve_config(config_path)
    check_port_free(host or http.host, port or http.port)
    if metrics_port:
        check_port_free(metrics_host, metrics_port, "--metrics-port")
    args = absolute_urls(args.model_copy(update={"model_uri": model_uri}) if model_uri else args)
    uri = args.model_uri
    if uri.startswith("models:/"):
        if missing := missing_registry(args.tracking_uri):
            raise ValueError(f"cannot serve {uri}: {missing}, from {config_path}; {TRAIN_FIRST}, or pass --model BUNDLE_DIR")
        try:
            uri = pin_version(uri, args.tracking_uri)
        except Exception as e:  # noqa: BLE001 - MLflow's RestException / MlflowException: no such model or alias
            raise ValueError(f"cannot serve {uri}: {no_version(args.tracking_uri, e)}; {NO_VERSION_HINT}, or pass --model BUNDLE_DIR") from None
    elif "://" not in uri and not Path(uri).exists():
        raise ValueError(f"cannot serve {uri}: no such bundle directory")
    validate_bundle(uri, args, starting=True)
    return uri


def pid_alive(pid: Any) -> bool:
    """Whether process `pid` exists (signal 0 checks without sending anything); a pid of another
    user's process counts as alive."""
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def reload(config_path: str | Path, model_uri: str | None = None, port: int | None = None, address: str | None = None) -> tuple[str | None, str]:
    """Hot swap: resolve the configured model URI (alias) again and push it to the running app's model
    deployment as a new `user_config`; replicas load it and swap in place. Returns (old URI, new URI).

    The running app is found through the state file `start` wrote for that port, or `address`
    (a Ray GCS address, e.g. for an app started with `serve run`)."""
    http, args, _ = load_serve_config(config_path)
    port = port or http.port
    args = absolute_urls(args.model_copy(update={"model_uri": model_uri}) if model_uri else args)
    if address is None:
        path = state_file(port)
        if not path.exists():
            raise FileNotFoundError(f"no running `trustrec serve` on port {port} ({path} missing); pass --address RAY_GCS_ADDRESS")
        state = json.loads(path.read_text())
        if not pid_alive(state.get("pid")):  # killed (SIGKILL, a crash, a reboot) before it could remove the file
            path.unlink(missing_ok=True)
            raise FileNotFoundError(f"no running `trustrec serve` on port {port}: the process that wrote {path} (pid {state.get('pid')}) "
                                    "has exited without stopping; the stale file is removed. Start the server again")
        address = state["address"]
        if state.get("auth_token_path") and not any(k in os.environ for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
            os.environ["RAY_AUTH_TOKEN_PATH"] = state["auth_token_path"]
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                                              or (Path.home() / ".ray" / "auth_token").exists()):
        os.environ["RAY_AUTH_MODE"] = "token"  # Ray enables it by itself only for address=None/"auto", never for a named one
    if address.split(":")[0] in ("127.0.0.1", "localhost"):
        local_only_ray()  # a node on loopback (`trustrec serve`) only takes drivers that are on loopback too
    # (all of the above before ray is first imported, which validate_bundle does: Ray reads them then)
    new_uri = pin_version(args.model_uri, args.tracking_uri)
    validate_bundle(new_uri, args)  # before any replica hears of it: a bad URI or bundle changes nothing
    import ray
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    connected_here = not ray.is_initialized()
    if connected_here:
        ray.init(address=address, namespace="serve", log_to_driver=False, configure_logging=False)
    try:
        details = _get_global_client().get_serve_details()
        app = (details.get("applications") or {}).get(APP_NAME)
        if not app or not app.get("deployed_app_config"):
            raise ValueError(f"no declaratively deployed app {APP_NAME!r} on Ray cluster {address}")
        app_config = app["deployed_app_config"]
        model = next((d for d in app_config.setdefault("deployments", []) if d.get("name") == MODEL_DEPLOYMENT), None)
        if model is None:
            app_config["deployments"].append(model := {"name": MODEL_DEPLOYMENT})
        old_uri = (model.get("user_config") or {}).get("model_uri")
        if old_uri == new_uri:
            log.info("model deployment already serves %s; nothing to do", new_uri)
            return old_uri, new_uri
        model["user_config"] = {**(model.get("user_config") or {}), "model_uri": new_uri}
        others = [a["deployed_app_config"] for name, a in details["applications"].items() if name != APP_NAME and a.get("deployed_app_config")]
        http_options = {k: v for k, v in (details.get("http_options") or {}).items() if k in ("host", "port", "root_path", "request_timeout_s", "keep_alive_timeout_s")}
        target = {"proxy_location": details.get("proxy_location") or "HeadOnly", "http_options": http_options, "applications": [app_config, *others]}
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(target), _blocking=False)
        log.info("pushed user_config.model_uri %s -> %s", old_uri, new_uri)
        try:
            _wait_swapped(new_uri)
        except (RuntimeError, TimeoutError) as e:  # replicas refused it after all: put the old target back
            model["user_config"] = {**model["user_config"], "model_uri": old_uri}
            _get_global_client().deploy_apps(ServeDeploySchema.model_validate(target), _blocking=False)
            raise RuntimeError(f"{e}; the deployment's model target was set back to {old_uri}") from None
        return old_uri, new_uri
    finally:
        if connected_here:
            ray.shutdown()


def _wait_swapped(new_uri: str, timeout_s: float = 180.0) -> None:
    """Wait until the model deployment finished reconfiguring every replica (status HEALTHY again)."""
    from ray import serve

    time.sleep(1.0)  # the controller applies the new target on its next control-loop pass (0.1 s period)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        model = app.deployments.get(MODEL_DEPLOYMENT) if app else None
        if app and app.status == "RUNNING" and model and model.status == "HEALTHY":
            return
        if app and app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"swap to {new_uri} failed: {app.message}")
        time.sleep(0.25)
    raise TimeoutError(f"model deployment not healthy {timeout_s:.0f}s after pushing {new_uri}")


def stop() -> None:
    """Shut Serve and Ray down (if this process runs them) and remove what `start` left on disk: the
    state file first (a `--reload` must not find a cluster that is going away), the ingress files and
    the Ray token last, each even when the shutdown before it was interrupted."""
    import ray
    from ray import serve

    path = _started.pop("state_file", None)
    if path is not None:
        path.unlink(missing_ok=True)
    try:
        if ray.is_initialized():
            try:
                serve.shutdown()  # drains: behind HAProxy, replicas stay reachable for Ray's window (30 s)
            finally:
                ray.shutdown()
    finally:
        cleanup_ingress(_started.pop("ingress_dir", None))
        token = _started.pop("token_file", None)
        if token is not None:  # after shutdown: Ray's processes are gone
            token.unlink(missing_ok=True)
            token.parent.rmdir()
            for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):  # ours: a later start() in this process makes a new one
                os.environ.pop(key, None)


class Stop(Exception):
    """A stop signal (SIGTERM, or SIGINT where it is not ignored) reached `serve_forever`."""


def _stop_on_signals() -> list[int]:
    """SIGTERM -- what systemd, `docker stop` and Kubernetes send -- and SIGINT (Ctrl-C) raise `Stop` in
    the main thread, so `serve_forever` shuts down in order and removes its files. Installed again
    right after `ray.init`, whose own handler exits (or aborts) at once. A SIGINT the parent ignores (a job put in
    the background by a script) stays ignored, as Unix tools do. `ignore_signals` then lets the
    shutdown finish: a second signal arriving inside Ray's blocking calls is not a clean interrupt."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise Stop(signal.Signals(signum).name)

    wanted = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN else [])
    for signum in wanted:
        signal.signal(signum, handler)
    return wanted


def ignore_signals(signums: list[int]) -> None:
    import signal

    for signum in signums:
        signal.signal(signum, signal.SIG_IGN)


DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"  # Ray Serve's, read by its processes when they start


def serve_forever(config_path: str | Path, model_uri: str | None = None, port: int | None = None, host: str | None = None,
                  metrics_port: int | None = None, metrics_host: str = "127.0.0.1", ingress: str = "proxy", drain_s: float | None = None) -> None:
    """`trustrec serve`: start, serve until SIGTERM / SIGINT, stop in order. `drain_s`: Ray Serve's drain
    window behind HAProxy (None: $RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S, else Ray's 30 s)."""
    if drain_s is not None:
        os.environ[DRAIN_ENV] = f"{drain_s:g}"  # before Ray's processes start: they inherit it
    signums, announce = _stop_on_signals(), False  # a signal while starting also stops in order...
    try:
        preflight(config_path, model_uri, port, host, metrics_port, metrics_host)
        url = start(config_path, model_uri, port, host=host, metrics_port=metrics_port, metrics_host=metrics_host, ingress=ingress,
                    after_init=_stop_on_signals)  # ...and once `ray.init` has put its own SIGTERM handler in place, ours again
        metrics = f"; Prometheus: http://{metrics_host}:{metrics_port}/metrics" if metrics_port else ""
        print(f"trustrec serving on {url} through {ingress}  (OpenAPI: {url}/docs{metrics}; Ctrl-C or SIGTERM to stop)", flush=True)
        announce = True
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, Stop) as e:
        window = os.environ.get(DRAIN_ENV, "30")
        drain = f" (behind HAProxy, Ray Serve keeps replicas reachable for its drain window, {window} s)" if ingress == "haproxy" else ""
        print(f"trustrec serve: stopping on {e or 'SIGINT'}{drain}", flush=True)
        announce = True
    finally:
        ignore_signals(signums)
        stop()
        if announce:
            print("trustrec serve: stopped", flush=True)
