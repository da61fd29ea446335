"""Errors the inference API answers with; each names its HTTP status."""
from __future__ import annotations

from typing import Any


class PhotoError(ValueError):
    """One photo could not be classified; the rest of its request and batch go on (status 200,
    or 400 when no photo of the request was valid). ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


class RequestError(PhotoError):
    """The request as a whole is malformed (bad JSON, too many instances): HTTP 400."""

    status = 400
