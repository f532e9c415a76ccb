"""The one error type for bad input: it carries the parameter (or field) it is about, so every step
reports it as one line naming that parameter, before any heavy work."""

from __future__ import annotations


class InputError(ValueError):
    """A value a user gave is unusable; ``parameter`` names the MLproject parameter or field."""

    def __init__(self, parameter: str, message: str):
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter
        self.message = message
