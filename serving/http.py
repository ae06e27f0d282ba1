"""HTTP plumbing shared by the routes in serving/app.py and serving/users_api.py: bad input is a 4xx, always.

- `BodyGuard`, a pure ASGI middleware: a body in a media type other than JSON -> 415, a body over
  `max_body_bytes` -> 413, both before anything reads or parses it (Content-Length is checked up
  front and a chunked body is counted as it streams in).
- `validation_error_handler`: the 422 echoes at most a bounded, JSON-safe prefix of each bad input
  (NaN / Infinity / lone surrogates / a 60 KB string used to make FastAPI's own handler answer 500
  or echo the whole body), and never fails itself.
- Strict field types (`CleanStr`, `StrictInt`, `FiniteFloat`, ...): no "5" or true for an integer,
  no 1 / 0 for a boolean, no non-finite number, no invalid Unicode; ids may still be JSON numbers.
- `TrustrecAPI`: FastAPI with /docs and /redoc served from the app itself (Swagger UI and ReDoc
  assets from the fastapi-offline package: no CDN, so the docs work offline), and an OpenAPI
  schema that says what is enforced: bearer security per the replica's `auth.protect_recommend`,
  413 / 415 on the body operations.

Settings live in the module (`SETTINGS`), set from AppArgs by `configure_http` in Model.__init__: the
app Ray Serve runs is a copy of `serving.app.api` that the replica's __init__ cannot reach, and a
replica process holds exactly one Model, so one module-level setting is that replica's.
"""
from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Annotated, Any, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import AfterValidator, AllowInfNan, BeforeValidator, Field, Strict
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 65536  # AppArgs.max_body_bytes' default (serving/config.py says why)
MAX_ECHO_CHARS = 200  # a 422 repeats at most this much of one bad input
MAX_ERRORS = 20  # ... and lists at most this many errors (then one "too_many_errors" entry)
# Unix seconds up to 2100-01-01T00:00:00Z: far beyond any real event, while a millisecond
# timestamp (1.7e12, a common client mistake) or a number past SQLite's 64-bit INTEGER is refused.
MAX_TIMESTAMP = 4102444800
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass
class HttpSettings:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    protect_recommend: bool = False  # auth.protect_recommend: whether the optional-auth routes' token is required


SETTINGS = HttpSettings()


def configure_http(cfg) -> None:
    """Take this replica's HTTP settings from its AppArgs (called in Model.__init__)."""
    SETTINGS.max_body_bytes = cfg.max_body_bytes
    SETTINGS.protect_recommend = cfg.auth.protect_recommend


# ---- strict field types -----------------------------------------------------------------------
def _number_as_id(value: Any) -> Any:
    """Models with `coerce_numbers_to_str` take a JSON number as an id ("user_id": 196); NaN,
    Infinity and integers beyond 64 bits are no ids (they would become "nan", "inf", ...)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number or a string")
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        raise ValueError("a numeric id must fit in 64 bits")
    return value


def _valid_unicode(value: str) -> str:
    """pydantic already refuses lone surrogates ("\\ud800") in python mode; checked here too so a
    change there can never let one reach SQLite or a UTF-8 encoder."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


# a string (or a JSON number taken as one) that is valid Unicode: every string field of a request
CleanStr = Annotated[str, BeforeValidator(_number_as_id), AfterValidator(_valid_unicode)]
# No bounds inside these: pydantic lets an inner Field(ge=...) win over the field's own (checked: an
# int64 range on StrictInt turned k's 1..100 into 1..2**63), so every integer field carries its own.
StrictInt = Annotated[int, Strict()]  # no "5", 5.0 or true
StrictBool = Annotated[bool, Strict()]  # no 1 / 0 / "true"
FiniteFloat = Annotated[float, Strict(), AllowInfNan(False)]  # a JSON number (ints too), never NaN / ±Infinity / "0.5"
Timestamp = Annotated[int, Strict(), Field(ge=0, le=MAX_TIMESTAMP, description="unix seconds, before 2100")]


# ---- 413 / 415 before parsing -------------------------------------------------------------------
def json_media_type(content_type: str | None) -> bool:
    """application/json or application/<anything>+json, with at most a UTF-8 charset."""
    if not content_type:
        return False
    return _json_media_type(content_type) if len(content_type) <= 128 else _json_media_type.__wrapped__(content_type)


@functools.lru_cache(maxsize=64)  # clients send a handful of distinct Content-Types: parsed once each, not per request
def _json_media_type(content_type: str) -> bool:
    message = Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    if subtype != "json" and not subtype.endswith("+json"):
        return False
    charset = message.get_param("charset")
    return charset is None or str(charset).lower() in ("utf-8", "utf8")


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes")


