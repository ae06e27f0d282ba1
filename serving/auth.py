"""Bearer tokens for the user-data endpoints: one admin token, and per-user tokens.

A user token is `<user id, base64url>.<HMAC-SHA256(secret, "trustrec-user:" + user id), hex>`:
the server checks it without a token table, and can tell a forged token (401) from a genuine
token of another user (403). Both secrets come from env vars named in AppArgs.auth, never from
YAML. Tokens and user ids are never logged; comparisons are constant-time.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os

from fastapi import HTTPException

from serving.config import AuthArgs

log = logging.getLogger(__name__)

_CONTEXT = b"trustrec-user:"
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _mac(secret: str, user_id: str) -> str:
    return hmac.new(secret.encode(), _CONTEXT + str(user_id).encode(), hashlib.sha256).hexdigest()


def user_token(secret: str, user_id: str) -> str:
    """The bearer token of one user (what an account service hands to that user's client)."""
    subject = base64.urlsafe_b64encode(str(user_id).encode()).decode().rstrip("=")
    return f"{subject}.{_mac(secret, user_id)}"


def _subject(token: str, secret: str) -> str | None:
    """The user id a genuine user token was issued for; None when the token is not genuine."""
    subject, _, mac = token.partition(".")
    try:
        user_id = base64.urlsafe_b64decode(subject + "=" * (-len(subject) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return user_id if hmac.compare_digest(mac.encode(), _mac(secret, user_id).encode()) else None


class Authenticator:
    def __init__(self, args: AuthArgs):
        self.admin = os.environ.get(args.admin_token_env) or None
        self.secret = os.environ.get(args.user_secret_env) or None
        self.protect_recommend = args.protect_recommend
        self._names = (args.admin_token_env, args.user_secret_env)
        if not (self.admin or self.secret):
            log.warning("neither %s nor %s is set: user-data endpoints answer 503", *self._names)

    def check(self, token: str | None, user_id: str) -> str:
        """'admin' or 'user' when `token` may act for `user_id`; raises 401 / 403 / 503 otherwise."""
        if not (self.admin or self.secret):
            raise HTTPException(503, f"authentication is not configured (set {self._names[0]} or {self._names[1]})")
        if not token:
            raise HTTPException(401, "a bearer token is required", headers=_CHALLENGE)
        if self.admin and hmac.compare_digest(token.encode(), self.admin.encode()):
            return "admin"
        subject = _subject(token, self.secret) if self.secret else None
        if subject is None:
            raise HTTPException(401, "invalid bearer token", headers=_CHALLENGE)
        if not hmac.compare_digest(subject.encode(), str(user_id).encode()):
            raise HTTPException(403, "this token belongs to another user")
        return "user"
