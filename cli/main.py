"""`trustrec` console script: the one place that sits above both wings.

Each subcommand is a thin function calling into features/, training/, serving/ or bundle/ (where
its logic lives and is tested) and printing the outcome. Each imports what it needs when it runs,
so `trustrec serve` or `audit-log` never load torch or training/.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = "configs/two_tower.yaml"
DEFAULT_SERVE_CONFIG = "configs/serve.yaml"


def default_config() -> str:
    """The training config `--config` defaults to: configs/two_tower.yaml of the working directory,
    else the one beside this package (a checkout or an editable install), so that commands that only
    read the store or a bundle (`privacy-budget --store-url`, `evaluate --model`) work from any
    directory; else the relative name, which load_config reports as not found."""
    if Path(DEFAULT_CONFIG).is_file():
        return DEFAULT_CONFIG
    shipped = Path(__file__).resolve().parents[1] / DEFAULT_CONFIG
    return str(shipped) if shipped.is_file() else DEFAULT_CONFIG


def _table(metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics)
    return "\n".join(f"  {k:<{width}}  {v:.4f}" for k, v in metrics.items())


def cmd_train(args: argparse.Namespace) -> int:
    from training.config import load_config

    cfg = load_config(args.config, args.set)  # fail on a bad key before paying for the torch import
    if args.distributed is not None:
        from training.distributed import launch  # TorchRec DMP over N workers (torchrun, or Ray Train)

        return launch(args.config, args.set, args.distributed, resume=args.resume)
    from training.pipeline import train

    result = train(cfg, resume=args.resume)
    print(f"run {result.run_id}  model version {result.model_version}  artifacts {result.artifact_dir}")
    print(_table({k: v for k, v in result.metrics.items() if not k.startswith("beyond/")}))
    if any(k.startswith("beyond/") for k in result.metrics):
        print("  (beyond-accuracy and fairness figures: beyond/* in MLflow; `trustrec report RUN_ID` plots them)")
    for warning in result.warnings:  # logged before the table scrolled it away: said again where the user looks
        print(f"warning: {warning}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.offline import evaluate_bundle

    cfg = load_config(args.config, args.set)
    metrics = evaluate_bundle(cfg, args.model or cfg.export.output_dir)
    print(json.dumps(metrics, indent=2) if args.json else _table(metrics))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.offline import export_checkpoint

    cfg = load_config(args.config, args.set)
    manifest = export_checkpoint(cfg, Path(args.checkpoint), Path(args.out or cfg.export.output_dir))
    print(f"exported to {args.out or cfg.export.output_dir}; parity {manifest['parity']}")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    """Recommendations in-process, as POST /v1/recommend answers them (same Recommender, same store
    and consent regime), plus a `reason` whenever the list is not personalized."""
    from features.store import FeatureStore
    from serving.admin import operator_args
    from serving.recommender import Recommender

    if not args.store_url and not Path(args.config).is_file():
        raise FileNotFoundError(f"--config {args.config}: no such file (a serve config, for the store URL and consent regime; or pass --store-url)")
    app_args = operator_args(args.config, args.store_url)  # --store-url with no serve config: the defaults
    url = args.store_url or app_args.store_url
    where = f"--store-url {_shown(url)}" if args.store_url else f"{args.config}: args.store_url {_shown(url)}"
    store = FeatureStore(existing_store(url, where), consent=app_args.consent) if url else None
    try:
        rec = Recommender.from_uri(args.model or app_args.model_uri, store, app_args.tracking_uri, app_args.force_cpu)
        for user in args.user_id:
            out = {"user_id": user, **rec.recommend(user, k=args.k)}
            if not out["personalized"]:
                out["reason"] = not_personalized_reason(rec, store, user, where)
            print(json.dumps(out, indent=2))
    finally:
        if store is not None:
            store.close()
    return 0


def existing_store(url: str, where: str) -> str:
    """features.store.existing_store, imported when a command needs it (the CLI's imports stay lazy)."""
    from features.store import existing_store as check

    return check(url, where)


def _shown(url: str) -> str:
    """A store URL as it may be printed: any password masked."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: existing_store says so
        return url


def not_personalized_reason(rec, store, user_id: str, where: str) -> str:
    """Why a user got the popularity list (what `personalized: false` means for them)."""
    if store is None:
        return "no feature store (store_url is null; pass --store-url): no history to personalize from, popularity list"
    if rec.user_vocab.get(user_id) is None and not store.holds_user(user_id):
        return f"unknown user: neither the model nor the feature store ({where}) knows them: popularity list"
    if not rec.user_state(user_id).personalize:
        return f"no consent to personalization (consent regime {store.consent.regime}): popularity list"
    return "nothing to personalize from: the store holds no history (or stated genres the model reads) of the user: popularity list"


def cmd_serve(args: argparse.Namespace) -> int:
    if args.reload:
        from serving.launch import reload

        old, new = reload(args.config, model_uri=args.model, port=args.port, address=args.address)
        print(f"model {'unchanged: ' + new if old == new else f'{old} -> {new}'}")
        return 0
    from serving.launch import serve_forever

    serve_forever(args.config, model_uri=args.model, port=args.port, host=args.host, metrics_port=args.metrics_port, metrics_host=args.metrics_host, ingress=args.ingress,
                  drain_s=args.drain_seconds)  # fmt: skip
    return 0


def _seconds(text: str) -> float:
    """A --drain-seconds value: a finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def gate_promotion(args: argparse.Namespace) -> dict:
    """The experiment gate of `promote --gate-experiment`: the decision, recorded in the audit log and
    on the run's model version whatever it is (training/experiments/gate.py)."""
    import mlflow

    from features.store import FeatureStore
    from serving.audit import audit_log
    from serving.config import load_serve_config
    from training.experiments.gate import decide, version_tags

    _, app_args, _ = load_serve_config(args.config)
    cfg = app_args.experiment
    if cfg is None or cfg.name != args.gate_experiment:
        raise ValueError(f"--gate-experiment: {args.config} declares {cfg.name if cfg else 'no experiment'!r}, not {args.gate_experiment!r}")
    candidate = args.gate_arm or next((a.name for a in cfg.arms if a.model == "challenger"), None)
    incumbent = args.against_arm or next((a.name for a in cfg.arms if a.model == args.alias), cfg.control_arm.name)
    names = [a.name for a in cfg.arms]
    for flag, arm in (("--gate-arm", candidate), ("--against-arm", incumbent)):
        if arm is not None and arm not in names:
            raise ValueError(f"{flag}: {arm!r} is not an arm of experiment {cfg.name!r} ({', '.join(names)})")
    if candidate is None or cfg.arm(candidate).model is None:
        raise ValueError(f"--gate-arm: name the arm that served run {args.run_id[:8]}'s model (a model arm of {cfg.name!r})")
    client = mlflow.MlflowClient(tracking_uri=args.tracking_uri)
    versions = client.search_model_versions(f"name = '{args.name}' and run_id = '{args.run_id}'") if "'" not in args.name else []
    if not versions:
        raise ValueError(f"run {args.run_id} has no registered version of model {args.name!r} in {args.tracking_uri}")
    version = str(max(int(v.version) for v in versions))
    served = client.get_model_version_by_alias(args.name, cfg.arm(candidate).model).version
    if str(served) != version:
        raise ValueError(f"--gate-arm: arm {candidate!r} serves {args.name}@{cfg.arm(candidate).model} = version {served}, not run "
                         f"{args.run_id[:8]}'s version {version}: the experiment did not test this model")  # fmt: skip
    url = existing_store(app_args.store_url or "", f"{args.config}: args.store_url")
    with FeatureStore(url, consent=app_args.consent) as store:
        decision = decide(store, cfg, candidate, incumbent)
        audit = audit_log(app_args.audit, store)
        if audit is not None:
            detail = {k: decision[k] for k in ("experiment", "candidate_arm", "incumbent_arm", "passed", "reasons", "srm_p_value")}
            audit.record("promotion_gate", None, "cli", {**detail, "model": args.name, "version": version, "alias": args.alias,
                                                         "ctr_lift_relative": decision["ctr_lift"]["relative"]})  # fmt: skip
    for key, value in version_tags(decision).items():
        client.set_model_version_tag(args.name, version, key, value)
    return decision


def cmd_promote(args: argparse.Namespace) -> int:
    from training.tracking import promote

    if args.gate_experiment:
        decision = gate_promotion(args)
        rel = decision["ctr_lift"]["relative"]
        print(f"gate {decision['experiment']}: {decision['candidate_arm']} vs {decision['incumbent_arm']}: CTR lift "
              f"{100 * rel['value']:+.2f} % [{100 * rel['low']:+.2f}, {100 * rel['high']:+.2f}], SRM p {decision['srm_p_value']:.3g}")  # fmt: skip
        if not decision["passed"]:
            print(f"trustrec promote: refused by the experiment gate: {'; '.join(decision['reasons'])} "
                  "(recorded in the audit log and on the model version's gate.* tags)", file=sys.stderr)  # fmt: skip
            return 2
    version = promote(args.run_id, args.alias, args.name, args.tracking_uri)
    print(f"{args.name}@{args.alias} -> version {version} (run {args.run_id}); `trustrec serve --reload` swaps a running server to it")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from training.tune import format_table, run_tune

    outcome = run_tune(
        args.config, args.set, trials=args.trials, space_file=args.search_space, out=args.out, metric=args.metric,
        seed=args.seed, concurrency=args.concurrency, verbose=0 if args.quiet else 1,
    )  # fmt: skip
    print(format_table(outcome))
    best = outcome.best
    test_key = "test/" + outcome.metric.split("/", 1)[1]
    print(f"best trial {best.trial_id}: {outcome.metric} {best.objective:.4f} (validation); {test_key} {best.metrics.get(test_key, float('nan')):.4f} (test, for information)")
    print(f"MLflow parent run {outcome.parent_run_id}; best config written to {outcome.out}")
    if outcome.failed:
        print(f"{len(outcome.failed)} of {len(outcome.trials)} trials failed", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cli.demo import run_demo

    return run_demo(args.config, args.serve_config, args.set)


def cmd_report(args: argparse.Namespace) -> int:
    from training.report import build_report, parse_lambdas

    report = build_report(args.run_id, args.tracking_uri, out=args.out, lambdas=parse_lambdas(args.lambdas))
    print(f"report for run {report.run_id} written to {report.html.resolve()}; logged to the run under report/")
    return 0


def cmd_user_data(args: argparse.Namespace) -> int:
    """`forget` / `export-user`: the code path of DELETE /v1/users/{id} and GET /v1/users/{id}/data
    (serving/admin.py); `forget` adds the registered versions trained on the user (training/tracking.py)."""
    from features.consent import UnknownUserError
    from serving.admin import user_data

    try:
        out = user_data("forget" if args.command == "forget" else "export", args.user_id, args.config, args.store_url)
    except UnknownUserError:
        print(f"trustrec {args.command}: the store holds no data for this user (never known, or already erased)", file=sys.stderr)
        return 1
    if args.command == "forget":  # the erasure is done; now say which served models still learned from the user
        out["model_versions_trained_on_user"] = versions_trained_on(args.user_id, args.config, args.store_url)
    _emit(json.dumps(out, indent=2), getattr(args, "out", None))
    return 0


def versions_trained_on(user_id: str, config: str, store_url: str | None) -> list[dict] | dict:
    """Registered versions (of the serve config's model name) trained on data that held the user:
    retrain or retire them. An unreachable registry is said in the receipt, never hidden, and never
    fails the erasure that already happened."""
    from bundle.locate import registered_model_name
    from serving.admin import operator_args
    from training.tracking import versions_holding_user

    app_args = operator_args(config, store_url)
    try:
        return versions_holding_user(user_id, registered_model_name(app_args.model_uri), app_args.tracking_uri)
    except Exception as e:  # noqa: BLE001 - the erasure already happened; report, don't fail it
        return {"error": f"could not read the model registry at {app_args.tracking_uri}: {type(e).__name__}"}


def _emit(text: str, out: str | None) -> None:
    """Print `text`, or write it to the file `out` atomically (a reader never sees half a file)."""
    if not out:
        print(text)
        return
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(out)
    print(f"written to {out}")


def cmd_audit_log(args: argparse.Namespace) -> int:
    """`audit-log`: the audit log, oldest first (serving/admin.py reads it as the serve config says)."""
    from serving.admin import audit_entries

    entries = audit_entries(args.config, args.store_url, args.file, args.user, args.action, args.since)
    for e in entries:
        if args.json:
            print(json.dumps(e, sort_keys=True))
        else:
            print(f"{e['at']}  {e['action']:<12}  {(e['subject'] or '-')[:12]:<12}  {e['actor']:<16}  {json.dumps(e['detail'], sort_keys=True)}")
    if not entries:
        print("trustrec audit-log: no entries", file=sys.stderr)
    return 0


def cmd_audit_privacy(args: argparse.Namespace) -> int:
    from training.privacy.audit import audit_run, format_table

    result = audit_run(args.run_id, args.tracking_uri, out=args.out, n_boot=args.bootstrap, repeats=args.repeats, seed=args.seed)
    print(json.dumps(result.summary(), indent=2) if args.json else format_table(result))
    print(f"ROC plot {result.files['roc'].resolve()}; metrics and files logged to the run under audit/")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def cmd_privacy_budget(args: argparse.Namespace) -> int:
    """The privacy-budget ledger of a feature store: every private release, oldest first, and the
    cumulative spend of the worst-off user still covered (features/privacy_ledger.py)."""
    from features.privacy_ledger import COMPOSITION, entries, spent
    from features.store import FeatureStore
    from training.config import load_config

    cfg = load_config(args.config, args.set)
    url = existing_store(args.store_url or cfg.store.url, "--store-url" if args.store_url else "store.url")
    store = FeatureStore(url)
    try:
        rows, worst = entries(store), spent(store)
    finally:
        store.close()
    budget = cfg.privacy.total_epsilon
    if args.json:
        print(json.dumps({"entries": rows, "cumulative": worst.to_json(), "budget_epsilon": budget, "composition": COMPOSITION}, indent=2))
        return 0
    if not rows:
        print("no private release recorded in this store")
        return 0
    print(f"{'#':>3}  {'recorded (UTC)':<19}  {'epsilon':>8}  {'delta':>9}  {'users':>6}  {'still':>6}  mechanism")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["ts_ms"] / 1000))
        print(f"{r['id']:>3}  {when:<19}  {r['epsilon']:>8.3g}  {r['delta']:>9.2e}  {r['users']:>6}  {r['still_covered']:>6}  {r['mechanism']}")
    limit = f" of a budget of {budget:g} (privacy.total_epsilon)" if budget is not None else " (no privacy.total_epsilon configured)"
    print(f"cumulative, worst-off user still covered: epsilon {worst.epsilon:.3g}, delta {worst.delta:.2e}, over {worst.releases} release(s){limit}")
    print(f"composition: {COMPOSITION}")
    return 0