def _plain_response(status: int, detail: str):
    return JSONResponse({"detail": detail}, status_code=status)


class BodyGuard:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer the body it must not read).

    POST / PUT / PATCH carrying a body whose Content-Type is not JSON (or is missing) -> 415; every
    route of this app that takes a body takes JSON. A body over `SETTINGS.max_body_bytes` -> 413:
    from Content-Length before reading anything, or, for a chunked body, as soon as the bytes
    received pass the limit (the app reading it gets the 413 raised from `receive`)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        limit = SETTINGS.max_body_bytes
        length = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        try:
            declared = int(length) if length is not None else None
        except ValueError:
            return await _plain_response(400, "invalid Content-Length")(scope, receive, send)
        has_body = chunked or bool(declared)
        if scope["method"] in BODY_METHODS and (has_body or headers.get("content-type")) and not json_media_type(headers.get("content-type")):
            return await _plain_response(415, "the request body must be application/json (UTF-8)")(scope, receive, send)
        if declared is not None and declared > limit:
            return await _plain_response(413, f"request body over {limit} bytes")(scope, receive, send)

        received, started = 0, False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as e:  # raised where nothing turned it into a response (FastAPI routes do)
            if started:
                raise
            await _plain_response(413, e.detail)(scope, receive, send)


# ---- the 422 -----------------------------------------------------------------------------------
def _safe_str(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """Valid UTF-8 (a lone surrogate becomes the text "\\ud800"), at most `limit` characters."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "…"


def _json_safe(value: Any, depth: int = 0) -> Any:
    """`value` with only JSON-encodable parts: non-finite floats as strings, surrogates escaped,
    containers cut at 20 entries and 4 levels (the result is bounded again by `_bounded`)."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else ("NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        return _safe_str(value, MAX_ECHO_CHARS * 2)
    if depth >= 4:
        return "…"
    if isinstance(value, dict):
        items = list(value.items())
        return {_safe_str(str(k), 64): _json_safe(v, depth + 1) for k, v in items[:20]} | ({"…": f"{len(items) - 20} more"} if len(items) > 20 else {})
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, depth + 1) for v in list(value)[:20]] + (["…"] if len(value) > 20 else [])
    return _safe_str(str(value))


def _bounded(value: Any) -> Any:
    """A JSON-safe `value`, kept as is when its JSON is at most MAX_ECHO_CHARS long, else a prefix."""
    safe = _json_safe(value)
    if isinstance(safe, str):
        return _safe_str(safe)
    text = json.dumps(safe, ensure_ascii=False, allow_nan=False)
    if isinstance(safe, int) and not isinstance(safe, bool) and len(text) > MAX_ECHO_CHARS:
        return text[:MAX_ECHO_CHARS] + "…"  # a huge integer
    return safe if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + "…"


def sanitize_error(err: dict) -> dict:
    out = {
        "type": _safe_str(str(err.get("type", "value_error")), 64),
        "loc": [x if isinstance(x, int) and not isinstance(x, bool) else _safe_str(str(x), 64) for x in err.get("loc", ())][:16],
        "msg": _safe_str(str(err.get("msg", "")), 500),
    }
    if "input" in err:
        out["input"] = _bounded(err["input"])
    if isinstance(err.get("ctx"), dict):
        out["ctx"] = {_safe_str(str(k), 64): _bounded(v if isinstance(v, (str, int, float, bool, type(None))) else str(v)) for k, v in list(err["ctx"].items())[:10]}
    return out


def sanitized_errors(errors: Iterable[dict]) -> list[dict]:
    errors = list(errors)
    out = [sanitize_error(e) for e in errors[:MAX_ERRORS]]
    if len(errors) > MAX_ERRORS:
        out.append({"type": "too_many_errors", "loc": ["body"], "msg": f"{len(errors) - MAX_ERRORS} more errors not listed"})
    return out


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, with every error's input and context bounded and JSON-safe; never fails."""
    try:
        return JSONResponse({"detail": sanitized_errors(exc.errors())}, status_code=422)
    except Exception:  # the answer to bad input must not be a 500, whatever the input was
        log.exception("could not render a validation error")
        return JSONResponse({"detail": [{"type": "value_error", "loc": ["body"], "msg": "invalid request"}]}, status_code=422)


