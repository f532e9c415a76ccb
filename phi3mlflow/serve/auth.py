"""The server's API key: ``Authorization: Bearer <key>`` on the OpenAI routes and ``/invocations``,
compared in constant time; a missing or wrong key is a 401 in OpenAI's error shape. ``/health``,
``/ping``, ``/version`` and ``/metrics`` stay open (probes and scrapers carry no key), and so does
a CORS preflight. The key comes from ``--api-key``, ``--api-key-file``, or the environment
(``PHI3MLFLOW_API_KEY``, ``PHI3MLFLOW_API_KEY_FILE``), in that order; it is never logged.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from phi3mlflow.errors import InputError
from phi3mlflow.serve.limits import error_body, send_json

ENV_KEY = "PHI3MLFLOW_API_KEY"
ENV_KEY_FILE = "PHI3MLFLOW_API_KEY_FILE"
PROTECTED_PREFIXES = ("/v1/", "/invocations")


def api_key(flag: str | None, flag_file: str | None, env: dict | None = None) -> str:
    """The key to require ("" for none), from the flags or else the environment."""
    env = dict(os.environ) if env is None else env
    if flag and flag_file:
        raise InputError("api_key", "give --api-key or --api-key-file, not both")
    if flag:
        return _checked(flag, "api_key")
    if flag_file:
        return _read(flag_file, "api_key_file")
    if env.get(ENV_KEY):
        return _checked(env[ENV_KEY], ENV_KEY)
    if env.get(ENV_KEY_FILE):
        return _read(env[ENV_KEY_FILE], ENV_KEY_FILE)
    return ""


def _read(path: str, parameter: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(parameter, f"cannot read the key file {path}: {e.__class__.__name__}") from None
    return _checked(text.strip(), parameter)


def _checked(key: str, parameter: str) -> str:
    key = key.strip()
    if not key:
        raise InputError(parameter, "the key is empty")
    if any(ord(ch) < 33 or ord(ch) > 126 for ch in key):
        raise InputError(parameter, "the key must be printable ASCII without spaces")
    return key


class RequireKey:
    """ASGI middleware: a 401 for a protected path without the right bearer key."""

    def __init__(self, app, key: str):
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if not any(path == p.rstrip("/") or path.startswith(p) for p in PROTECTED_PREFIXES):
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        message = "a wrong API key" if given else "no API key: send Authorization: Bearer <key>"
        body = error_body(401, message, "invalid_request_error", None, code="invalid_api_key")
        await send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])