def cmd_experiment_report(args: argparse.Namespace) -> int:
    """Per-arm figures, lifts, SRM and guardrails of a served experiment, from the store's exposure log."""
    from features.store import FeatureStore
    from serving.config import load_serve_config
    from training.experiments.report import build

    _, app_args, _ = load_serve_config(args.config)
    cfg = app_args.experiment
    if cfg is None or cfg.name != args.name:
        raise ValueError(f"{args.config}: args.experiment declares {cfg.name if cfg else 'no experiment'!r}, not {args.name!r}")
    url = args.store_url or app_args.store_url
    if not url:
        raise ValueError(f"{args.config}: args.store_url is null; the exposure log lives in the feature store (pass --store-url)")
    existing_store(url, "--store-url" if args.store_url else f"{args.config}: args.store_url")
    out = Path(args.out or f"reports/experiment-{args.name}")
    with FeatureStore(url, consent=app_args.consent) as store:
        body = build(store, cfg, out, None if args.no_mlflow else app_args.tracking_uri)
    srm = body["srm"]
    print(f"experiment {args.name}: control {body['control']}; sample ratio p = {srm['p_value']:.3g}{'  MISMATCH: do not read the lifts' if srm['mismatch'] else ''}")
    for name, a in body["arms"].items():
        ctr = a.get("ctr")
        rel = a.get("lift", {}).get("ctr", {}).get("relative")
        line = f"  {name:<16} users {a['users']:>6}  exposures {a['exposures']:>7}"
        if ctr:
            line += f"  CTR {ctr['value']:.4f} [{ctr['low']:.4f}, {ctr['high']:.4f}]"
        if rel:
            line += f"  lift {100 * rel['value']:+.2f} % [{100 * rel['low']:+.2f}, {100 * rel['high']:+.2f}]"
        print(line)
    print(f"report: {out / 'report.html'}" + (f"  (MLflow run {body['mlflow_run_id']})" if body.get("mlflow_run_id") else ""))
    return 0


