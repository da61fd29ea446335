"""The request-level error of the inference API. A bad photo is not a request error: it is a
``returns_model.preprocess.PhotoError``, answered as that photo's result."""
from __future__ import annotations

from typing import Any


class RequestError(ValueError):
    """The request as a whole is malformed (bad JSON, too many instances): HTTP 400 (gRPC
    INVALID_ARGUMENT), with ``{"error": {"code", "message"}}`` as the body."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}
