"""How the server's app guards itself: the settings phi3mlflow/serve/cli.py's flags give
phi3mlflow/serve/app.py (kept apart so the command line parses without loading the web stack)."""

from __future__ import annotations

from dataclasses import dataclass

from phi3mlflow.serve.limits import MAX_BODY_BYTES


@dataclass(frozen=True)
class Options:
    max_body_bytes: int = MAX_BODY_BYTES  # a larger body is a 413
    api_key: str = ""  # "" for none: the server is unauthenticated
    cors_origins: tuple[str, ...] = ()  # origins browsers may call from; none by default
    metrics: bool = True  # GET /metrics
