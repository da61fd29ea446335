"""Fuzz targets over photo decoding and request parsing (hypothesis), shared by `make fuzz`
(tests/fuzz/__main__.py, bounded in time) and the quick smoke run in `make test`.

The only acceptable outcomes: a result (a ``uint8`` tensor of the model's shape; a ParsedRequest whose
photos are bytes or a PhotoError, one per instance) or a typed error (PhotoError, RequestError) with a
documented code. Any other exception, a wrong shape or an undocumented code is a finding.
"""
from __future__ import annotations

import base64
import io
import json

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from handler.errors import RequestError
from handler.payload import ParsedRequest, parse_request
from returns_model.meta import PreprocessSpec
from returns_model.preprocess import PhotoError, bytes_to_uint8

PHOTO_CODES = {"empty", "not_an_image", "corrupt", "too_large", "zero_size"}
INSTANCE_CODES = {"bad_base64", "bad_instance"}
REQUEST_CODES = {"bad_json", "bad_request", "too_many_instances"}
SPEC = PreprocessSpec()
# Small enough that a mutated header declaring a big image is refused quickly, as in the handler.
FUZZ_SPEC = PreprocessSpec(max_pixels=4_000_000)
MAX_INSTANCES = 16


def _seeds() -> list[bytes]:
    """Valid encodings of one small photo in every format the decoder accepts: mutation starts here."""
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8))
    out = []
    for img, fmt, kw in ((grey, "PNG", {}), (grey.convert("RGB"), "JPEG", {"quality": 80}),
                         (grey.convert("P"), "GIF", {}), (grey.convert("RGB"), "WEBP", {}),
                         (grey, "BMP", {}), (grey, "TIFF", {}), (grey.convert("RGBA"), "PNG", {}),
                         (Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257), "PNG", {}),
                         (grey.convert("CMYK"), "JPEG", {})):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out.append(buf.getvalue())
    return out


SEEDS = _seeds()


@st.composite
def mutated_images(draw) -> bytes:
    """A valid image with a few bytes flipped, inserted, deleted, or the file cut short."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(("flip", "set", "insert", "delete", "truncate")))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[i] = draw(st.sampled_from((0, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255)))))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and data:
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[i:]
    return bytes(data)


photo_bytes = st.one_of(mutated_images(), st.binary(max_size=300),
                        st.sampled_from(SEEDS).map(lambda b: b[:len(b) // 2]))


def check_decode(data: bytes) -> None:
    try:
        t = bytes_to_uint8(data, FUZZ_SPEC)
    except PhotoError as e:
        assert e.code in PHOTO_CODES and e.message, (e.code, e.message)
        return
    assert t.dtype.is_floating_point is False and tuple(t.shape) == (SPEC.channels, SPEC.size, SPEC.size)


json_leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                        st.text(max_size=20))
json_values = st.recursive(json_leaves, lambda kids: st.one_of(
    st.lists(kids, max_size=5), st.dictionaries(st.text(max_size=8), kids, max_size=5)), max_leaves=20)
b64_strings = st.one_of(photo_bytes.map(lambda b: base64.b64encode(b).decode()), st.text(max_size=40),
                        st.just("data:image/png;base64," + base64.b64encode(SEEDS[0]).decode()))
instances = st.one_of(b64_strings, b64_strings.map(lambda s: {"b64": s}), b64_strings.map(lambda s: {"data": s}),
                      b64_strings.map(lambda s: {"image": {"b64": s}}), json_values)
documents = st.one_of(st.lists(instances, max_size=MAX_INSTANCES + 4).map(lambda xs: {"instances": xs}),
                      json_values)
bodies = st.one_of(
    documents,                                                    # TorchServe decoded application/json
    documents.map(lambda d: json.dumps(d).encode()),              # JSON sent as bytes
    documents.map(lambda d: json.dumps(d)),                       # text/* arrives as str
    documents.map(lambda d: json.dumps(d).encode()[:-3]),          # cut short
    photo_bytes, photo_bytes.map(bytearray),
    st.binary(max_size=64).map(lambda b: b"{" + b), st.binary(max_size=64).map(lambda b: b" [" + b),
)
rows = st.one_of(
    bodies.map(lambda b: {"body": b}), bodies.map(lambda b: {"data": b}),
    st.dictionaries(st.text(max_size=10), st.one_of(st.binary(max_size=50), st.none(), st.text(max_size=10)),
                    max_size=3),
)
content_types = st.one_of(st.none(), st.sampled_from(["image/png", "application/json", "application/octet-stream",
                                                      "application/x-www-form-urlencoded", "text/plain"]))


def check_parse(row: dict, content_type: str | None) -> None:
    try:
        req = parse_request(row, MAX_INSTANCES, content_type)
    except RequestError as e:
        assert e.code in REQUEST_CODES and e.message, (e.code, e.message)
        return
    assert isinstance(req, ParsedRequest) and 1 <= len(req.photos) <= MAX_INSTANCES
    for p in req.photos:
        if isinstance(p, PhotoError):
            assert p.code in INSTANCE_CODES and p.message
        else:
            assert isinstance(p, bytes)
            check_decode(p)  # what the handler does next with each photo
