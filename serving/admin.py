"""Operator commands on the feature store, with the serve config's settings (store URL, consent
regime, audit sinks): the code path of `DELETE /v1/users/{id}` and `GET /v1/users/{id}/data`, and
the audit-log reader. `trustrec forget`, `export-user` and `audit-log` (cli/main.py) call these
with actor `cli`, so an operator's change is written and audited where serving writes."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from features.audit import ACTIONS, AuditLog
from features.consent import erase_user, export_user
from features.store import FeatureStore, existing_store
from serving.audit import audit_log
from serving.config import AppArgs, load_serve_config


def operator_args(config: str | Path, store_url: str | None = None) -> AppArgs:
    """The application args of the serve config `config`; with `store_url` given and no file at
    `config`, the defaults (a store URL alone is enough to act on a store)."""
    if store_url and not Path(config).exists():
        return AppArgs()
    if not Path(config).is_file():  # a command run outside the checkout: say what the file is for
        raise FileNotFoundError(f"--config {config}: no such file (a serve config, for the store URL and consent regime; or pass --store-url)")
    return load_serve_config(config)[1]


def _store_url(config: str | Path, args: AppArgs, store_url: str | None) -> str:
    """The store to act on: an existing one (a mistyped SQLite path is an error naming where it came
    from, never a new empty store that would answer "no data for this user")."""
    url = store_url or args.store_url
    if not url:
        raise ValueError(f"{config}: store_url is null; pass --store-url")
    return existing_store(url, "--store-url" if store_url else f"{config}: args.store_url")


def user_data(action: str, user_id: str, config: str | Path, store_url: str | None = None, actor: str = "cli") -> dict:
    """`forget` (erase the user; returns the receipt) or `export` (everything held about the user),
    on `store_url` or the config's store, audited where the config says serving audits. Raises
    features.consent.UnknownUserError when the store holds nothing about the user."""
    if action not in ("forget", "export"):
        raise ValueError(f"action {action!r}: forget or export")
    args = operator_args(config, store_url)
    with FeatureStore(_store_url(config, args, store_url), consent=args.consent) as store:
        audit = audit_log(args.audit, store)  # the serve config's audit settings: the CLI writes where serving does
        fn = erase_user if action == "forget" else export_user
        return fn(store, user_id, audit=audit, actor=actor)


def since_ms(text: str | None) -> int | None:
    """An ISO 8601 date or time as unix milliseconds (naive = UTC); None for None or ""."""
    if not text:
        return None
    try:
        since = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: not an ISO 8601 date or time (e.g. 2026-01-31 or 2026-01-31T12:00:00Z)") from None
    return int((since if since.tzinfo else since.replace(tzinfo=timezone.utc)).timestamp() * 1000)


def audit_entries(config: str | Path, store_url: str | None = None, file: str | None = None, user: str | None = None,
                  action: str | None = None, since: str | None = None) -> list[dict]:  # fmt: skip
    """The audit log (features/audit.py), oldest first: the store's table when the serve config's
    `audit.table` is on, else its `audit.path` file (or `file`). `user` is hashed under the store's
    erasure salt, as every entry is, so an erased user's entries are found too."""
    args = operator_args(config, store_url)
    if action is not None and action not in ACTIONS:
        raise ValueError(f"--action {action!r}: one of {', '.join(ACTIONS)}")
    from_ms = since_ms(since)
    url = store_url or args.store_url
    use_table = args.audit.table and not file
    path = file or args.audit.path
    if use_table and not url:
        raise ValueError(f"{config}: store_url is null; pass --store-url (or --file for a JSON-lines audit file)")
    if not use_table and not path:
        raise ValueError(f"{config}: audit.table is off and audit.path is null; pass --file")
    if user is not None and not url:
        raise ValueError("--user needs the feature store (its erasure salt hashes the id): pass --store-url")
    store = FeatureStore(existing_store(url, "--store-url" if store_url else f"{config}: args.store_url"), consent=args.consent) if url else None
    try:
        audit = AuditLog(store, table=use_table, path=path)
        subject = audit.subject(user) if user is not None else None
        return audit.entries(subject=subject, action=action, since_ms=from_ms)
    finally:
        if store is not None:
            store.close()
