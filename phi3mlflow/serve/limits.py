"""What one client can make the server hold: the size of a request body, the time its headers may
take, and what an error may carry back.

- ``BodyLimit`` (ASGI middleware over the whole app): a body larger than ``max_bytes`` is a 413
  before any of it is parsed, whether the client declared its length or sent it in chunks.
- ``header_timeout_protocol``: uvicorn's h11 protocol that closes a connection whose request
  headers have not arrived ``seconds`` after it opened or after its last answer (uvicorn itself
  waits for ever: thousands of slow-header connections once made a normal request take 10 s).
- ``QuietErrors`` (around MLflow's scoring app): an error answer keeps its status and error code
  but loses MLflow's ``stack_trace`` (absolute paths of the server) and any message beyond
  ``MAX_ERROR_CHARS`` (a 5 MB prompt's error once echoed the 5 MB back).

The defaults (phi3mlflow/serve/cli.py) are in docs/serving.md's "Limits".
"""

from __future__ import annotations

import json

# The largest request body (--max-body-bytes): far beyond any context this project serves (4k
# tokens are ~16 kB of text), far below what would stall the server to parse.
MAX_BODY_BYTES = 1_000_000
# How long a connection may take to send its request headers (--header-timeout).
HEADER_TIMEOUT_S = 10.0
MAX_ERROR_CHARS = 500
# A body over the limit but under this is read and dropped before the 413 (a client still sending
# would see the connection reset instead of the answer); a larger one gets the 413 and the close.
DRAIN_BYTES = 64_000_000


def error_body(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> bytes:
    """OpenAI's error object, as bytes."""
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


async def send_json(send, status: int, body: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """413 for a request body over ``max_bytes``; a chunked body is read (up to the limit) before
    the app sees it."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send) -> None:
        message = f"the request body is larger than this server takes ({self.max_bytes} bytes)"
        body = error_body(413, message, "invalid_request_error", "body")
        await send_json(send, 413, body, [(b"connection", b"close")])

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.max_bytes:
                if declared.isdigit() and int(declared) <= DRAIN_BYTES:
                    await _drain(receive)  # read and dropped, so that the client hears the 413, not a reset
                return await self._refuse(send)
            return await self.app(scope, receive, send)  # the HTTP layer stops a body at its declared length
        if headers.get(b"transfer-encoding", b"").lower() != b"chunked":
            return await self.app(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._refuse(send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _drain(receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


class QuietErrors:
    """MLflow's scoring app with its error answers trimmed: no stack trace, no long echo."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start: dict | None = None
        held = bytearray()

        async def trimmed(message):
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # held until the body is known
                return
            if start is None:
                return await send(message)
            held.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            await send_json(send, start["status"], _trim(bytes(held), start["status"]))

        return await self.app(scope, receive, trimmed)


def _trim(body: bytes, status: int) -> bytes:
    try:
        err = json.loads(body)
    except ValueError:
        err = None
    if not isinstance(err, dict):
        text = body.decode("utf-8", "replace").strip()
        return json.dumps({"error_code": "BAD_REQUEST" if status < 500 else "INTERNAL_ERROR",
                           "message": _short(text or f"HTTP {status}")}).encode()  # fmt: skip
    err.pop("stack_trace", None)
    if isinstance(err.get("message"), str):
        err["message"] = _short(err["message"])
    return json.dumps(err).encode()


def _short(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_ERROR_CHARS else f"{text[:MAX_ERROR_CHARS]}... ({len(text)} characters in all)"


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request headers take longer than ``seconds``."""
    from uvicorn.protocols.http.h11_impl import H11Protocol  # heavy: the web server, loaded to serve

    class HeaderTimeout(H11Protocol):
        _deadline = None

        def connection_made(self, transport):  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def _waiting(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self._waiting() and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._waiting():
                self._arm()
            else:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()  # uvicorn's keep-alive timeout takes over until the next request's first bytes

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeout
