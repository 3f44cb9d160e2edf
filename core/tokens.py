"""Bearer tokens: who may post feedback, who may steer the loop, and (optionally) who may predict.

Feedback is training data, so whoever can post it can poison the next model; admin endpoints move
the production model. Each kind has its own token so the feedback token opens no admin endpoint.
A token comes from `DRIFTLOOP_<KIND>_TOKEN`, else from `$DRIFTLOOP_HOME/secrets/<kind>.token`
(0600, in a 0700 directory), which `ensure` creates once for local clients (`driftloop up`, the
service) to share. Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path
from typing import Iterable, Literal

from core.errors import DriftloopError
from core.home import driftloop_home

# labels: the secret header Label Studio's webhook sends the controller (labels/studio.py);
# labelstudio: driftloop's API token in the Label Studio it starts (set at that tool's first boot)
Kind = Literal["feedback", "admin", "predict", "labels", "labelstudio"]
KINDS: tuple[Kind, ...] = ("feedback", "admin", "predict", "labels", "labelstudio")
MIN_LENGTH = 16  # a shorter token is a typo or a placeholder, not a secret


def env_var(kind: Kind) -> str:
    return f"DRIFTLOOP_{kind.upper()}_TOKEN"


def secrets_dir() -> Path:
    return driftloop_home() / "secrets"


def token_path(kind: Kind) -> Path:
    return secrets_dir() / f"{kind}.token"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown token kind {kind!r} (expected one of {', '.join(KINDS)})")


def _valid(token: str, where: str) -> str:
    if len(token) < MIN_LENGTH or any(c.isspace() for c in token) or not token.isprintable():
        raise DriftloopError(f"{where}: a token must be at least {MIN_LENGTH} printable characters without spaces")
    return token


def get(kind: Kind) -> str | None:
    """The token of this kind: the environment variable (when set and not empty), else the file, else None."""
    _check_kind(kind)
    from_env = os.environ.get(env_var(kind), "").strip()
    if from_env:
        return _valid(from_env, env_var(kind))
    path = token_path(kind)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise DriftloopError(f"cannot read {path}: {err.strerror}") from None
    return _valid(text, str(path)) if text else None


def ensure(kind: Kind) -> bool:
    """Make sure a token of this kind exists; True when this call generated the file.

    The file is written to a private temporary name and then hard-linked into place, so it appears
    complete or not at all: two processes racing (several service workers) agree on one token.
    """
    _check_kind(kind)
    if get(kind) is not None:
        return False
    directory = secrets_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    target = token_path(kind)
    tmp = directory / f".{kind}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, target)
        except FileExistsError:  # another process won the race; its token stands
            return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def require(kinds: Iterable[Kind]) -> dict[Kind, str]:
    """Each kind's token (generated into the home when neither variable nor file has one).

    Two kinds sharing one token would let the feedback token open admin endpoints: refused.
    """
    out: dict[Kind, str] = {}
    for kind in kinds:
        ensure(kind)
        token = get(kind)
        if token is None:
            raise DriftloopError(f"no {kind} token: set {env_var(kind)} or write {token_path(kind)}")
        out[kind] = token
    owner: dict[str, Kind] = {}
    for kind, token in out.items():
        if token in owner:
            raise DriftloopError(f"the {owner[token]} and {kind} tokens are the same: give each kind its own")
        owner[token] = kind
    return out


def check(expected: str, authorization: str | None) -> int | None:
    """None when `authorization` is `Bearer <expected>`; 401 when no bearer token was sent; 403 when a wrong one was."""
    if not authorization:
        return 401
    scheme, _, credentials = authorization.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        return 401
    if hmac.compare_digest(credentials.encode("utf-8"), expected.encode("utf-8")):
        return None
    return 403


def refusal(kind: Kind, status: int) -> tuple[dict, dict[str, str]]:
    """The JSON body and headers of a 401/403 answer: readable, and never echoing what was sent."""
    if status == 401:
        message = (f"this endpoint needs the {kind} token: send 'Authorization: Bearer <token>' "
                   f"(the token is {env_var(kind)} or the file $DRIFTLOOP_HOME/secrets/{kind}.token)")
        challenge = 'Bearer realm="driftloop"'
    else:
        message = f"the bearer token sent is not the {kind} token"
        challenge = 'Bearer realm="driftloop", error="invalid_token"'
    return {"error": message}, {"WWW-Authenticate": challenge}


def authorization_header(kind: Kind) -> dict[str, str]:
    """`{"Authorization": "Bearer ..."}` for a client of this home, or {} when there is no such token."""
    token = get(kind)
    return {"Authorization": f"Bearer {token}"} if token else {}


REQUIRE_PREDICT_ENV = "DRIFTLOOP_SERVICE_REQUIRE_PREDICT_TOKEN"


def predict_token_required() -> bool:
    """Whether the service is configured to require the predict token on /predict (the service's own
    setting, read from the environment the controller shares with it): only then is `/predict` text
    from known callers, and only then may it become training data (self-training)."""
    return os.environ.get(REQUIRE_PREDICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}
