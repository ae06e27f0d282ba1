"""The customer-control endpoints behind serving/app.py's thin routes: consent, stated
preferences, events, access (export), erasure, and the model card.

Requests are pydantic-validated (unknown fields -> 422 naming them); the work is done by
features/consent.py, the same code `trustrec forget` / `trustrec export-user` run. Store calls
are blocking SQLite, so they run in a thread off the ingress's event loop. Logs carry at most a
salted hash of a user id, never the id or a token.
(No `from __future__ import annotations`: FastAPI must see the real types.)
"""

import asyncio
import logging
import re
from typing import Any, Literal

from fastapi import HTTPException, Path
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from serving.audit import audit_log
from serving.auth import Authenticator
from serving.config import AppArgs
from serving.http import CleanStr, FiniteFloat, StrictBool, Timestamp

log = logging.getLogger(__name__)

bearer = HTTPBearer(auto_error=False, description="admin token, or the user's own token")
UserIdPath = Path(min_length=1, max_length=128, description="the user's id")
AUTH_RESPONSES: dict = {
    401: {"description": "no or invalid bearer token"},
    403: {"description": "another user's token"},
    404: {"description": "no data held for this user (data access, erasure)"},
    409: {"description": "this user id was erased and cannot be reused (writes)"},
    503: {"description": "no feature store, or authentication not configured"},
}


class _Body(BaseModel):
    # numbers are accepted as ids; otherwise strict: no "true" or 1 for a boolean, no NaN, no lone surrogates (serving/http.py)
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class ConsentRequest(_Body):
    """The purposes to set; the ones left out keep their state. Each becomes a ledger record."""

    personalization: StrictBool | None = None
    training: StrictBool | None = None
    demographics: StrictBool | None = None
    source: CleanStr = Field("api", min_length=1, max_length=64, description="who recorded it: a form, an app screen, ...")


class ConsentState(BaseModel):
    granted: bool
    source: str
    since: str | None


class ConsentResponse(BaseModel):
    consents: dict[str, ConsentState]


class PreferencesRequest(_Body):
    """Lists to replace; a list left out stays as it is, [] clears it."""

    liked_genres: list[CleanStr] | None = Field(None, max_length=1000)
    avoided_genres: list[CleanStr] | None = Field(None, max_length=1000)
    blocked_items: list[CleanStr] | None = Field(None, max_length=1000)


class Preferences(BaseModel):
    liked_genres: list[str]
    avoided_genres: list[str]
    blocked_items: list[str]


class EventRequest(_Body):
    user_id: CleanStr = Field(min_length=1, max_length=128)
    item_id: CleanStr = Field(min_length=1, max_length=128)
    rating: FiniteFloat = Field(1.0, ge=-1e6, le=1e6, description="1.0 for implicit feedback")
    timestamp: Timestamp | None = Field(None, description="unix seconds, before 2100 (serving/http.py MAX_TIMESTAMP); default now")
    exposure_id: CleanStr | None = Field(None, min_length=1, max_length=64, description="the exposure_id of the list the item was shown in: joins this outcome to the experiment's exposure")
    kind: Literal["click", "rating", "purchase", "dwell"] = Field("click", description="what happened (with exposure_id)")
    value: FiniteFloat | None = Field(None, ge=0, le=1e6, description="with exposure_id: 1 for a click or purchase (0: explicitly none), the rating, dwell seconds; default: rating for kind rating, else 1")


class Outcome(BaseModel):
    exposure_id: str
    kind: str
    position: int | None = Field(description="the item's position in the exposed list, 0 first")
    recorded: bool


class EventResponse(BaseModel):
    stored: bool = Field(description="false without personalization or training consent: nothing kept")
    for_training: bool = Field(description="true only under training consent")
    outcome: Outcome | None = Field(None, description="present with exposure_id: the outcome joined to the experiment's exposure")


class Receipt(BaseModel):
    erased: bool
    tombstone: str = Field(description="salted hash of the id that keeps the user out of later imports and trainings")
    erased_at: str
    deleted: dict[str, int] = Field(description="rows deleted per table")
    popularity_adjusted_items: int


class UserData(BaseModel):
    user_id: str
    profile: dict[str, Any] | None
    preferences: Preferences
    consents: dict[str, Any]
    interactions: list[dict[str, Any]]
    events: list[dict[str, Any]]
    exported_at: str


class Reason(BaseModel):
    kind: Literal["similar_to_history", "stated_genre", "stated_profile", "model", "popular"]
    text: str
    item_id: str | None = None
    title: str | None = None
    similarity: float | None = None
    genres: list[str] | None = None


class PrivacyCard(BaseModel):
    mode: str
    epsilon: float | None = None
    delta: float | None = None
    cumulative_epsilon: float | None = Field(None, description="this release composed with the earlier ones on the same users (the store's privacy ledger)")
    cumulative_delta: float | None = None
    details: dict[str, Any] = {}


