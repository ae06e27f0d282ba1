"""Experiment config and sticky assignment (features/experiments.py): the keyed hash by hand,
arm shares against the weights, stickiness, minimal movement when weights change, consent."""
import hashlib
import hmac
import math

import numpy as np
import pytest
from pydantic import ValidationError

from features.experiments import HOLDOUT, ExperimentConfig, ExperimentKeyError, assign, assignment_key, served_arm, unit

KEY = b"a-test-key-of-32-bytes-not-secret"
USERS = [f"user-{i}" for i in range(20_000)]


def experiment(**extra):
    arms = extra.pop("arms", [{"name": "control", "baseline": "popularity"}, {"name": "treatment", "model": "champion"}])
    return ExperimentConfig(**{"name": "rec-v2", "arms": arms, **extra})


def counts(cfg, key=KEY):
    out = {}
    for u in USERS:
        arm = assign(cfg, u, key)
        out[arm] = out.get(arm, 0) + 1
    return out


def test_unit_is_the_first_eight_bytes_of_the_keyed_hash_centred():
    digest = hmac.new(KEY, b"rec-v2\x1farm\x1fcontrol\x1fuser-1", hashlib.sha256).digest()
    assert unit(KEY, "rec-v2", "arm", "control", "user-1") == (int.from_bytes(digest[:8], "big") + 0.5) / 2**64
    assert 0 < unit(KEY, "x") < 1 and unit(KEY, "x") != unit(b"another-key-of-16+chars", "x")
    # the rendezvous rule by hand for one user: the smallest -ln(u) / weight wins
    cfg = experiment(arms=[{"name": "a", "baseline": "random", "weight": 1}, {"name": "b", "model": "champion", "weight": 3}])
    scores = {a: -math.log(unit(KEY, "rec-v2", "arm", a, "user-1")) / w for a, w in (("a", 1), ("b", 3))}
    assert assign(cfg, "user-1", KEY) == min(scores, key=scores.get)


@pytest.mark.parametrize("weights,holdout", [((1, 1), 0.0), ((1, 3), 0.0), ((2, 1), 0.2)])
def test_arm_shares_follow_the_weights(weights, holdout):
    cfg = experiment(arms=[{"name": "control", "baseline": "popularity", "weight": weights[0]},
                           {"name": "treatment", "model": "champion", "weight": weights[1]}], holdout=holdout)  # fmt: skip
    got, n = counts(cfg), len(USERS)
    for arm, share in cfg.shares().items():
        assert abs(got.get(arm, 0) / n - share) < 4 * math.sqrt(share * (1 - share) / n), (arm, got)
    assert set(got) == set(cfg.shares())


def test_assignment_is_sticky_and_keyed():
    cfg = experiment()
    first = [assign(cfg, u, KEY) for u in USERS[:2000]]
    again = [assign(experiment(), u, KEY) for u in USERS[:2000]]  # a fresh config object: a restarted replica
    assert first == again
    other = [assign(cfg, u, b"a-different-key-also-32-bytes-long") for u in USERS[:2000]]
    agree = np.mean([a == b for a, b in zip(first, other)])
    assert 0.45 < agree < 0.55  # another key is another, independent assignment
    renamed = [assign(experiment(name="rec-v3"), u, KEY) for u in USERS[:2000]]
    assert 0.45 < np.mean([a == b for a, b in zip(first, renamed)]) < 0.55  # experiments are independent of each other


def test_changing_weights_moves_only_the_users_that_must_move():
    even = {u: assign(experiment(), u, KEY) for u in USERS}
    raised = experiment(arms=[{"name": "control", "baseline": "popularity"}, {"name": "treatment", "model": "champion", "weight": 3}])
    moved = [(even[u], assign(raised, u, KEY)) for u in USERS]
    assert not any(a == "treatment" and b == "control" for a, b in moved)  # nobody leaves the arm that grew
    share_moved = np.mean([a != b for a, b in moved])
    assert abs(share_moved - 0.25) < 0.015  # 50 % -> 75 %: exactly the 25 % that must move, in expectation
    three = experiment(arms=[{"name": "control", "baseline": "popularity"}, {"name": "treatment", "model": "champion"},
                             {"name": "challenger", "model": "challenger"}])  # fmt: skip
    after = [(even[u], assign(three, u, KEY)) for u in USERS]
    assert all(a == b or b == "challenger" for a, b in after)  # a new arm takes users, it never swaps the others
    assert abs(np.mean([b == "challenger" for _, b in after]) - 1 / 3) < 0.015


def test_consent_and_holdout_decide_what_is_served():
    cfg = experiment()  # control: popularity (no user data), treatment: the champion model
    assert served_arm(cfg, "treatment", personalization=True) == "treatment"
    assert served_arm(cfg, "treatment", personalization=False) == "control"  # never personalized without consent
    assert served_arm(cfg, "control", personalization=False) == "control"
    assert served_arm(cfg, HOLDOUT, personalization=True) is None  # outside the experiment: the usual path
    both = experiment(arms=[{"name": "champ", "model": "champion"}, {"name": "chall", "model": "challenger"}])
    assert both.fallback is None and served_arm(both, "chall", personalization=False) is None


def test_config_errors_name_the_field(monkeypatch):
    with pytest.raises(ValidationError, match="exactly one of model"):
        experiment(arms=[{"name": "a", "model": "champion", "baseline": "random"}, {"name": "b", "model": "challenger"}])
    with pytest.raises(ValidationError, match="arm names must be unique"):
        experiment(arms=[{"name": "a", "model": "champion"}, {"name": "a", "model": "challenger"}])
    with pytest.raises(ValidationError, match="experiment.control"):
        experiment(control="nope")
    with pytest.raises(ValidationError, match="experiment.arms.name"):
        experiment(arms=[{"name": HOLDOUT, "model": "champion"}, {"name": "b", "model": "challenger"}])
    with pytest.raises(ValidationError, match="greater than 0"):
        experiment(arms=[{"name": "a", "model": "champion", "weight": 0}, {"name": "b", "model": "challenger"}])
    monkeypatch.delenv("TRUSTREC_EXPERIMENT_KEY", raising=False)
    with pytest.raises(ExperimentKeyError, match="TRUSTREC_EXPERIMENT_KEY"):
        assignment_key(experiment())
    monkeypatch.setenv("TRUSTREC_EXPERIMENT_KEY", "x" * 32)
    assert assignment_key(experiment()) == b"x" * 32
