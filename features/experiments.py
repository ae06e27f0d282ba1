"""Controlled experiments: what an experiment is, and which arm a user is in.

An experiment (declared in `configs/serve.yaml` under the app's `experiment:` args) has a name,
two or more arms with traffic weights — each a registry alias (`champion`, `challenger`: a
personalized model) or a built-in baseline (`popularity`, `random`) — a control arm, and an
optional holdout share of users kept outside it.

Assignment is sticky and stateless: a keyed hash of (experiment, user id) decides, so every
replica, every restart and every replay gives a user the same arm, and nothing is stored to
remember it. The key is a secret (an env var, like the erasure salt): without it nobody can
compute, from an id, which arm a user is in — or pick ids to land in an arm.

Arms are drawn by weighted rendezvous hashing: per arm a, u_a = H(key, experiment, user, a) in
(0, 1) and the user goes to the arm with the smallest -ln(u_a) / w_a. Those are independent
exponentials of rates w_a, so P(arm a) = w_a / sum(w) exactly; and changing weights moves only
the users who must move: raising arm a's weight moves users into a only, lowering it moves users
out of a only, adding an arm moves users into it only (no user ever moves between two arms whose
weights did not change). A plain split of one hash into weight intervals would move users between
untouched arms whenever an interval boundary shifts.

A user without personalization consent is still assigned (so the arm counts stay honest for the
sample-ratio-mismatch test), but is never served a personalized arm: `served_arm` sends them to
the experiment's non-personalized fallback, and the exposure log says both.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HOLDOUT = "holdout"  # the pseudo-arm of users kept outside the experiment (served as without one)


class ExperimentKeyError(ValueError):
    """The assignment key is missing: assignment would not be secret (or not stable across replicas)."""


class ArmConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    weight: float = Field(1.0, gt=0)  # relative traffic share: weights 1 and 1 split 50 / 50
    model: str | None = None  # a registry alias of the served model name: champion, challenger, ...
    baseline: Literal["popularity", "random"] | None = None  # or a built-in list that uses no user data
    # the logging policy (bundle/policy.py): with probability epsilon a uniformly random ordering of
    # the arm's top-`pool`, so off-policy estimators can evaluate other models on its logs; 0 = always the top-k
    epsilon: float = Field(0.0, ge=0, le=1)
    pool: int = Field(50, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> "ArmConfig":
        if not _NAME.match(self.name) or self.name == HOLDOUT:
            raise ValueError(f"experiment.arms.name: {self.name!r} must be 1-64 of letters, digits, '_', '.', '-' and not {HOLDOUT!r}")
        if (self.model is None) == (self.baseline is None):
            raise ValueError(f"experiment.arms[{self.name}]: give exactly one of model (a registry alias) or baseline (popularity, random)")
        return self

    @property
    def personalized(self) -> bool:
        return self.model is not None


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    arms: list[ArmConfig] = Field(min_length=2)
    control: str | None = None  # the arm lifts are measured against; None: the first arm
    holdout: float = Field(0.0, ge=0, lt=1)  # share of users outside the experiment altogether
    key_env: str = "TRUSTREC_EXPERIMENT_KEY"  # env var holding the assignment key (a secret, never in YAML)

    @model_validator(mode="after")
    def _check(self) -> "ExperimentConfig":
        if not _NAME.match(self.name):
            raise ValueError(f"experiment.name: {self.name!r} must be 1-64 of letters, digits, '_', '.', '-'")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment.arms: arm names must be unique, got {names}")
        if self.control is not None and self.control not in names:
            raise ValueError(f"experiment.control: {self.control!r} is not an arm ({', '.join(names)})")
        return self

    @property
    def control_arm(self) -> ArmConfig:
        return self.arm(self.control or self.arms[0].name)

    def arm(self, name: str) -> ArmConfig:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(name)

    @property
    def fallback(self) -> ArmConfig | None:
        """Where a user without personalization consent is served: the control if it is a
        baseline, else the first baseline arm; None when every arm is personalized (then such a
        user gets the non-personalized list served outside experiments)."""
        control = self.control_arm
        if not control.personalized:
            return control
        return next((a for a in self.arms if not a.personalized), None)

    def shares(self) -> dict[str, float]:
        """Expected share of all users per arm (and the holdout), for the sample-ratio test."""
        total = sum(a.weight for a in self.arms)
        out = {a.name: (1 - self.holdout) * a.weight / total for a in self.arms}
        if self.holdout:
            out[HOLDOUT] = self.holdout
        return out


def assignment_key(cfg: ExperimentConfig) -> bytes:
    key = os.environ.get(cfg.key_env, "")
    if len(key) < 16:
        raise ExperimentKeyError(f"experiment.key_env: set {cfg.key_env} to a secret of at least 16 characters "
                                 "(the same on every replica; changing it reassigns every user)")  # fmt: skip
    return key.encode()


def unit(key: bytes, *parts: str) -> float:
    """A uniform number in (0, 1) from HMAC-SHA256(key, parts): the first 8 bytes, centred in their cell."""
    digest = hmac.new(key, "\x1f".join(parts).encode(), hashlib.sha256).digest()
    return (int.from_bytes(digest[:8], "big") + 0.5) / 2.0**64


def assign(cfg: ExperimentConfig, user_id: str, key: bytes) -> str:
    """The user's arm (or HOLDOUT): sticky, stateless, weighted rendezvous (module docstring)."""
    uid = str(user_id)
    if cfg.holdout and unit(key, cfg.name, "holdout", uid) < cfg.holdout:
        return HOLDOUT
    return min(cfg.arms, key=lambda a: -math.log(unit(key, cfg.name, "arm", a.name, uid)) / a.weight).name


def served_arm(cfg: ExperimentConfig, assigned: str, personalization: bool) -> str | None:
    """The arm whose list the user is shown: the assigned one, unless it is personalized and the user
    has not consented to personalization (then the fallback arm). None: serve the user as if there
    were no experiment — the holdout, and non-consenting users when every arm is personalized (the
    usual path already gives them the non-personalized list)."""
    if assigned == HOLDOUT:
        return None
    arm = cfg.arm(assigned)
    if arm.personalized and not personalization:
        fallback = cfg.fallback
        return fallback.name if fallback is not None else None
    return assigned