class ModelCard(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model_version: str
    kind: str
    exported_at: str | None
    dataset: str | None
    data_snapshot: str | None = Field(description="hash of the training data snapshot (no ids)")
    data: dict[str, Any]
    erasures_applied: int | None = Field(None, description="erased users left out of this model's training data (None: a bundle older than the count)")
    metrics: dict[str, float] = Field(description="test and training metrics under the names MLflow and the CLI show (test/ndcg_at_10); a bundle's older names (test/ndcg@10) are shown the same way")
    privacy: PrivacyCard
    user_features: list[str]
    item_features: list[str]
    provider: str


def _scalar(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


_SPELLED = (("@", "_at_"), ("<", "lt"), (">", "gt"), ("+", "plus"), ("=", "_"))


def metric_name(name: str) -> str:
    """A metric's published name, the rule of training.evaluation.metric_name (serving never imports
    training; tests/training/test_metric_names.py holds the two equal): bundles exported before the
    one naming say `test/ndcg@10`, the card says `test/ndcg_at_10` for both."""
    for old, new in _SPELLED:
        name = name.replace(old, new)
    return re.sub(r"[^A-Za-z0-9_\-. /:]", "_", name)


def model_card(rec) -> dict:
    """The model card from the bundle's manifest (run on the model deployment, which holds it)."""
    m = rec.manifest
    prov = m.get("provenance") or {}
    privacy = dict(prov.get("privacy") or {"mode": "none"})
    data = prov.get("data") or {}
    def pick(name: str) -> float | None:  # `epsilon` itself first, else e.g. `client_epsilon`
        keys = sorted((k for k in privacy if name in k and _scalar(privacy[k]) is not None), key=lambda k: k != name)
        return _scalar(privacy[keys[0]]) if keys else None

    eps, delta = pick("epsilon"), pick("delta")
    ledger = privacy.get("ledger") if isinstance(privacy.get("ledger"), dict) else {}
    return {
        "model_version": rec.model_version,
        "kind": m["model"]["kind"],
        "exported_at": prov.get("exported_at"),
        "dataset": prov.get("dataset"),
        "data_snapshot": data.get("snapshot"),
        "data": data,
        "erasures_applied": data.get("erasures_applied"),
        "metrics": {metric_name(k): float(v) for k, v in m.get("metrics", {}).items() if _scalar(v) is not None},
        # cumulative: this release composed with the earlier ones that covered the same users (the
        # store's privacy-budget ledger, features/privacy_ledger.py); None when no ledger was kept
        "privacy": {"mode": str(privacy.pop("mode", "none")), "epsilon": eps, "delta": delta,
                    "cumulative_epsilon": _scalar(ledger.get("cumulative_epsilon")), "cumulative_delta": _scalar(ledger.get("cumulative_delta")),
                    "details": privacy},
        "user_features": list(m["features"]["user"]),
        "item_features": list(m["features"]["item"]),
        "provider": rec.provider,
    }


def _token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials is not None else None


class UsersService:
    """One per replica: the store, the authenticator, the audit log, and a handler per endpoint."""

    def __init__(self, cfg: AppArgs, store=None, audit=None):
        """`store`: the replica's FeatureStore when it has one already (None opens one from cfg.store_url);
        `audit`: the replica's AuditLog (None builds one from cfg.audit)."""
        from features.store import FeatureStore

        if store is None and cfg.store_url:
            store = FeatureStore(cfg.store_url, consent=cfg.consent)
        self.store = store
        self.auth = Authenticator(cfg.auth)
        self.audit = audit if audit is not None else audit_log(cfg.audit, store)
        self.exposure_log = None  # the replica's experiment ExposureLog (set by the deployment), for outcomes of queued exposures
        self._pending: set = set()  # audit writes of failed /v1/recommend authorizations, in flight

    def _auth_failure(self, err: HTTPException, credentials, user_id: str, operation: str):
        """For a 401 / 403 from Authenticator.check: a function writing its audit entry (the hash of
        the requested id, why it failed, which operation; never the token). None for other errors."""
        if self.audit is None or err.status_code not in (401, 403):
            return None
        reason = "missing_token" if not _token(credentials) else "invalid_token" if err.status_code == 401 else "other_users_token"
        actor = "user" if err.status_code == 403 else "anonymous"  # 403: a genuine token, of another user
        detail = {"status": err.status_code, "reason": reason, "operation": operation}

        def write() -> None:
            try:
                self.audit.record("auth_failure", self.audit.subject(user_id), actor, detail)
            except Exception:  # the client gets its 401 / 403 either way
                log.exception("could not write the audit entry of an authentication failure")

        return write

    def _subject(self, user_id: str) -> str:
        """What a log line may say about a user: a short salted hash."""
        return self.store.subject_hash(user_id)[:12] if self.store else "-"

    async def _run(self, credentials: HTTPAuthorizationCredentials | None, user_id: str, fn, *args):
        """Authorize for `user_id`, then run fn(store, user_id, *args) in a thread, mapping errors to HTTP."""
        from features.consent import ConsentError, ErasedUserError, UnknownUserError

        try:
            actor = self.auth.check(_token(credentials), user_id)
        except HTTPException as e:
            write = self._auth_failure(e, credentials, user_id, fn.__name__)
            if write is not None:
                await asyncio.to_thread(write)
            raise
        if self.store is None:
            raise HTTPException(503, "no feature store configured (store_url is null)")
        try:
            return await asyncio.to_thread(fn, self.store, user_id, *args, audit=self.audit, actor=actor)
        except ConsentError as e:
            raise HTTPException(422, [{"loc": ["body", e.field], "msg": e.message, "type": "value_error"}]) from None
        except UnknownUserError:
            raise HTTPException(404, "no data held for this user") from None
        except ErasedUserError:
            raise HTTPException(409, "this user id was erased and cannot be reused") from None

    async def put_consent(self, user_id: str, body: ConsentRequest, credentials) -> dict:
        from features.consent import PURPOSES, record_consent

        changes = {p: getattr(body, p) for p in PURPOSES if getattr(body, p) is not None}
        states = await self._run(credentials, user_id, record_consent, changes, body.source)
        log.info("consent recorded for %s: %s", self._subject(user_id), ",".join(f"{p}={g}" for p, g in changes.items()))
        return {"consents": {p: s.to_json() for p, s in states.items()}}

    async def put_preferences(self, user_id: str, body: PreferencesRequest, credentials) -> dict:
        from features.consent import set_preferences

        return await self._run(credentials, user_id, set_preferences, body.liked_genres, body.avoided_genres, body.blocked_items)

    async def post_event(self, body: EventRequest, credentials) -> dict:
        from features.consent import record_event

        if body.exposure_id is None:
            return await self._run(credentials, body.user_id, record_event, body.item_id, body.rating, body.timestamp)
        from features.exposures import OutcomeError, record_outcome

        value = body.value if body.value is not None else (body.rating if body.kind == "rating" else 1.0)

        def with_outcome(store, user_id: str, *, audit, actor) -> dict:
            """The outcome first (a bad exposure_id refuses the whole event), then the event as without one."""
            wait = 2 * self.exposure_log.interval_s if self.exposure_log is not None else 0.5  # another replica's queue: written within its interval
            outcome = record_outcome(store, user_id, body.exposure_id, body.kind, value, body.item_id, self.exposure_log, wait_s=wait)
            return {**record_event(store, user_id, body.item_id, body.rating, body.timestamp, audit=audit, actor=actor), "outcome": outcome}

        with_outcome.__name__ = "record_event"  # the audit entry of a refused token names the operation as for any event
        try:
            return await self._run(credentials, body.user_id, with_outcome)
        except OutcomeError as e:
            raise HTTPException(422, [{"loc": ["body", e.field], "msg": str(e).split(": ", 1)[1], "type": "value_error"}]) from None

    async def get_data(self, user_id: str, credentials) -> dict:
        from features.consent import export_user

        return await self._run(credentials, user_id, export_user)

    async def delete_user(self, user_id: str, credentials) -> dict:
        from features.consent import erase_user

        receipt = await self._run(credentials, user_id, erase_user)
        log.info("erased user %s: %s", receipt["tombstone"][:12], receipt["deleted"])
        return receipt

    def authorize_recommend(self, user_id: str, credentials) -> bool:
        """/v1/recommend follows `auth.protect_recommend`: open by default. Returns whether the caller
        may see the user's personal data in the answer (explanations name history items, stated
        genres, consent state): only with the user's own token or the admin token. On the open route
        a caller without a token is anonymous (False); a token that is sent is checked like on the
        user-data routes (401 / 403). A failure's audit entry is written off the event loop without
        waiting for it (this check is synchronous)."""
        if not self.auth.protect_recommend and (not _token(credentials) or not (self.auth.admin or self.auth.secret)):
            return False
        try:
            self.auth.check(_token(credentials), user_id)
        except HTTPException as e:
            write = self._auth_failure(e, credentials, user_id, "recommend")
            if write is not None:
                try:
                    future = asyncio.get_running_loop().run_in_executor(None, write)
                except RuntimeError:  # no running event loop (a direct call): write it now
                    write()
                else:
                    self._pending.add(future)  # keep a reference until it is done
                    future.add_done_callback(self._pending.discard)
            raise
        return True
