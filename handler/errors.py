"""The request-level error of the inference API. A bad photo is not a request error: it is a
``returns_model.preprocess.PhotoError``, answered as that photo's result."""
from __future__ import annotations

from returns_model.preprocess import CodedError


class RequestError(CodedError):
    """The request as a whole is malformed (bad JSON, too many instances): HTTP 400 (gRPC
    INVALID_ARGUMENT), with ``{"error": {"code", "message"}}`` as the body."""
