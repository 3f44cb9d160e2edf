"""The service's front door: bearer tokens, one error shape, an honest OpenAPI document, quiet logs.

One ASGI middleware (added to the BentoML service with `add_asgi_middleware`) does, for every
request, before BentoML's router:
- **auth**: a protected path (exact, or under a prefix such as `/admin/`) needs
  `Authorization: Bearer <token of its kind>`: 401 without one, 403 with a wrong one, a JSON
  message and `WWW-Authenticate: Bearer`. The tokens are resolved once, at startup.
- **errors as one JSON object**: BentoML 1.4.39 answers a 4xx `BentoMLException` with its body
  wrapped in a list (`detail = ({"error": ...},)`, a stray comma), so clients and the OpenAPI
  document would disagree; the middleware unwraps it.
- **JSON in**: the service's APIs take JSON only; any other declared media type gets a clear 415
  (BentoML would hand `multipart/form-data` without a boundary to its multipart parser: a 500).
- **`/docs.json`**: BentoML's generated document, amended with what BentoML cannot know: the bearer
  security schemes, the 401/403/415/422/503 answers the service really gives, an error `detail`
  that may be a list (pydantic's validation errors), and which request bodies are required.

And `RedactClientErrors`, a logging filter: BentoML logs every failed request with its traceback,
and a pydantic `ValidationError` prints the offending input (`input_value='...'`), i.e. the text of
the request; a 4xx message may quote it too (an unknown feedback label). The filter keeps the line
and replaces the traceback with the error's status, type and locations.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from typing import Callable, Collection, Mapping

from bentoml.exceptions import BentoMLException
from pydantic import ValidationError

from core import tokens

SPEC_PATH = "/docs.json"
ERROR_SCHEMA = {
    "type": "object", "title": "Error", "required": ["error"],
    "properties": {
        "error": {"type": "string", "title": "Message"},
        "detail": {"title": "Error Detail", "description": "More about the error: for a request that failed validation, "
                                                              "a list of {loc, msg, type}."},
    },
}
AUTH_DOC = {
    "feedback": "The feedback token (DRIFTLOOP_FEEDBACK_TOKEN or $DRIFTLOOP_HOME/secrets/feedback.token).",
    "admin": "The admin token (DRIFTLOOP_ADMIN_TOKEN or $DRIFTLOOP_HOME/secrets/admin.token).",
    "predict": "The predict token (DRIFTLOOP_PREDICT_TOKEN or $DRIFTLOOP_HOME/secrets/predict.token), "
               "when the service requires one (DRIFTLOOP_SERVICE_REQUIRE_PREDICT_TOKEN=true).",
}


def kind_for(path: str, rules: Mapping[str, tokens.Kind]) -> tokens.Kind | None:
    """The token kind a path needs: an exact rule, or a rule ending in `/` that is a prefix of it."""
    if path in rules:
        return rules[path]
    for rule, kind in rules.items():
        if rule.endswith("/") and path.startswith(rule):
            return kind
    return None


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _send_json(send, status: int, body: object, headers: Mapping[str, str] | None = None) -> None:
    raw = json.dumps(body).encode("utf-8")
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


def _is_json(content_type: str | None) -> bool:
    """No Content-Type (BentoML reads JSON then) or application/json, parameters aside."""
    return content_type is None or content_type.split(";")[0].strip().lower() in ("", "application/json")


def unwrap_error(body: bytes) -> bytes:
    """`[{"error": ...}]` (BentoML's wrapped 4xx) -> `{"error": ...}`; anything else unchanged."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict) and "error" in data[0]:
        return json.dumps(data[0]).encode("utf-8")
    return body


# BentoML answers every 5xx with "An unexpected error has occurred, please check the server log.",
# dropping the exception's message, and a batched API raises in the batcher's task, away from the
# request. So the service notes why it is unavailable (ServiceUnavailable's constructor) and a 503
# answered within a few seconds of that note carries the reason; any other 503 (BentoML's own
# overload answer) says what a client can do about it.
UNAVAILABLE_DEFAULT = "the service is overloaded or unavailable; nothing was served, retry later"
_unavailable: tuple[float, str] | None = None


def note_unavailable(reason: str) -> None:
    global _unavailable
    _unavailable = (time.monotonic(), reason)


def unavailable_reason(max_age_s: float = 5.0) -> str:
    noted = _unavailable
    if noted is not None and time.monotonic() - noted[0] <= max_age_s:
        return noted[1]
    return UNAVAILABLE_DEFAULT


def _errors_as_objects(send):
    """Wrap `send`: buffer a JSON error response (status >= 400, small), unwrap its body, and give a
    503 its reason (and `Retry-After`)."""
    start: dict | None = None
    chunks: list[bytes] = []

    async def wrapped(message: dict) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers") or []).get(b"content-type", b"")
            if message["status"] >= 400 and content_type.startswith(b"application/json"):
                start = message
                return
        elif message["type"] == "http.response.body" and start is not None:
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = unwrap_error(b"".join(chunks))
            headers = [(k, v) for k, v in start.get("headers") or [] if k.lower() != b"content-length"]
            if start["status"] == 503:
                body = json.dumps({"error": unavailable_reason()}).encode("utf-8")
                headers.append((b"retry-after", b"1"))
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await send(message)

    return wrapped


def amend_openapi(spec: dict, rules: Mapping[str, tokens.Kind],
                  extra_responses: Mapping[str, Mapping[int, str]] | None = None) -> dict:
    """BentoML's OpenAPI document plus what only this service knows (see the module docstring)."""
    spec = copy.deepcopy(spec)
    components = spec.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):  # BentoML declares detail: string
        if isinstance(schemas.get(name), dict):
            schemas[name].setdefault("properties", {})["detail"] = copy.deepcopy(ERROR_SCHEMA["properties"]["detail"])
    schemas["Error"] = copy.deepcopy(ERROR_SCHEMA)
    used: set[str] = set()

    def error(description: str, auth: bool = False) -> dict:
        out = {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        if auth:
            out["headers"] = {"WWW-Authenticate": {"description": "Bearer challenge", "required": True, "schema": {"type": "string"}}}
        return out

    for path, item in spec.get("paths", {}).items():
        for method, op in item.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            responses = op["responses"]
            if "x-bentoml-name" in op:  # a service API
                # BentoML answers overload, and our ServiceUnavailable, with 503; the guard answers non-JSON with 415
                responses.setdefault("503", error("Service unavailable (no model loaded, prediction log down, or overloaded): retry later"))
                responses.setdefault("415", error("The body must be JSON (Content-Type: application/json)"))
                body = op.get("requestBody") or {}
                schema = (body.get("content") or {}).get("application/json", {}).get("schema") or {}
                if schema.get("required") or schema.get("oneOf"):  # `{}` is not valid: a missing body is an error too
                    body["required"] = True
            for status, description in (extra_responses or {}).get(path, {}).items():
                responses.setdefault(str(status), error(description))
            kind = kind_for(path, rules)
            if kind is not None:
                used.add(kind)
                op["security"] = [{f"{kind}Token": []}]
                responses["401"] = error(f"No bearer token: send 'Authorization: Bearer <{kind} token>'", auth=True)
                responses["403"] = error(f"The bearer token is not the {kind} token", auth=True)
    if used:
        components["securitySchemes"] = {f"{kind}Token": {"type": "http", "scheme": "bearer", "description": AUTH_DOC[kind]}
                                         for kind in sorted(used)}
    return spec


class Guard:
    """The ASGI middleware (see the module docstring). `rules` maps paths (or prefixes ending in `/`)
    to token kinds, `secrets` each kind to its token; `spec` returns BentoML's OpenAPI document."""

    def __init__(self, app, rules: Mapping[str, tokens.Kind], secrets: Mapping[str, str], spec: Callable[[], dict],
                 json_paths: Collection[str] = (), extra_responses: Mapping[str, Mapping[int, str]] | None = None):
        missing = {kind for kind in rules.values() if not secrets.get(kind)}
        if missing:
            raise ValueError(f"no token for {', '.join(sorted(missing))}")
        self.app = app
        self.rules = dict(rules)
        self.secrets = dict(secrets)
        self._spec = spec
        self.json_paths = frozenset(json_paths)
        self._extra = extra_responses
        self._amended: bytes | None = None

    def spec_json(self) -> dict:
        return amend_openapi(self._spec(), self.rules, self._extra)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket" and kind_for(scope["path"], self.rules) is not None:
                await send({"type": "websocket.close", "code": 1008})  # no socket routes here; closed rather than unchecked
                return
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        kind = kind_for(path, self.rules)
        if kind is not None:
            status = tokens.check(self.secrets[kind], _header(scope, b"authorization"))
            if status is not None:
                body, headers = tokens.refusal(kind, status)
                await _send_json(send, status, body, headers)
                return
        if path in self.json_paths and not _is_json(_header(scope, b"content-type")):
            await _send_json(send, 415, {"error": "send the body as JSON, with 'Content-Type: application/json'"})
            return
        if path == SPEC_PATH and scope["method"] in ("GET", "HEAD"):
            if self._amended is None:
                self._amended = json.dumps(self.spec_json()).encode("utf-8")
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(self._amended)).encode())]})
            await send({"type": "http.response.body", "body": self._amended if scope["method"] == "GET" else b""})
            return
        await self.app(scope, receive, _errors_as_objects(send))


class RedactClientErrors(logging.Filter):
    """Keep BentoML's "Exception on /path" line for client errors, without the request's content."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        if isinstance(exc, ValidationError):
            where = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['type']}" for e in exc.errors(include_input=False)[:5])
            summary = f"{exc.error_count()} validation error(s) ({where})"
        elif isinstance(exc, BentoMLException) and int(exc.error_code) < 500:
            summary = f"{int(exc.error_code)} {type(exc).__name__}"  # its message may quote the request (a label)
        else:
            return True  # a server error keeps its traceback: it is a bug to fix
        record.msg = f"{record.getMessage()} -> {summary}"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        return True


def install_log_redaction() -> None:
    """Attach `RedactClientErrors` to the logger BentoML reports failed requests on (idempotent)."""
    logger = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, RedactClientErrors) for f in logger.filters):
        logger.addFilter(RedactClientErrors())
