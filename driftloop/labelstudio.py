"""Running Label Studio for `driftloop up` (and the tests): loopback only, data under the home,
a user and an API token made on its first boot without a prompt.

Label Studio 1.23 reads these at first boot (label_studio/server.py `_create_user`): a user from
LABEL_STUDIO_USERNAME + LABEL_STUDIO_PASSWORD, its legacy API token from LABEL_STUDIO_USER_TOKEN,
and whether the organisation accepts legacy tokens from LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN
(off for new organisations since late 2025; personal access tokens are one per user and cannot be
set or read back, so driftloop uses the legacy one). All are applied once, when the user and the
organisation are created; later boots reuse them. Offline: no Sentry, no version check, no
analytics. Webhooks to 127.0.0.1 (the controller) need its SSRF protection off; it listens on
loopback only, where every caller is local anyway.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from core import tokens
from core.errors import DriftloopError

REPO = Path(__file__).resolve().parent.parent
LS_VENV = REPO / ".venv-labelstudio"
USERNAME = "driftloop@localhost.local"


def binary() -> str | None:
    """The `label-studio` command: $DRIFTLOOP_LABEL_STUDIO_BIN, the project's own environment
    (`make labelstudio`), or one on PATH."""
    configured = os.environ.get("DRIFTLOOP_LABEL_STUDIO_BIN", "").strip()
    if configured:
        return configured if Path(configured).is_file() else None
    own = LS_VENV / "bin" / "label-studio"
    return str(own) if own.is_file() else shutil.which("label-studio")


def password_path() -> Path:
    return tokens.secrets_dir() / "labelstudio.password"


def password() -> str:
    """The driftloop user's Label Studio password (generated once, 0600 beside the tokens)."""
    path = password_path()
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(secrets.token_urlsafe(18) + "\n")
    return path.read_text(encoding="utf-8").strip()


def data_dir(home: Path) -> Path:
    return home / "labelstudio"


_LS_BOOLS = {"1", "0", "true", "false", "yes", "no"}


def environment(home: Path, base: dict | None = None) -> dict[str, str]:
    tokens.ensure("labelstudio")
    token = tokens.get("labelstudio")
    if token is None:
        raise DriftloopError(f"no Label Studio token: set {tokens.env_var('labelstudio')} or write {tokens.token_path('labelstudio')}")
    env = dict(os.environ if base is None else base)
    if env.get("CI", "").strip().lower() not in _LS_BOOLS:
        # Label Studio reads CI as a strict boolean (core/settings/base.py) and refuses to start on any
        # other value, an empty one included ("CI=" is common in shells and CI runners)
        env.pop("CI", None)
    env.update({
        "LABEL_STUDIO_USERNAME": USERNAME, "LABEL_STUDIO_PASSWORD": password(), "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir(home)), "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
        "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false",
    })
    return env


def command(home: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    found = binary()
    if found is None:
        raise DriftloopError("Label Studio is not installed: `make labelstudio` installs it into .venv-labelstudio "
                             "(or set DRIFTLOOP_LABEL_STUDIO_BIN)")
    return [found, "start", "--no-browser", "--internal-host", host, "--port", str(port), "--data-dir", str(data_dir(home))]
