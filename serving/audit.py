"""Serving's side of the audit log (features/audit.py): a replica's AuditLog from `AppArgs.audit`,
the actor name of a replica, and the model-swap entry `ModelServer.reconfigure` writes."""
from __future__ import annotations

import logging
import os

from features.audit import AuditLog
from serving.config import AuditArgs

log = logging.getLogger(__name__)


def audit_log(args: AuditArgs, store) -> AuditLog | None:
    """The AuditLog `args` configure over `store` (the table needs a store); None when no sink is left."""
    audit = AuditLog(store, table=args.table, path=args.path)
    return audit if audit.enabled else None


def replica_actor() -> str:
    """"replica:<Serve replica tag>" inside a Serve replica; "replica:pid-<pid>" elsewhere (tests, `trustrec recommend`)."""
    try:
        from ray import serve

        return f"replica:{serve.get_replica_context().replica_tag}"
    except Exception:  # not inside a replica: RayServeException (or Ray absent)
        return f"replica:pid-{os.getpid()}"


def record_model_swap(audit: AuditLog | None, old_version: str | None, new_version: str | None, uri: str, error: str | None = None) -> None:
    """Audit one replica's model swap (old -> new version; old None at start-up), or a swap it refused
    (`error`: it kept serving `old_version`). Called after the fact, so a failing audit sink is
    logged, never raised: the replica serves either way."""
    if audit is None:
        return
    try:
        if error is None:
            audit.record("model_swap", None, replica_actor(), {"old": old_version, "new": new_version, "uri": uri})
        else:
            audit.record("model_swap_refused", None, replica_actor(), {"serving": old_version, "uri": uri, "error": error})
    except Exception:
        log.exception("could not write the audit entry of model swap %s -> %s", old_version, new_version)
