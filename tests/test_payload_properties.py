"""Request parsing (handler/payload.py) and photo decoding for any input (hypothesis): a result or a
typed error with a documented code, never anything else; and the instances of a request come back
as exactly their photos, in order. `make fuzz` runs the same targets for minutes."""
from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handler.errors import RequestError
from handler.payload import parse_request
from returns_model.preprocess import PhotoError
from tests.fuzz.targets import MAX_INSTANCES, check_decode, check_parse, content_types, photo_bytes, rows

QUICK = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
SHAPES = [lambda s: s, lambda s: {"b64": s}, lambda s: {"data": s}, lambda s: {"image": {"b64": s}}]


@QUICK
@given(st.lists(st.tuples(st.binary(max_size=64), st.integers(0, 3)), min_size=1, max_size=MAX_INSTANCES),
       st.sampled_from(["dict", "bytes", "str"]))
def test_every_instance_shape_gives_back_its_bytes_in_order(items, encoding):
    doc = {"instances": [SHAPES[shape](base64.b64encode(data).decode()) for data, shape in items]}
    body = {"dict": doc, "bytes": json.dumps(doc).encode(), "str": json.dumps(doc)}[encoding]
    req = parse_request({"body": body}, MAX_INSTANCES)
    assert req.batch and req.photos == [data for data, _ in items]


@QUICK
@given(st.binary(min_size=1, max_size=200).filter(lambda b: bytes(b[:64]).lstrip()[:1] not in (b"{", b"[")))
def test_a_raw_body_is_one_photo_as_sent(data):
    req = parse_request({"body": bytearray(data)}, MAX_INSTANCES, "image/png")
    assert not req.batch and req.photos == [data]


@QUICK
@given(st.integers(MAX_INSTANCES + 1, 3 * MAX_INSTANCES))
def test_more_instances_than_the_limit_is_a_request_error(n):
    with pytest.raises(RequestError) as e:
        parse_request({"body": {"instances": ["AAAA"] * n}}, MAX_INSTANCES)
    assert e.value.code == "too_many_instances" and str(MAX_INSTANCES) in e.value.message


@QUICK
@given(st.lists(st.one_of(st.integers(), st.none(), st.lists(st.integers(), max_size=2),
                          st.dictionaries(st.sampled_from(["x", "img", "image"]), st.integers(), max_size=2)),
                min_size=1, max_size=MAX_INSTANCES))
def test_instances_of_the_wrong_type_are_bad_instance_each(values):
    req = parse_request({"body": {"instances": values}}, MAX_INSTANCES)
    assert len(req.photos) == len(values)
    assert all(isinstance(p, PhotoError) and p.code == "bad_instance" for p in req.photos)


@QUICK
@given(rows, content_types)
def test_any_request_row_parses_or_fails_with_a_request_code(row, content_type):
    check_parse(row, content_type)


@QUICK
@given(photo_bytes)
def test_any_bytes_decode_or_fail_with_a_photo_code(data):
    check_decode(data)