def cmd_experiment_demo(args: argparse.Namespace) -> int:
    from cli.experiment_demo import run_experiment_demo

    run_experiment_demo(Path(args.dir), users=args.users, rounds=args.rounds, epochs=args.epochs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trustrec", description="Train, export and serve trustworthy recommenders.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", default=default_config(), help=f"training config YAML (default {DEFAULT_CONFIG}; outside a checkout, trustrec's own)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. trainer.epochs=5 (repeatable)")

    sp = sub.add_parser("train", help="train, evaluate, export, log to MLflow and register")
    with_config(sp)
    sp.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in trainer.checkpoint_dir")
    sp.add_argument("--distributed", type=int, metavar="N", help="train with TorchRec sharding over N processes (distributed.* in the config; torchrun or Ray Train)")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("evaluate", help="test metrics of an exported model (ONNX) on the config's split")
    with_config(sp)
    sp.add_argument("--model", help="artifact dir or models:/name@alias (default: export.output_dir)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("export", help="export a training checkpoint to an ONNX artifact bundle")
    with_config(sp)
    sp.add_argument("--checkpoint", required=True, help="epoch-NNN.pt written by the trainer")
    sp.add_argument("--out", help="output dir (default: export.output_dir)")
    sp.set_defaults(func=cmd_export)

    for name, func, helptext in (("serve", cmd_serve, "run the Ray Serve HTTP app on 127.0.0.1"), ("recommend", cmd_recommend, "recommend in-process, without Ray")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--config", default=DEFAULT_SERVE_CONFIG, help=f"Ray Serve config YAML (default {DEFAULT_SERVE_CONFIG})")
        sp.add_argument("--model", help="override the model URI (artifact dir or models:/name@alias)")
        if name == "serve":
            sp.add_argument("--port", type=int, help="override http_options.port")
            sp.add_argument("--host", help="override http_options.host (default 127.0.0.1; 0.0.0.0 only inside a container)")
            sp.add_argument("--metrics-port", type=int, help="Ray's Prometheus export port (default: Ray picks one)")
            sp.add_argument("--ingress", choices=["proxy", "haproxy"], default=os.environ.get("TRUSTREC_INGRESS", "haproxy"),
                            help="HTTP data plane: Ray Serve's HAProxy ingress (default: p99 6 ms at 300 rps on 2 cores, "
                                 "docs/BENCHMARKS.md 'Load') or its Python proxy; $TRUSTREC_INGRESS sets the default")
            sp.add_argument("--metrics-host", choices=["127.0.0.1", "0.0.0.0"], default="127.0.0.1",
                            help="where the metrics port listens (default loopback; 0.0.0.0 for a scraper on another host, e.g. in a container)")
            sp.add_argument("--drain-seconds", type=_seconds, metavar="S",
                            help="behind HAProxy, how long a stopping replica stays reachable so a load balancer in front can deregister it "
                                 "(Ray Serve's RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S, default 30): a stop takes about this long; "
                                 "0-2 where nothing sits in front")
            sp.add_argument("--reload", action="store_true", help="hot swap a running server: re-resolve the model alias and push it to the model deployment")
            sp.add_argument("--address", help="with --reload: Ray GCS address of the running app (default: the one `trustrec serve` noted for --port)")
        else:
            sp.add_argument("user_id", nargs="+")
            sp.add_argument("-k", type=_positive_int, default=10, help="items per user (default 10)")
            sp.add_argument("--store-url", help="feature store URL (default: store_url of --config); a SQLite file must exist, it is never created here")
        sp.set_defaults(func=func)

    sp = sub.add_parser("promote", help="point a registry alias (default champion) at the model version of a run")
    sp.add_argument("run_id", metavar="RUN_ID", help="MLflow run id of a `trustrec train` run")
    sp.add_argument("--alias", default="champion", help="alias to move (default champion, what serving loads)")
    sp.add_argument("--name", default="trustrec", help="registered model name (default trustrec)")
    sp.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI (default sqlite:///mlflow.db)")
    sp.add_argument("--gate-experiment", metavar="NAME", help="promote only if this experiment (declared in --config) shows the run's arm "
                    "beating the incumbent's: CTR lift CI above zero, no sample ratio mismatch, no guardrail regression")
    sp.add_argument("--gate-arm", help="the arm that served this run's model (default: the arm serving alias challenger)")
    sp.add_argument("--against-arm", help="the incumbent's arm (default: the arm serving --alias, else the control)")
    sp.add_argument("--config", default=DEFAULT_SERVE_CONFIG, help=f"serve config declaring the experiment (default {DEFAULT_SERVE_CONFIG})")
    sp.set_defaults(func=cmd_promote)

    sp = sub.add_parser("tune", help="random hyper-parameter search with Ray Tune; trials are nested MLflow runs")
    with_config(sp)
    sp.add_argument("--trials", type=int, default=10, help="number of sampled configs (default 10)")
    sp.add_argument("--search-space", metavar="FILE", help="YAML {dotted.key: {uniform|loguniform|randint|choice: [...]}} (default: training.tune.DEFAULT_SPACE)")
    sp.add_argument("--out", help="where to write the best config (default configs/<config name>_tuned.yaml)")
    sp.add_argument("--metric", default="val/ndcg@10", help="validation metric to maximise, at the early-stopping epoch (default val/ndcg@10)")
    sp.add_argument("--seed", type=int, default=0, help="random-search seed (default 0)")
    sp.add_argument("--concurrency", type=int, help="trials at a time (default min(2, CPUs)); CPUs are split evenly between them")
    sp.add_argument("--quiet", action="store_true", help="no Ray Tune progress output")
    sp.set_defaults(func=cmd_tune)

    sp = sub.add_parser("demo", help="train on synthetic data, serve, query, shut down")
    with_config(sp)
    sp.add_argument("--serve-config", default=DEFAULT_SERVE_CONFIG)
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("report", help="HTML report of a run: recomputed test, fairness and diversity metrics, plots; logged to the run")
    sp.add_argument("run_id", metavar="RUN_ID", help="MLflow run id of a `trustrec train` run")
    sp.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI (default sqlite:///mlflow.db)")
    sp.add_argument("--out", help="output dir (default reports/RUN_ID)")
    sp.add_argument("--lambdas", default="0,0.25,0.5,0.75,1", help="MMR trade-offs to evaluate, comma-separated in [0, 1] (default 0,0.25,0.5,0.75,1)")
    sp.set_defaults(func=cmd_report)

    for name, helptext in (
        ("forget", "erase a user: every row in every table, plus a tombstone that keeps them out of later imports and trainings; prints the receipt"),
        ("export-user", "everything the feature store holds about a user, as JSON (the right of access)"),
    ):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("user_id", metavar="USER_ID")
        sp.add_argument("--store-url", help="feature store URL (default: store_url of --config)")
        sp.add_argument("--config", default=DEFAULT_SERVE_CONFIG, help=f"Ray Serve config YAML for store_url and the consent regime (default {DEFAULT_SERVE_CONFIG})")
        if name == "export-user":
            sp.add_argument("--out", help="write the JSON to this file instead of stdout")
        sp.set_defaults(func=cmd_user_data)

    sp = sub.add_parser("audit-log", help="the audit log, oldest first: consent, preferences, events, exports, erasures, model swaps, auth failures")
    sp.add_argument("--user", metavar="ID", help="only this user's entries (the id is hashed with the store's erasure salt; works after an erasure)")
    sp.add_argument("--action", help="only this action: consent, preferences, event, export, erasure, model_swap, auth_failure")
    sp.add_argument("--since", metavar="ISO", help="only entries at or after this time (ISO 8601; without a zone: UTC)")
    sp.add_argument("--config", default=DEFAULT_SERVE_CONFIG, help=f"Ray Serve config YAML for store_url and args.audit (default {DEFAULT_SERVE_CONFIG})")
    sp.add_argument("--store-url", help="feature store URL (default: store_url of --config)")
    sp.add_argument("--file", help="read this JSON-lines audit file instead of the store table")
    sp.add_argument("--json", action="store_true", help="one JSON object per line")
    sp.set_defaults(func=cmd_audit_log)

    sp = sub.add_parser("audit", help="audits of a trained run")
    audits = sp.add_subparsers(dest="audit", required=True)
    ap = audits.add_parser("privacy", help="membership inference against users (members vs held-out users): ROC AUC with a bootstrap CI, logged to the run")
    ap.add_argument("run_id", metavar="RUN_ID", help="MLflow run id of a run trained with privacy.audit_holdout > 0")
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI (default sqlite:///mlflow.db)")
    ap.add_argument("--out", help="output dir (default reports/RUN_ID/audit)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUC confidence interval (default 1000)")
    ap.add_argument("--repeats", type=int, default=4, help="random hide masks averaged per user (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    ap.set_defaults(func=cmd_audit_privacy)

    sp = sub.add_parser("experiment", help="controlled experiments declared in the serve config")
    experiments = sp.add_subparsers(dest="experiment_command", required=True)
    ep = experiments.add_parser("report", help="per-arm CTR and conversion with 95 %% CIs, lift vs control, SRM, guardrails; HTML + MLflow")
    ep.add_argument("name", help="the experiment's name (args.experiment.name in --config)")
    ep.add_argument("--config", default=DEFAULT_SERVE_CONFIG, help=f"Ray Serve config YAML declaring it (default {DEFAULT_SERVE_CONFIG})")
    ep.add_argument("--store-url", help="feature store holding the exposure log (default: the config's store_url)")
    ep.add_argument("--out", help="report folder (default reports/experiment-NAME)")
    ep.add_argument("--no-mlflow", action="store_true", help="write the files only, log nothing to MLflow")
    ep.set_defaults(func=cmd_experiment_report)
    dp = experiments.add_parser("demo", help="train a champion and a challenger, serve popularity / champion / challenger arms to simulated users over HTTP, report, evaluate off-policy")
    dp.add_argument("--dir", default="runs/experiment-demo", help="where its registry, store, bundles and report go (default runs/experiment-demo)")
    dp.add_argument("--users", type=_positive_int, default=600, help="simulated users (default 600)")
    dp.add_argument("--rounds", type=_positive_int, default=2, help="requests per user (default 2)")
    dp.add_argument("--epochs", type=_positive_int, default=15, help="training epochs of each model (default 15)")
    dp.set_defaults(func=cmd_experiment_demo)

    sp = sub.add_parser("privacy-budget", help="the privacy-budget ledger: every private release from the store's users and the cumulative epsilon")
    with_config(sp)
    sp.add_argument("--store-url", help="feature store URL (default: store.url of --config)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_privacy_budget)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file download is noise
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("features", "training", "serving", "bundle", "cli"):  # ours at INFO; libraries stay at WARNING
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    _sigterm_as_ctrl_c()
    try:
        _registry_must_exist(args)
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:  # training.config.ConfigError and pydantic's errors are ValueErrors
        print(f"trustrec {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"trustrec {args.command}: stopped by {e or 'SIGINT'}", file=sys.stderr)
        return 130


def _registry_must_exist(args: argparse.Namespace) -> None:
    """`promote` / `report` / `audit` read runs from an MLflow registry: a SQLite one that is not there
    (a fresh directory, a typo) is an error naming it, not a new empty mlflow.db MLflow would create."""
    from bundle.locate import sqlite_registry

    url = getattr(args, "tracking_uri", None)
    if args.command in ("promote", "report", "audit") and (path := sqlite_registry(url)) is not None:
        if not path.exists():
            raise FileNotFoundError(f"--tracking-uri {url}: no MLflow registry at {path.resolve()} (not created); "
                                    "run this where `trustrec train` wrote mlflow.db, or pass --tracking-uri")


def _sigterm_as_ctrl_c() -> None:
    """SIGTERM (`kill`, a job scheduler, a container stop) ends a command as Ctrl-C does: by default
    Python dies at once, so `trustrec train` left its MLflow run RUNNING forever and its staged
    bundle folder behind; raised as KeyboardInterrupt, the run is marked KILLED and the staging
    removed. `trustrec serve` installs its own handlers (serving/launch.py), and `ray.init` its own."""
    import signal
    import threading

    def handler(signum: int, frame) -> None:
        raise KeyboardInterrupt("SIGTERM")

    if threading.current_thread() is threading.main_thread():  # `main()` called from a thread: Python allows no handler there
        signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
