"""The error types for bad input. Each carries the field it is about, so a step reports it as one
line naming that parameter before any heavy work, and the server answers a 400 whose OpenAI
``param`` names that field; no one recovers the field from a message."""

from __future__ import annotations


class InputError(ValueError):
    """A value a user gave is unusable; ``parameter`` names the MLproject parameter or field."""

    def __init__(self, parameter: str, message: str):
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter
        self.message = message


class InvalidRequest(ValueError):
    """A request a model cannot serve. ``param`` is the field as a client spelled it
    (``messages[0].role``, ``max_tokens``) or None when no one field is to blame; the text reads
    ``"<param>: <message>"``."""

    def __init__(self, param: str | None, message: str):
        super().__init__(f"{param}: {message}" if param else message)
        self.param = param
        self.message = message


class Overloaded(RuntimeError):
    """More requests than a model takes at once; try again later (a 503 with Retry-After)."""
