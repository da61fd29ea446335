"""Turn one TorchServe request row into the photos it carries.

Accepted (see docs/interfaces.md): a raw image body; a multipart form with one image;
JSON ``{"instances": [...]}`` in KServe's v1 shape, where an instance is ``{"b64": ...}``,
``{"data": ...}``, ``{"image": {"b64": ...}}`` or a bare base64 string. The handler parses
KServe's shape itself (no TorchServe service envelope), so server-side batching still works.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from handler.errors import RequestError
from returns_model.preprocess import PhotoError


@dataclass
class ParsedRequest:
    photos: list[bytes | PhotoError]  # raw photo bytes, or the error of a bad instance
    batch: bool  # True: answer {"predictions": [...]}; False: a single result object


def _b64(value: Any, index: int) -> bytes | PhotoError:
    if not isinstance(value, str):
        return PhotoError("bad_instance", f"instance {index}: base64 data must be a string, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:  # tolerate data URLs
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        return PhotoError("bad_base64", f"instance {index}: not valid base64 ({exc})")


def instance_photo(inst: Any, index: int) -> bytes | PhotoError:
    """One KServe instance (or a v2 BYTES element sent as base64 text) -> photo bytes, or its error."""
    if isinstance(inst, str):
        return _b64(inst, index)
    if isinstance(inst, dict):
        if "b64" in inst:
            return _b64(inst["b64"], index)
        if "data" in inst:
            return _b64(inst["data"], index)
        if isinstance(inst.get("image"), dict) and "b64" in inst["image"]:
            return _b64(inst["image"]["b64"], index)
    return PhotoError("bad_instance", f"instance {index}: expected a base64 string, {{'b64': ...}}, "
                                      f"{{'data': ...}} or {{'image': {{'b64': ...}}}}")


def _from_json(doc: Any, max_instances: int) -> ParsedRequest:
    if not isinstance(doc, dict) or "instances" not in doc:
        raise RequestError("bad_request", "a JSON request must be an object with an 'instances' list")
    instances = doc["instances"]
    if not isinstance(instances, list):
        raise RequestError("bad_request", f"'instances' must be a list, got {type(instances).__name__}")
    if not instances:
        raise RequestError("bad_request", "'instances' is empty")
    if len(instances) > max_instances:
        raise RequestError("too_many_instances",
                           f"{len(instances)} instances in one request; the limit is {max_instances}")
    return ParsedRequest([instance_photo(inst, i) for i, inst in enumerate(instances)], batch=True)


def _looks_like_json(data: bytes) -> bool:
    head = bytes(data[:64]).lstrip()
    return head[:1] in (b"{", b"[")


def _body(row: dict[str, Any]) -> Any:
    for key in ("body", "data"):
        if key in row and row[key] is not None:
            return row[key]
    files = [v for v in row.values() if isinstance(v, (bytes, bytearray))]
    if len(files) == 1:
        return files[0]
    if not row:
        raise RequestError("bad_request", "the request has no body")
    raise RequestError("bad_request", f"a multipart form must carry exactly one image, got {len(row)} fields; "
                                      "several photos go in JSON instances")


FORM_URLENCODED_HINT = ("the photo was sent as application/x-www-form-urlencoded (curl --data-binary's default), "
                        "which splits its bytes into form fields; send it with a Content-Type such as image/jpeg or "
                        "application/octet-stream, or as multipart (curl -F data=@photo.jpg)")


def parse_request(row: dict[str, Any], max_instances: int, content_type: str | None = None) -> ParsedRequest:
    """Raises RequestError when the request as a whole is malformed."""
    if content_type and content_type.lower().startswith("application/x-www-form-urlencoded"):
        raise RequestError("bad_request", FORM_URLENCODED_HINT)
    body = _body(row)
    if isinstance(body, (dict, list)):  # TorchServe already decoded application/json
        return _from_json(body, max_instances)
    if isinstance(body, str):  # text/* content types arrive decoded
        body = body.encode()
    if isinstance(body, (bytes, bytearray)) and _looks_like_json(body):
        try:
            doc = json.loads(bytes(body))
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError("bad_json", f"the body looks like JSON but does not parse: {exc}") from None
        return _from_json(doc, max_instances)
    if isinstance(body, (bytes, bytearray)):
        return ParsedRequest([bytes(body)], batch=False)
    raise RequestError("bad_request", f"unsupported request body of type {type(body).__name__}")
