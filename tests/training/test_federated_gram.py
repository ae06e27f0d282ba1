"""Federated EASE (federated.strategy: gram, training/federated/gram.py): a client's Gram part by hand,
the server's checks and clipping, the config refusals; then real Flower simulations on the Ray backend
(40 one-user clients, 4 rounds of 10) through the pipeline: without DP the federated model is
centralized EASE on the same data (same λ, scores equal to float precision) and λ is the validation
choice; with DP it is exactly centralized DP-EASE's release (same statistic, same noise draw), and its
guarantee reaches the manifest, MLflow and the ledger."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from training import blend
from training.config import ConfigError, load_config
from training.federated.gram import GramBook, check, contribution, frobenius, item_set
from training.privacy import gram

from tests.conftest import REPO, tiny_overrides

N_USERS, N_ITEMS = 40, 30


def csr(rows: list[list[int]]):
    lengths = [len(r) for r in rows]
    return (np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), np.array([i for r in rows for i in r], np.int64))


def dense(arrays, n: int) -> np.ndarray:
    """The symmetric matrix whose upper triangle the three arrays hold."""
    a = np.zeros((n, n))
    a[arrays[0], arrays[1]] = arrays[2]
    return a + np.triu(a, 1).T


def test_a_client_part_by_hand():
    train = csr([[0, 1], [5], [1, 2, 3]])
    val = csr([[2], [], [3]])  # user 2's val item 3 is also in train: counted once
    plain = contribution([train, val], np.array([0, 2]), 4, unit=False)
    # user 0: items {0, 1, 2}; user 2: {1, 2, 3}: x0 x0ᵀ + x2 x2ᵀ
    expected = np.zeros((4, 4))
    for items in ([0, 1, 2], [1, 2, 3]):
        expected[np.ix_(items, items)] += 1.0
    np.testing.assert_array_equal(dense(plain, 4), expected)
    assert np.all(plain[0] <= plain[1])  # the upper triangle only
    unit = contribution([train, val], np.array([0, 2]), 4, unit=True)
    np.testing.assert_allclose(dense(unit, 4), expected / 3.0)  # each |x_u| = 3: w_u = 1/3
    one = contribution([train], np.array([0]), 4, unit=True)
    assert frobenius(*one) == pytest.approx(1.0)  # one user's unit part has Frobenius norm exactly 1
    assert frobenius(np.array([0, 0]), np.array([0, 1]), np.array([3.0, 2.0])) == pytest.approx(np.sqrt(9 + 2 * 4))


def test_a_one_user_client_sends_its_item_set_and_the_server_builds_the_part():
    train, val = csr([[0, 1], [5], [1, 2, 3]]), csr([[2], [], [3]])
    assert item_set([train, val], 2).tolist() == [1, 2, 3] and item_set([train, val], 2).dtype == np.int32  # item 3 once
    for bound, w in ((1.0, 1 / 3), (None, 1.0)):  # under DP the server weighs the set 1/|x| (unit part), else 1
        book = GramBook(4, np.arange(2), 2, bound=bound, train_too=True, progress=False, one_user=True)
        assert book.form == "items"
        book.add(0, [item_set([train, val], 0), item_set([train], 0)], users=1)
        # the same sums the client's (row, col, value) part would have given
        np.testing.assert_allclose(book.symmetric(book.seen), dense(contribution([train, val], np.array([0]), 4, unit=bound is not None), 4))
        np.testing.assert_allclose(book.symmetric(book.train), dense(contribution([train], np.array([0]), 4, unit=bound is not None), 4))
        assert book.seen[0, 1] == pytest.approx(w)
    dp = GramBook(5, np.arange(6), 6, bound=1.0, train_too=False, progress=False, one_user=True)
    dp.add(0, [np.array([4, 0, 2], np.int32)], users=9)  # unsorted, claims 9 users: still exactly one unit part
    assert np.linalg.norm(dp.symmetric(dp.seen.copy())) == pytest.approx(1.0) and dp.clipped == 0
    np.testing.assert_allclose(dp.vector, np.array([1, 0, 1, 0, 1]) / np.sqrt(3))  # the user's unit row: the popularity vector's part
    assert GramBook(5, np.arange(1), 1, None, False, False, one_user=True).vector is None  # without DP none is kept
    for bad, match in (([np.array([1, 1])], "twice"), ([np.array([0, 5])], "outside"), ([np.array([0.5])], "malformed"),
                       ([np.array([0]), np.array([1])], "arrays")):  # fmt: skip
        with pytest.raises(RuntimeError, match=match):
            dp.add(len(dp.reported) + 1, bad, users=1)
    dp.add(9, [np.zeros(0, np.int32)], users=1)  # an empty history adds nothing
    assert np.linalg.norm(dp.symmetric(dp.seen.copy())) == pytest.approx(1.0)


def test_the_server_clips_a_silo_part_past_its_users_and_refuses_malformed_ones():
    book = GramBook(3, np.arange(3), 3, bound=1.0, train_too=False, progress=False)
    assert book.form == "pairs"
    honest = [np.array([0, 0, 1]), np.array([0, 1, 1]), np.array([0.5, 0.5, 0.5])]  # unit part of items {0, 1}
    book.add(0, honest, users=1)
    greedy = [np.array([2]), np.array([2]), np.array([5.0])]  # norm 5 from a silo reporting 2 users
    book.add(1, greedy, users=2)
    assert book.clipped == 1
    full = book.symmetric(book.seen)
    assert full[2, 2] == pytest.approx(2.0)  # scaled to two users' bound
    assert full[0, 1] == full[1, 0] == pytest.approx(0.5)
    with pytest.raises(RuntimeError, match="twice"):
        book.add(1, honest, users=1)
    with pytest.raises(RuntimeError, match="upper triangle"):
        book.add(2, [np.array([1]), np.array([0]), np.array([1.0])], users=1)
    with pytest.raises(RuntimeError, match="arrays"):
        GramBook(3, np.arange(3), 3, None, True, False).add(0, honest, users=1)
    silos = GramBook(3, np.arange(2), 2, bound=1.0, train_too=False, progress=False)
    silos.add(0, [np.array([0]), np.array([0]), np.array([2.0])], users=2)  # two users may reach norm 2
    assert silos.clipped == 0
    plain = GramBook(3, np.arange(1), 1, bound=None, train_too=False, progress=False)
    plain.add(0, greedy, users=1)  # without DP nothing is clipped: the binary Gram has no bound
    assert plain.clipped == 0 and plain.seen[2, 2] == 5.0


def test_a_failed_or_missing_client_stops_the_run_instead_of_shrinking_the_sum():
    """Flower reports a client's failure to aggregate_fit: the strategy raises (the run then fails
    loudly, fit_federated_gram checks every client reported) instead of releasing a partial Gram."""
    from training.federated.gram import gram_strategy

    book = GramBook(3, np.arange(4), 2, None, False, False)
    strategy = gram_strategy(book)
    with pytest.raises(RuntimeError, match="1 client\\(s\\) failed"):
        strategy.aggregate_fit(1, [], [RuntimeError("device went away")])
    with pytest.raises(RuntimeError, match="0 replies for 2 clients"):
        strategy.aggregate_fit(1, [], [])
    assert not book.reported and not book.seen.any()


def test_the_cohorts_cover_every_client_once():
    book = GramBook(2, np.random.default_rng(0).permutation(23), 5, None, False, False)
    assert book.rounds == 5
    cohorts = [book.cohort_of(r) for r in range(1, book.rounds + 1)]
    assert sorted(np.concatenate(cohorts).tolist()) == list(range(23))
    assert [len(c) for c in cohorts] == [5, 5, 5, 5, 3]


def config(root, *extra: str):
    return load_config(REPO / "configs" / "ease_federated.yaml", tiny_overrides(root) + [
        f"data.synthetic.n_users={N_USERS}", f"data.synthetic.n_items={N_ITEMS}", "federated.fraction_fit=0.25",
        "federated.ray_num_cpus=2", "federated.progress=false", *extra,
    ])  # fmt: skip


def test_config_refusals_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="federated.secagg"):
        check(config(tmp_path, "federated.secagg=true"))
    with pytest.raises(ConfigError, match="federated.sampling"):
        check(config(tmp_path, "federated.sampling=poisson", "federated.evaluation=server"))
    with pytest.raises(ConfigError, match="federated.target_epsilon"):
        check(config(tmp_path, "federated.target_epsilon=8"))
    for extra in (["federated.partition=silos"], []):  # silos send no item sets; without DP there is nothing to share
        with pytest.raises(ConfigError, match=r"privacy\.gram_popularity_share"):
            check(config(tmp_path, *extra, *(["federated.dp=true"] if extra else []), "privacy.gram_popularity_share=0.2"))
    check(config(tmp_path, "federated.dp=true", "privacy.gram_popularity_share=0.2"))  # one-user clients under DP: the server builds it
    check(config(tmp_path, "federated.dp=true", "federated.partition=silos", "privacy.gram_popularity_share=0"))  # 0 (and null): the Gram alone
    with pytest.raises(ConfigError, match=r"privacy\.gram_weight_power"):  # the clients would need the weights before they send
        check(config(tmp_path, "federated.dp=true", "privacy.gram_weight_power=0.25"))
    check(config(tmp_path, "federated.dp=true", "privacy.gram_weight_power=0"))
    with pytest.raises(ValueError, match="strategy"):
        config(tmp_path, "federated.strategy=gramm")


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    from training.pipeline import train

    root = tmp_path_factory.mktemp("fed_gram")
    cfg = config(root)
    return root, cfg, train(cfg)


@pytest.mark.ray
def test_without_dp_the_federated_model_is_centralized_ease(plain_run):
    from training.federated.gram import choose_lambda
    from training.pipeline import prepare

    root, cfg, result = plain_run
    privacy = result.fit.privacy
    assert privacy["strategy"] == "gram" and privacy["clients"] == N_USERS and privacy["rounds"] == 4 and privacy["clients_per_round"] == 10
    assert "epsilon" not in privacy and privacy["lambda_rule"].startswith("validation")
    data = prepare(cfg)
    n = data.dataset.n_items
    # λ: the validation choice over the grid, recomputed centrally from XᵀX of train
    x_train = blend.binary_matrix(data.train, np.arange(len(data.train[0]) - 1), n)
    lam, scores = choose_lambda(np.asarray((x_train.T @ x_train).todense(), np.float64), list(cfg.federated.gram_lambdas), data.train, data.val, cfg.task.eval_k)
    assert privacy["lambda"] == lam and len(set(scores.values())) > 1  # the grid was not flat: a real choice
    # the model: centralized EASE on the members' train + val with that λ
    x = blend.binary_matrix(data.seen, np.arange(len(data.seen[0]) - 1), n)
    g = np.asarray((x.T @ x).todense(), np.float64)
    p = np.linalg.inv(g + lam * np.eye(n))
    b = np.eye(n) - p / np.diag(p)
    manifest = json.loads((root / "artifacts" / "manifest.json").read_text())
    assert manifest["model"]["kind"] == "ease_federated" and manifest["ease"]["fallback"].startswith("diagonal")
    items = np.load(root / "artifacts" / "item_embeddings.npy")
    import onnxruntime as ort

    from features.content import user_inputs

    users = np.arange(8)
    histories = [np.unique(data.seen[1][data.seen[0][u] : data.seen[0][u + 1]]).astype(np.int64) for u in users]
    zero = np.zeros(len(users), np.int64)
    feed = user_inputs(histories, None, users, zero, zero, zero, [np.zeros(0, np.int64)] * len(users), [np.zeros(0, np.int64)] * len(users))
    z = ort.InferenceSession(str(root / "artifacts" / "user_tower.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    served = z.astype(np.float64) @ items.T.astype(np.float64)  # the bundle as served
    expected = np.asarray(x[users].todense()) @ b
    np.testing.assert_allclose(served, expected, atol=1e-4 * np.abs(expected).max())
    # the fallback list: item user counts of train + val
    counts = np.asarray(x.sum(axis=0)).ravel()
    popular = manifest["popularity"][:5]
    assert popular == data.dataset.item_vocab.decode(np.argsort(-counts, kind="stable")[:5])


@pytest.mark.ray
def test_silos_send_gram_parts_and_reach_the_same_model(plain_run, tmp_path):
    """4 silos of 10 users send (row, col, value) parts instead of item sets; the sum, the λ choice
    and so the model are those of the 40 one-user clients."""
    from training.pipeline import train

    root, _, result = plain_run
    silo = train(config(tmp_path, "federated.partition=silos", "federated.n_silos=4", "federated.fraction_fit=0.5"))
    assert silo.fit.privacy["clients"] == 4 and "upper triangle" in silo.fit.privacy["message"]
    assert "item set" in result.fit.privacy["message"] and silo.fit.privacy["lambda"] == result.fit.privacy["lambda"]
    np.testing.assert_allclose(np.load(tmp_path / "artifacts" / "item_embeddings.npy"), np.load(root / "artifacts" / "item_embeddings.npy"), rtol=1e-5, atol=1e-6)


@pytest.mark.ray
def test_without_dp_the_run_is_tracked_as_federated_ease(plain_run):
    from mlflow import MlflowClient

    root, cfg, result = plain_run
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = client.get_run(result.run_id)
    assert run.data.tags["model"] == "ease_federated" and run.info.run_name.startswith("ease_federated-")
    assert run.data.params["model.kind"] == "ease_federated" and run.data.params["privacy.fl_strategy"] == "gram"
    assert run.data.metrics["federated/rounds"] == 4.0 and run.data.metrics["ease/lambda"] == result.fit.privacy["lambda"]
    assert "privacy/epsilon" not in run.data.metrics


DP_EPS = 3.0


@pytest.fixture(scope="module")
def dp_cli_run(tmp_path_factory):
    """`trustrec train` of the DP config, as a user runs it (ledger on, the default)."""
    from cli.main import main

    root = tmp_path_factory.mktemp("fed_gram_dp")
    overrides = tiny_overrides(root) + [f"data.synthetic.n_users={N_USERS}", f"data.synthetic.n_items={N_ITEMS}", "federated.fraction_fit=0.25",
                                        "federated.ray_num_cpus=2", "federated.progress=false", "federated.dp=true", f"federated.target_epsilon={DP_EPS}",
                                        "tracking.register_model=true", "tracking.alias=champion",
                                        "privacy.gram_popularity_share=0.2"]  # the rule gives 0 here; the popularity vector end to end  # fmt: skip
    args = ["train", "--config", str(REPO / "configs" / "ease_federated.yaml"), *sum((["--set", o] for o in overrides), [])]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRUSTREC_ERASURE_SALT", "fed-gram-salt")
        assert main(args) == 0
    return root, overrides, args, json.loads((root / "artifacts" / "manifest.json").read_text())


@pytest.mark.ray
def test_with_dp_the_release_is_centralized_dp_ease_and_is_accounted(dp_cli_run, monkeypatch):
    from mlflow import MlflowClient

    from features.privacy_ledger import entries
    from features.store import FeatureStore
    from training.pipeline import prepare

    root, overrides, _, manifest = dp_cli_run
    monkeypatch.setenv("TRUSTREC_ERASURE_SALT", "fed-gram-salt")  # the ledger's entries are keyed under it
    cfg = load_config(REPO / "configs" / "ease_federated.yaml", overrides)
    privacy = manifest["provenance"]["privacy"]
    assert privacy["epsilon"] == pytest.approx(DP_EPS, abs=1e-6) and privacy["delta"] == pytest.approx(1 / N_USERS) and privacy["clipped_clients"] == 0
    assert manifest["model"]["kind"] == "ease_federated" and privacy["mechanism"].startswith("gaussian gram release (federated")
    data = prepare(cfg)
    n_items = data.dataset.n_items
    sigma = gram.gaussian_sigma(DP_EPS, 1 / N_USERS)
    sigma_gram = sigma / np.sqrt(0.8)  # 20 % of the budget on the popularity vector
    lam = gram.release_lambda(sigma_gram, n_items, N_USERS)
    assert privacy["sigma"] == pytest.approx(sigma) and privacy["lambda"] == pytest.approx(lam)
    assert privacy["sigma_gram"] == pytest.approx(sigma_gram) and privacy["sigma_popularity"] == pytest.approx(sigma / np.sqrt(0.2))
    assert privacy["popularity_share"] == 0.2 and "popularity vector" in privacy["fallback"]
    assert "from the item set" in privacy["clipping"] and "item set" in privacy["message"]  # one-user clients: nothing to clip
    # centralized DP-EASE on the same members with the same seed: the same statistics and the same noise draws
    central = gram.release(data.seen, n_items, sigma, lam, None, np.random.default_rng(cfg.trainer.seed), gram.prior_weight(sigma_gram, n_items, N_USERS), 0.2)
    np.testing.assert_allclose(np.load(root / "artifacts" / "item_embeddings.npy"), central.item_vectors(), rtol=1e-5, atol=1e-6)
    assert manifest["popularity"][:5] == data.dataset.item_vocab.decode(central.popularity(5))
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(manifest["provenance"]["run_id"])
    assert run.data.metrics["privacy/epsilon"] == pytest.approx(DP_EPS, abs=1e-6) and "federated-dp-eps3" in run.info.run_name
    store = FeatureStore(cfg.store.url)
    try:
        ledger = entries(store)
    finally:
        store.close()
    assert len(ledger) == 1 and ledger[0]["epsilon"] == pytest.approx(DP_EPS, abs=1e-6) and "federated" in ledger[0]["mechanism"]
    assert ledger[0]["users"] == N_USERS and privacy["ledger"]["cumulative_epsilon"] == pytest.approx(DP_EPS, abs=1e-6)


@pytest.mark.ray
def test_the_bundle_evaluates_and_the_ledger_refuses_a_retrain_past_the_budget(dp_cli_run, capsys, monkeypatch):
    """`trustrec evaluate`'s figures equal the run's, `trustrec privacy-budget` lists the release, and a
    retrain that would pass privacy.total_epsilon exits 2 before any client is asked (no second
    entry, the bundle unchanged)."""
    from cli.main import main
    from training.offline import evaluate_bundle

    root, overrides, args, manifest = dp_cli_run
    monkeypatch.setenv("TRUSTREC_ERASURE_SALT", "fed-gram-salt")  # the salt the ledger's entry was written under
    again = evaluate_bundle(load_config(REPO / "configs" / "ease_federated.yaml", overrides), str(root / "artifacts"))
    for key in ("test/ndcg_at_10", "test/recall_at_10"):
        assert again[key] == pytest.approx(manifest["metrics"][key], abs=1e-6), key
    capsys.readouterr()
    assert main(["privacy-budget", "--store-url", f"sqlite:///{root}/features.db"]) == 0
    assert "federated ease" in capsys.readouterr().out
    assert main([*args, "--set", "privacy.total_epsilon=5"]) == 2  # 3 spent + 3 planned > 5
    assert "privacy.total_epsilon" in capsys.readouterr().err
    assert json.loads((root / "artifacts" / "manifest.json").read_text())["provenance"]["run_id"] == manifest["provenance"]["run_id"]
    assert main(["privacy-budget", "--store-url", f"sqlite:///{root}/features.db"]) == 0
    assert capsys.readouterr().out.count("federated ease") == 1  # still one release


@pytest.mark.ray
def test_ray_serve_serves_the_registered_federated_bundle_over_http(dp_cli_run, tmp_path, monkeypatch):
    """The champion from the registry behind a real Ray Serve on 127.0.0.1: its card names the
    federated mechanism and the ledger's figure, and a known user's list over HTTP is the in-process one."""
    import requests
    import yaml

    from features.store import FeatureStore
    from serving.ingress import free_port
    from serving.launch import start, stop
    from serving.recommender import Recommender

    root, overrides, _, manifest = dp_cli_run
    monkeypatch.setenv("TRUSTREC_ERASURE_SALT", "fed-gram-salt")
    cfg = load_config(REPO / "configs" / "ease_federated.yaml", overrides)
    serve_cfg = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    serve_cfg["http_options"]["port"] = free_port()
    serve_cfg["applications"][0]["args"].update(tracking_uri=cfg.tracking.tracking_uri, store_url=cfg.store.url)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve_cfg))
    store = FeatureStore(cfg.store.url)
    try:
        local = Recommender.from_uri("models:/trustrec@champion", store=store, tracking_uri=cfg.tracking.tracking_uri)
        with store.engine.connect() as conn:
            user = conn.exec_driver_sql("SELECT user_id FROM users ORDER BY user_id LIMIT 1").scalar()
        want = local.recommend(user, k=5)
        url = start(tmp_path / "serve.yaml", num_cpus=2)
        try:
            card = requests.get(f"{url}/v1/model", timeout=30).json()
            assert card["kind"] == "ease_federated" and card["privacy"]["mode"] == "federated"
            assert card["privacy"]["epsilon"] == pytest.approx(DP_EPS, abs=1e-6) and card["privacy"]["cumulative_epsilon"] == pytest.approx(DP_EPS, abs=1e-6)
            assert card["privacy"]["details"]["mechanism"].startswith("gaussian gram release (federated")
            got = requests.post(f"{url}/v1/recommend", json={"user_id": user, "k": 5}, timeout=30)
            assert got.status_code == 200, got.text
            assert [i["item_id"] for i in got.json()["items"]] == [i["item_id"] for i in want["items"]] and got.json()["personalized"]
            bad = requests.post(f"{url}/v1/recommend", json={"user_id": user, "k": "many"}, timeout=30)
            assert bad.status_code == 422 and "k" in bad.text
        finally:
            stop()
    finally:
        store.close()