# ---- the app: offline docs, truthful OpenAPI ----------------------------------------------------
def docs_assets_dir() -> Path:
    """Swagger UI (swagger-ui-bundle.js, swagger-ui.css), ReDoc (redoc.standalone.js) and a
    favicon, as the fastapi-offline package ships them (requirements/cpu.txt)."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


BODY_RESPONSES = {
    "413": {"description": "request body over `max_body_bytes` (serve.yaml args)"},
    "415": {"description": "request body not application/json (UTF-8)"},
}
AUTH_REQUIRED_RESPONSES = {
    "401": {"description": "no or invalid bearer token"},
    "403": {"description": "another user's token"},
    "503": {"description": "authentication is not configured"},
}
# while open, a token that is sent is still checked (UsersService.authorize_recommend): found
# undocumented by benchmarks/fuzz.py's optional_auth probe
OPTIONAL_AUTH_RESPONSES = {
    "401": {"description": "an invalid bearer token was sent (without one the route is open)"},
    "403": {"description": "another user's token was sent"},
}


class TrustrecAPI(FastAPI):
    """FastAPI with offline /docs and /redoc, the 422 handler and BodyGuard installed, and an
    OpenAPI schema generated per replica settings.

    `optional_auth_paths`: operations that take a bearer token but need one only when
    `SETTINGS.protect_recommend` is set; their security reads `[{}, {"HTTPBearer": []}]` (optional)
    while they are open. Every operation with a request body documents 413 and 415."""

    docs_assets_url = "/docs-assets"

    def __init__(self, *, optional_auth_paths: Iterable[str] = (), **kwargs):
        self._offline_docs = (kwargs.pop("docs_url", "/docs"), kwargs.pop("redoc_url", "/redoc"))
        self.optional_auth_paths = frozenset(optional_auth_paths)
        self._schemas: dict[bool, dict] = {}
        super().__init__(docs_url=None, redoc_url=None, **kwargs)
        self.add_exception_handler(RequestValidationError, validation_error_handler)
        self.add_middleware(BodyGuard)

    def setup(self) -> None:
        super().setup()  # the /openapi.json route (docs_url and redoc_url are None here)
        self.docs_url, self.redoc_url = self._offline_docs  # Ray Serve reports docs_url as the app's docs path
        if not self.openapi_url:
            return
        self.mount(self.docs_assets_url, StaticFiles(directory=docs_assets_dir()), name="docs-assets")
        assets, favicon = self.docs_assets_url, f"{self.docs_assets_url}/favicon.png"
        if self.docs_url:

            async def swagger_ui_html(req: Request) -> HTMLResponse:
                root = req.scope.get("root_path", "").rstrip("/")
                return get_swagger_ui_html(
                    openapi_url=root + self.openapi_url,
                    title=f"{self.title} - Swagger UI",
                    swagger_js_url=f"{root}{assets}/swagger-ui-bundle.js",
                    swagger_css_url=f"{root}{assets}/swagger-ui.css",
                    swagger_favicon_url=root + favicon,
                    # no badge from the public validator service: the page must not call out
                    swagger_ui_parameters={"validatorUrl": None, **(self.swagger_ui_parameters or {})},
                )

            self.add_route(self.docs_url, swagger_ui_html, include_in_schema=False)
        if self.redoc_url:

            async def redoc_html(req: Request) -> HTMLResponse:
                root = req.scope.get("root_path", "").rstrip("/")
                return get_redoc_html(
                    openapi_url=root + self.openapi_url, title=f"{self.title} - ReDoc",
                    redoc_js_url=f"{root}{assets}/redoc.standalone.js", redoc_favicon_url=root + favicon, with_google_fonts=False,
                )

            self.add_route(self.redoc_url, redoc_html, include_in_schema=False)

    def openapi(self) -> dict[str, Any]:
        protect = SETTINGS.protect_recommend
        if protect not in self._schemas:
            self.openapi_schema = None  # FastAPI's own cache knows one schema only
            schema = super().openapi()
            self.openapi_schema = None
            self._schemas[protect] = self._enforced(schema, protect)
        return self._schemas[protect]

    def _enforced(self, schema: dict, protect: bool) -> dict:
        for path, operations in schema.get("paths", {}).items():
            for method, op in operations.items():
                if not isinstance(op, dict):
                    continue
                if "requestBody" in op:
                    for code, response in BODY_RESPONSES.items():
                        op.setdefault("responses", {}).setdefault(code, dict(response))
                if path in self.optional_auth_paths and op.get("security"):
                    required = [s for s in op["security"] if s]
                    if protect:
                        op["security"] = required
                        for code, response in AUTH_REQUIRED_RESPONSES.items():
                            op.setdefault("responses", {}).setdefault(code, dict(response))
                    else:
                        op["security"] = [{}, *required]
                        for code, response in OPTIONAL_AUTH_RESPONSES.items():
                            op.setdefault("responses", {}).setdefault(code, dict(response))
        return schema
