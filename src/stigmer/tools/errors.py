"""The one exception the built-in tools raise for the model to read."""

from __future__ import annotations


class ToolFailure(Exception):
    """A failure meant for the model: a short message saying what went wrong and, when it can, what to
    do instead. The caller returns it as the tool's result; it is not a bug, so it carries no traceback
    worth showing. Programming errors are never turned into a ToolFailure."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
